"""Train a recurrent cell on a synthetic task and log its per-timestep gradient flow.

    python scripts/train.py                        # defaults: conf/train.yaml
    python scripts/train.py cell.gain=1.1 task.seq_len=200
    python scripts/train.py -m cell.gain=0.9,1.0,1.1 task.seq_len=50,200   # a sweep
    python scripts/train.py -m experiment=gain_sweep                       # a preset

Exit status: 0 done; 2 a setting or file is wrong (the message names it, nothing was trained);
1 training failed (failed.json in the run directory; a full disk names the file);
128 + the signal's number (130 Ctrl-C, 143 SIGTERM) when a signal stopped the run at a checkpoint.
"""

import errno
import sys

import hydra
from omegaconf import DictConfig

from rnnlab.checkpointing import RunInterrupted
from rnnlab.config import ConfigError, check_config_files, register_resolvers
from rnnlab.sweep import run

register_resolvers(exit_on_error=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)  # in a multirun, a failed job is recorded and returns a penalty
    except ConfigError as error:
        print(f"Config error: {error}", file=sys.stderr)
        sys.exit(2)
    except RunInterrupted as stop:
        print(f"Interrupted: {stop}", file=sys.stderr)
        sys.exit(stop.exit_code)
    except OSError as error:
        if error.errno != errno.ENOSPC:
            raise
        print(f"Disk full: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    try:
        check_config_files(sys.argv[1:])  # a YAML error would be a traceback inside Hydra
    except ConfigError as error:
        print(f"Config error: {error}", file=sys.stderr)
        sys.exit(2)
    main()
