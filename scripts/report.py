"""`rnnlab report`, for a checkout: compare finished runs (gradient-flow figures, one HTML page,
and a table of final metrics).

    python scripts/report.py outputs/multirun/2026-01-01_12-00-00 --out report
    python scripts/report.py outputs/adding/rnn/run_a outputs/adding/rnn/run_b --steps 0 500
"""

import sys

from rnnlab.cli import main

if __name__ == "__main__":
    main(["report", *sys.argv[1:]])
