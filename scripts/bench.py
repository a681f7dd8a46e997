"""`rnnlab bench`, for a checkout: rnnlab's training throughput against a raw PyTorch loop (see
rnnlab.bench).

    python scripts/bench.py --quick          # rnn, gru, lstm at T = 100, under a minute
    python scripts/bench.py --out bench.json # every cell at T = 100, 1000 (and LSTM at 10,000)
"""

import sys

from rnnlab.cli import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]])
