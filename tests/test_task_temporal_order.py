"""The temporal order problem against its definition (Hochreiter & Schmidhuber 1997, exp. 6a)."""

from __future__ import annotations

import math

import pytest
import torch

from rnnlab.config import ConfigError
from rnnlab.tasks import TemporalOrder
from rnnlab.tasks.temporal_order import relevant_windows

a, b, c, d, X, Y, E, B = range(8)
CLASS = {(X, X): 0, (X, Y): 1, (Y, X): 2, (Y, Y): 3}  # the paper's Q, R, S, U


def sample(T=20, n=256, seed=0):
    batch = TemporalOrder(seq_len=T).generate(n, torch.Generator().manual_seed(seed))
    return batch["x"], batch["y"]


def test_temporal_order_windows_are_the_papers_at_t_100_and_scale_with_t():
    assert relevant_windows(100) == ((10, 20), (50, 60))
    assert relevant_windows(1000) == ((100, 200), (500, 600))
    assert relevant_windows(10) == ((1, 2), (5, 6))


def test_temporal_order_sequence_is_e_distractors_two_relevant_symbols_b():
    T = 20
    x, _ = sample(T)
    assert x.shape == (256, T, 8) and (x.sum(-1) == 1).all()
    for row in x.argmax(-1).tolist():
        assert row[0] == E and row[-1] == B
        relevant = [t for t, s in enumerate(row) if s in (X, Y)]
        assert len(relevant) == 2
        assert 2 <= relevant[0] <= 4 and 10 <= relevant[1] <= 12
        assert all(s in (a, b, c, d) for t, s in enumerate(row[1:-1], 1) if t not in relevant)


def test_temporal_order_class_is_the_order_of_the_two_relevant_symbols():
    x, y = sample()
    assert y.shape == (256, 1) and y.dtype == torch.long
    for row, target in zip(x.argmax(-1).tolist(), y[:, 0].tolist()):
        assert target == CLASS[tuple(s for s in row if s in (X, Y))]


def test_temporal_order_positions_cover_each_window_uniformly():
    T = 100
    tokens = sample(T, n=22_000)[0].argmax(-1)
    positions = ((tokens == X) | (tokens == Y)).nonzero()[:, 1]
    counts = torch.bincount(positions, minlength=T).double() / 22_000
    expected = torch.zeros(T, dtype=torch.float64)
    expected[10:21] = expected[50:61] = 1 / 11
    assert torch.allclose(counts, expected, atol=0.01)


def test_temporal_order_baseline_matches_the_best_memoryless_predictor_on_a_large_sample():
    # The last input is always B, so a memoryless predictor can only use the class frequencies.
    _, y = sample(n=100_000, seed=1)
    frequency = torch.bincount(y[:, 0], minlength=4).double() / y.shape[0]
    loss = -frequency[y[:, 0]].log().mean().item()
    assert TemporalOrder.baseline == math.log(4)
    assert abs(loss - TemporalOrder.baseline) / TemporalOrder.baseline < 0.01


def test_temporal_order_accuracy_is_the_fraction_of_correct_classes():
    y = torch.tensor([[0], [1], [2], [3]])
    logits = torch.zeros(4, 1, 4)
    logits[:, 0, 0] = 1.0  # always class 0: right once in four
    assert TemporalOrder(seq_len=10).metrics(logits, y)["accuracy"].item() == 0.25


def test_temporal_order_generates_t_10000_in_one_batch():
    x, _ = sample(T=10_000, n=2)
    assert x.shape == (2, 10_000, 8) and (x.argmax(-1)[:, -1] == B).all()


def test_temporal_order_rejects_t_too_small_for_the_windows():
    with pytest.raises(ConfigError, match=r"task.seq_len must be an integer >= 10, got 9"):
        TemporalOrder(seq_len=9)
