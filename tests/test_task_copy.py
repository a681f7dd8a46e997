"""The copy memory task against its definition (Arjovsky, Shah & Bengio 2016, §4.1)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rnnlab.config import ConfigError
from rnnlab.tasks import Copy


def sample(delay=5, B=64, seed=0):
    return Copy(delay=delay, batch_size=B).generate(B, torch.Generator().manual_seed(seed))


def test_copy_has_delay_plus_20_steps_of_one_hot_categories():
    batch = sample(delay=7)
    assert batch["x"].shape == (64, 27, 10) and batch["y"].shape == (64, 27)
    assert (batch["x"].sum(-1) == 1).all() and set(batch["x"].unique().tolist()) == {0.0, 1.0}


def test_copy_input_is_symbols_blanks_delimiter_blanks():
    delay = 6
    inputs = sample(delay)["x"].argmax(-1)
    for row in inputs.tolist():
        symbols = row[:10]
        assert all(0 <= s < 8 for s in symbols)
        assert row == symbols + [8] * (delay - 1) + [9] + [8] * 10


def test_copy_target_is_blanks_then_the_ten_symbols_in_order():
    delay = 6
    batch = sample(delay)
    for row, target in zip(batch["x"].argmax(-1).tolist(), batch["y"].tolist()):
        assert target == [8] * (delay + 10) + row[:10]


def test_copy_symbols_are_uniform_over_the_first_eight_categories():
    symbols = sample(B=20_000)["y"][:, -10:].flatten()
    frequencies = torch.bincount(symbols, minlength=10).double() / symbols.numel()
    assert torch.allclose(frequencies[:8], torch.full((8,), 1 / 8, dtype=torch.float64), atol=0.005)
    assert frequencies[8:].sum() == 0


def test_copy_baseline_matches_the_best_memoryless_predictor_on_a_large_sample():
    # The best predictor of y_t from t and x_t alone: the empirical law of y given (t, x_t).
    task = Copy(delay=10)
    batch = task.generate(50_000, torch.Generator().manual_seed(1))
    y, x = batch["y"], batch["x"].argmax(-1)
    cell = torch.arange(task.seq_len) * 10 + x  # (B, T) index of (t, x_t)
    counts = torch.zeros(task.seq_len * 10, 10, dtype=torch.float64)
    counts.index_put_((cell.flatten(), y.flatten()), torch.ones(y.numel(), dtype=torch.float64),
                      accumulate=True)
    probability = counts / counts.sum(1, keepdim=True).clamp_min(1)
    loss = -probability[cell.flatten(), y.flatten()].log().mean().item()
    assert task.baseline == 10 * math.log(8) / 30
    assert abs(loss - task.baseline) / task.baseline < 0.01


def test_copy_accuracy_counts_only_the_recalled_symbols():
    y = sample(delay=3, B=4)["y"]
    logits = F.one_hot(y, 10).float()
    logits[0, -10:] = F.one_hot((y[0, -10:] + 1) % 8, 10).float()  # row 0 recalls nothing
    logits[:, :13] = 0.0  # predictions on the blank steps do not count
    assert Copy(delay=3).metrics(logits, y)["accuracy"].item() == pytest.approx(3 / 4)


def test_copy_generates_delay_10000_in_one_batch():
    batch = sample(delay=10_000, B=2)
    assert batch["x"].shape == (2, 10_020, 10)
    assert (batch["x"].argmax(-1)[:, 10_009] == 9).all()


def test_copy_rejects_a_delay_below_one():
    with pytest.raises(ConfigError,
                       match=r"task.delay must be an integer >= 1, got 0 \(set task.delay=...\)"):
        Copy(delay=0)
