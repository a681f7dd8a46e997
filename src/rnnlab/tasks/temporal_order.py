"""The temporal order problem (Hochreiter & Schmidhuber 1997, exp. 6a), positions scaled with T.

Eight symbols, fed one-hot: distractors a, b, c, d (0 … 3), the relevant X, Y (4, 5), the start
E (6) and the trigger B (7). A sequence of T steps is

    E, distractors …, r_1 at t_1, distractors …, r_2 at t_2, distractors …, B

with r_1, r_2 ∈ {X, Y} drawn independently and uniformly, distractors uniform among a … d, and
t_1 uniform in [⌊T/10⌋, ⌊2T/10⌋], t_2 uniform in [⌊5T/10⌋, ⌊6T/10⌋] (both inclusive, 0-based).
At T = 100 these are the paper's 10 … 20 and 50 … 60; the paper also draws T itself from
100 … 110, which this fixed-T version does not. The class, read with cross-entropy at the last
step, is the order of the pair: XX → 0 (the paper's Q), XY → 1 (R), YX → 2 (S), YY → 3 (U).

Baseline: the four classes are equally likely whatever the input at the last step, so the best
memoryless guess is uniform, with cross-entropy log 4 ≈ 1.386. Solving the task needs both
relevant symbols kept for up to 0.9·T steps among distractors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnlab.config import require_int
from rnnlab.tasks.base import Batch, Task

N_DISTRACTORS = 4  # a, b, c, d
X, Y, START, TRIGGER = 4, 5, 6, 7


def relevant_windows(seq_len: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The inclusive position ranges of the two relevant symbols for T = seq_len."""
    T = seq_len
    return (T // 10, 2 * T // 10), (5 * T // 10, 6 * T // 10)


class TemporalOrder(Task):
    """x: (B, T, 8) one-hot; y: (B, 1) class in 0 … 3, read at the last step."""

    loss = "cross_entropy"
    input_size = 8
    output_size = 4
    n_out = 1
    baseline = math.log(4)

    def __init__(self, seq_len: int = 100, **kwargs):
        super().__init__(**kwargs)
        # T >= 10 keeps t_1 >= 1 (after E) and the two windows apart.
        self.seq_len = require_int("task.seq_len", seq_len, minimum=10)

    def generate(self, batch_size: int, generator: torch.Generator) -> Batch:
        B, T = batch_size, self.seq_len
        (lo1, hi1), (lo2, hi2) = relevant_windows(T)
        tokens = torch.randint(0, N_DISTRACTORS, (B, T), generator=generator)
        tokens[:, 0], tokens[:, -1] = START, TRIGGER
        t1 = torch.randint(lo1, hi1 + 1, (B,), generator=generator)
        t2 = torch.randint(lo2, hi2 + 1, (B,), generator=generator)
        is_y = torch.randint(0, 2, (B, 2), generator=generator)
        rows = torch.arange(B)
        tokens[rows, t1] = X + is_y[:, 0]
        tokens[rows, t2] = X + is_y[:, 1]
        target = 2 * is_y[:, 0] + is_y[:, 1]
        return {"x": F.one_hot(tokens, self.input_size).float(), "y": target.view(B, 1)}

    def metrics(self, y_hat: Tensor, y: Tensor) -> dict[str, Tensor]:
        return {"accuracy": (y_hat.argmax(-1) == y).float().mean()}
