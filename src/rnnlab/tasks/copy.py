"""The copy memory task (Hochreiter & Schmidhuber 1997; Arjovsky, Shah & Bengio 2016, §4.1).

Ten categories: symbols 0 … 7, the blank 8 and the delimiter 9, fed one-hot. With ``delay`` = D
(the paper's T) a sequence has D + 20 steps:

    input   s_1 … s_10 | D − 1 blanks | delimiter | 10 blanks
    target  D + 10 blanks                         | s_1 … s_10

where s_i are drawn uniformly with replacement from the 8 symbols. Cross-entropy is read at every
step; the metric is the accuracy on the 10 recalled symbols.

Baseline: a memoryless predictor can output the blank with certainty on the first D + 10 steps
(their target never depends on the input) and can only guess uniformly among the 8 symbols on the
last 10, so its mean cross-entropy over the D + 20 steps is 10·log(8) / (D + 20). A model beats it
only by carrying the 10 symbols across D steps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnlab.config import require_int
from rnnlab.tasks.base import Batch, Task

N_SYMBOLS = 8  # symbols to copy: categories 0 … 7
BLANK = 8
DELIMITER = 9
N_COPY = 10  # symbols per sequence


class Copy(Task):
    """T = delay + 20 steps; x: (B, T, 10) one-hot; y: (B, T) categories, read at every step."""

    loss = "cross_entropy"
    input_size = 10
    output_size = 10

    def __init__(self, delay: int = 100, **kwargs):
        super().__init__(**kwargs)
        self.delay = require_int("task.delay", delay, minimum=1)
        self.seq_len = self.delay + 2 * N_COPY
        self.n_out = self.seq_len
        self.baseline = N_COPY * math.log(N_SYMBOLS) / self.seq_len

    def generate(self, batch_size: int, generator: torch.Generator) -> Batch:
        B, T = batch_size, self.seq_len
        symbols = torch.randint(0, N_SYMBOLS, (B, N_COPY), generator=generator)
        inputs = torch.full((B, T), BLANK)
        inputs[:, :N_COPY] = symbols
        inputs[:, N_COPY + self.delay - 1] = DELIMITER
        target = torch.full((B, T), BLANK)
        target[:, T - N_COPY:] = symbols
        return {"x": F.one_hot(inputs, self.input_size).float(), "y": target}

    def metrics(self, y_hat: Tensor, y: Tensor) -> dict[str, Tensor]:
        recalled = y_hat[:, -N_COPY:].argmax(-1) == y[:, -N_COPY:]
        return {"accuracy": recalled.float().mean()}
