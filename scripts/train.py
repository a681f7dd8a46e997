"""`rnnlab train`, for a checkout: train a recurrent cell on a synthetic task and log its
per-timestep gradient flow.

    python scripts/train.py                        # defaults: conf/train.yaml
    python scripts/train.py cell.gain=1.1 task.seq_len=200
    python scripts/train.py -m cell.gain=0.9,1.0,1.1 task.seq_len=50,200   # a sweep
    python scripts/train.py -m experiment=gain_sweep                       # a preset
"""

import sys

from rnnlab.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
