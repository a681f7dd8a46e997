"""Train a recurrent cell on a synthetic task and log its per-timestep gradient flow.

    python scripts/train.py                        # defaults: conf/train.yaml
    python scripts/train.py cell.gain=1.1 task.seq_len=200
    python scripts/train.py -m cell.gain=0.9,1.0,1.1 task.seq_len=50,200   # a sweep
    python scripts/train.py -m experiment=gain_sweep                       # a preset
"""

import sys

import hydra
from omegaconf import DictConfig

from rnnlab.config import ConfigError, register_resolvers
from rnnlab.sweep import run

register_resolvers(exit_on_error=True)


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        return run(cfg)  # in a multirun, a failed job is recorded and returns a penalty
    except ConfigError as error:
        print(f"Config error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
