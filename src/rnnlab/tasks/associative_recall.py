"""Associative recall (Ba et al. 2016), single- or multi-query (MQAR, Arora et al. 2023, "Zoology").

Tokens, fed one-hot: keys 0 … K − 1, values K … K + V − 1 (value j is token K + j) and a blank
K + V. A sequence of T steps starts with N key–value pairs k_1 v_1 … k_N v_N, the keys drawn
without replacement from the K, the values without replacement from the V (as in Zoology's
generator); the rest is blank except for the queries:

- single query (``multi_query=false``): the last step holds one of the N keys, drawn uniformly;
  the target, read with cross-entropy at that step, is the index j of its value. The first pair is
  T − 2 steps back, so T sets the memory span.
- multi-query (``multi_query=true``, MQAR): every key is queried once in the query region
  [2N, T), at offsets 2g from its start; the gaps g ∈ [0, ⌊(T − 2N)/2⌋) are drawn without
  replacement with P(g) ∝ (g + 1)^(a − 1), a = ``power_a`` (Zoology's default 0.01 favours
  queries soon after the pairs; a = 1 is uniform). The target at a query is its value index, read
  at that step; every other step of the region is −100 (not read).

The metric is the accuracy of the answers. Baseline: the value of a key is uniform over the V
values and independent of the key itself, so without memory of the pairs the best guess is
uniform, with cross-entropy log V.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnlab.config import is_int, require, require_int
from rnnlab.tasks.base import Batch, Task


class AssociativeRecall(Task):
    """x: (B, T, K + V + 1) one-hot; y: (B, 1) single query or (B, T − 2N) multi-query, −100 =
    not read; classes are value indices 0 … V − 1."""

    loss = "cross_entropy"

    def __init__(self, seq_len: int = 50, num_pairs: int = 4, num_keys: int = 16,
                 num_values: int = 16, multi_query: bool = False, power_a: float = 0.01,
                 **kwargs):
        super().__init__(**kwargs)
        self.seq_len = require_int("task.seq_len", seq_len, minimum=3)
        self.num_pairs = require_int("task.num_pairs", num_pairs)
        require(isinstance(multi_query, bool), "task.multi_query", multi_query, "true or false")
        self.multi_query = multi_query
        if multi_query:
            require(4 * num_pairs <= seq_len, "task.num_pairs", num_pairs,
                    f"at most task.seq_len / 4 = {seq_len // 4} (N pairs and N queries spaced by "
                    "2 must fit in T)")
        else:
            require(2 * num_pairs + 1 <= seq_len, "task.num_pairs", num_pairs,
                    f"at most (task.seq_len − 1) / 2 = {(seq_len - 1) // 2} (N pairs and the "
                    "query must fit in T)")
        # Keys and values are distinct within a sequence, so each vocabulary needs N of them.
        for key, size in (("task.num_keys", num_keys), ("task.num_values", num_values)):
            require(is_int(size, max(num_pairs, 2)), key, size,
                    f"an integer >= max(task.num_pairs, 2) = {max(num_pairs, 2)}")
        self.num_keys, self.num_values = num_keys, num_values
        require(isinstance(power_a, (int, float)) and 0 < power_a <= 1, "task.power_a", power_a,
                "a number in (0, 1]")
        self.power_a = float(power_a)
        self.blank = num_keys + num_values
        self.input_size = num_keys + num_values + 1
        self.output_size = num_values
        self.n_out = seq_len - 2 * num_pairs if multi_query else 1
        self.baseline = math.log(num_values)

    def generate(self, batch_size: int, generator: torch.Generator) -> Batch:
        B, T, N = batch_size, self.seq_len, self.num_pairs
        # The N largest of i.i.d. uniforms: a uniformly random ordered draw without replacement.
        keys = torch.rand(B, self.num_keys, generator=generator).topk(N, dim=1).indices
        values = torch.rand(B, self.num_values, generator=generator).topk(N, dim=1).indices
        tokens = torch.full((B, T), self.blank)
        tokens[:, 0:2 * N:2] = keys
        tokens[:, 1:2 * N:2] = self.num_keys + values
        if self.multi_query:
            target = self._place_queries(tokens, keys, values, generator)
        else:
            asked = torch.randint(0, N, (B, 1), generator=generator)
            tokens[:, -1] = keys.gather(1, asked).squeeze(1)
            target = values.gather(1, asked)
        return {"x": F.one_hot(tokens, self.input_size).float(), "y": target}

    def _place_queries(self, tokens: Tensor, keys: Tensor, values: Tensor,
                       generator: torch.Generator) -> Tensor:
        """Write every key into the query region of `tokens`; return the (B, T − 2N) targets."""
        B, N = keys.shape
        slots = (self.seq_len - 2 * N) // 2
        gap_weight = (torch.arange(1, slots + 1, dtype=torch.float64) ** (self.power_a - 1))
        gaps = torch.multinomial(gap_weight.expand(B, slots), N, replacement=False,
                                 generator=generator)
        target = torch.full((B, self.n_out), -100)
        target.scatter_(1, 2 * gaps, values)
        tokens[:, 2 * N:].scatter_(1, 2 * gaps, keys)
        return target

    def metrics(self, y_hat: Tensor, y: Tensor) -> dict[str, Tensor]:
        read = y != -100
        return {"accuracy": (y_hat.argmax(-1) == y)[read].float().mean()}
