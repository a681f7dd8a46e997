"""Train a recurrent cell on a synthetic task and log its per-timestep gradient flow.

    python scripts/train.py                        # defaults: conf/train.yaml
    python scripts/train.py cell.gain=1.1 task.seq_len=200
"""

import sys

import hydra
from omegaconf import DictConfig

from rnnlab.config import ConfigError, register_resolvers
from rnnlab.train import report_finish, train

register_resolvers()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    try:
        metrics = train(cfg)
    except ConfigError as error:
        print(f"Config error: {error}", file=sys.stderr)
        sys.exit(2)
    report_finish(cfg, metrics)
    return metrics["val/loss"]


if __name__ == "__main__":
    main()
