"""Compare finished runs: gradient-flow figures, one HTML page, and a table of final metrics.

    python scripts/report.py outputs/multirun/2026-01-01_12-00-00 --out report
    python scripts/report.py outputs/adding/rnn/run_a outputs/adding/rnn/run_b --steps 0 500
"""

import argparse
import sys

from rnnlab.report import NoRunsError, write_report
from rnnlab.rundir import RunFileError


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+",
                        help="run directories, Hydra multirun directories, or outputs/")
    parser.add_argument("--out", default="report", help="where the PNGs and report.html go")
    parser.add_argument("--steps", type=int, nargs="*", default=None,
                        help="training steps whose profiles are drawn (default: 5 evenly spaced)")
    args = parser.parse_args()
    try:
        page = write_report(args.paths, args.out, args.steps)
    except (NoRunsError, RunFileError) as error:
        print(f"Report error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"Report: {page}")


if __name__ == "__main__":
    main()
