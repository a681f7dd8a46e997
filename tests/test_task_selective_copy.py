"""Selective copying against its definition (Gu & Dao 2023; the S4 repository's generator)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rnnlab.config import ConfigError
from rnnlab.tasks import SelectiveCopy

T, K, V = 24, 4, 6  # tokens: noise 0, data 1 … 4, marker 5


def sample(n=256, seed=0, **options):
    task = SelectiveCopy(**{"seq_len": T, "num_tokens": K, "vocab_size": V, **options})
    batch = task.generate(n, torch.Generator().manual_seed(seed))
    return batch["x"].argmax(-1), batch["y"]


def test_selective_copy_context_holds_k_data_tokens_among_noise_then_k_markers():
    tokens, _ = sample()
    context = tokens[:, : T - K]
    assert (tokens[:, T - K:] == V - 1).all()
    assert ((context == 0) | ((context >= 1) & (context <= V - 2))).all()
    assert ((context != 0).sum(1) == K).all()


def test_selective_copy_target_is_the_data_tokens_in_order_of_appearance():
    tokens, y = sample()
    assert y.shape == (256, K) and y.dtype == torch.long
    for row, target in zip(tokens.tolist(), y.tolist()):
        assert target == [s for s in row[: T - K] if s != 0]


def test_selective_copy_positions_are_uniform_over_the_context():
    tokens, _ = sample(n=40_000)
    occupied = (tokens[:, : T - K] != 0).double().mean(0)
    assert torch.allclose(occupied, torch.full((T - K,), K / (T - K), dtype=torch.float64),
                          atol=0.01)


def test_selective_copy_baseline_matches_the_best_memoryless_predictor_on_a_large_sample():
    # The current input at every read step is the marker: the best guess is the token frequency
    # at each read position.
    _, y = sample(n=50_000, seed=1)
    frequency = F.one_hot(y, V).double().mean(0)  # (K, V)
    loss = -frequency.gather(1, y.T).log().mean().item()
    baseline = SelectiveCopy(seq_len=T, num_tokens=K, vocab_size=V).baseline
    assert baseline == math.log(V - 2)
    assert abs(loss - baseline) / baseline < 0.01


def test_selective_copy_accuracy_is_the_fraction_of_recalled_tokens():
    y = torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]])
    logits = F.one_hot(torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]]), V).float()
    task = SelectiveCopy(seq_len=T, num_tokens=K, vocab_size=V)
    assert task.metrics(logits, y)["accuracy"].item() == 0.5


def test_selective_copy_generates_t_10000_in_one_batch():
    tokens, y = sample(n=2, seq_len=10_000, num_tokens=16, vocab_size=16)
    assert tokens.shape == (2, 10_000) and y.shape == (2, 16)
    assert ((tokens[:, :-16] != 0).sum(1) == 16).all()


def test_selective_copy_rejects_more_tokens_than_fit():
    with pytest.raises(ConfigError, match=r"task.num_tokens must be at most task.seq_len / 2 = 12"):
        SelectiveCopy(seq_len=24, num_tokens=13)


def test_selective_copy_rejects_a_vocabulary_without_data_tokens():
    with pytest.raises(ConfigError, match=r"task.vocab_size must be an integer >= 3, got 2"):
        SelectiveCopy(vocab_size=2)
