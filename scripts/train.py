"""`rnnlab train`, for a checkout: train a recurrent cell on a synthetic task and log its
per-timestep gradient flow.

    python scripts/train.py                        # defaults: conf/train.yaml
    python scripts/train.py cell.gain=1.1 task.seq_len=200
    python scripts/train.py -m cell.gain=0.9,1.0,1.1 task.seq_len=50,200   # a sweep
    python scripts/train.py -m experiment=gain_sweep                       # a preset

Exit status: 0 done; 2 a setting or file is wrong (the message names it, nothing was trained);
1 training failed (failed.json in the run directory; a full disk names the file);
128 + the signal's number (130 Ctrl-C, 143 SIGTERM) when a signal stopped the run at a checkpoint.
"""

import sys

from rnnlab.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]])
