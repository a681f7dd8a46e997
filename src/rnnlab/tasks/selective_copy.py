"""Selective copying (Gu & Dao 2023, §3.1 and appendix E.1; the generator of the S4 repository).

A vocabulary of V = ``vocab_size`` tokens, fed one-hot: noise 0, data tokens 1 … V − 2 and the
marker V − 1. A sequence of T steps is a context of T − K steps followed by K markers:

    input   noise everywhere except K data tokens at K distinct random positions | K markers
    target  (not read)                                                           | the K data tokens

The data tokens are drawn uniformly with replacement, their positions uniformly among the
C(T − K, K) subsets of the context, and they are recalled in the order they appeared. Unlike the
copy task the spacing varies, so a model must select tokens by content, not by time. Cross-entropy
is read on the last K steps; the metric is the accuracy of the recalled tokens.

Baseline: each recalled token is uniform over the V − 2 data tokens whatever the current input
(a marker), so the best memoryless guess is that distribution, with cross-entropy log(V − 2).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from rnnlab.config import require, require_int
from rnnlab.tasks.base import Batch, Task

NOISE = 0


class SelectiveCopy(Task):
    """x: (B, T, V) one-hot; y: (B, K) data tokens in 1 … V − 2, read on the last K steps."""

    loss = "cross_entropy"

    def __init__(self, seq_len: int = 64, num_tokens: int = 8, vocab_size: int = 16, **kwargs):
        super().__init__(**kwargs)
        self.seq_len = require_int("task.seq_len", seq_len, minimum=2)
        self.num_tokens = require_int("task.num_tokens", num_tokens)
        require(2 * num_tokens <= seq_len, "task.num_tokens", num_tokens,
                f"at most task.seq_len / 2 = {seq_len // 2} (K data tokens and K markers must fit "
                "in T)")
        self.vocab_size = require_int("task.vocab_size", vocab_size, minimum=3)
        self.input_size = self.output_size = vocab_size
        self.marker = vocab_size - 1
        self.n_out = num_tokens
        self.baseline = math.log(vocab_size - 2)

    def generate(self, batch_size: int, generator: torch.Generator) -> Batch:
        B, T, K = batch_size, self.seq_len, self.num_tokens
        data = torch.randint(1, self.marker, (B, K), generator=generator)
        # The K largest of T − K i.i.d. uniforms sit at a uniformly random K-subset of positions.
        noise = torch.rand(B, T - K, generator=generator)
        positions = noise.topk(K, dim=1).indices.sort(dim=1).values
        tokens = torch.full((B, T), NOISE)
        tokens.scatter_(1, positions, data)
        tokens[:, T - K:] = self.marker
        return {"x": F.one_hot(tokens, self.input_size).float(), "y": data}

    def metrics(self, y_hat: Tensor, y: Tensor) -> dict[str, Tensor]:
        return {"accuracy": (y_hat.argmax(-1) == y).float().mean()}
