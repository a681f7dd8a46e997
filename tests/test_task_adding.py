"""The adding problem against its definition (Le et al. 2015; Arjovsky et al. 2016)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rnnlab.config import ConfigError
from rnnlab.tasks import Adding


def sample(T=20, B=256, seed=0):
    return Adding(seq_len=T, batch_size=B).generate(B, torch.Generator().manual_seed(seed))


def test_adding_has_two_markers_one_in_each_half():
    T = 21
    markers = sample(T)["x"][..., 1].numpy()
    assert set(np.unique(markers)) == {0.0, 1.0}
    assert (markers.sum(1) == 2).all()
    assert (markers[:, : T // 2].sum(1) == 1).all() and (markers[:, T // 2:].sum(1) == 1).all()


def test_adding_target_is_sum_of_the_marked_values():
    batch = sample()
    x, y = batch["x"].numpy(), batch["y"].numpy()
    assert y.shape == (256, 1, 1)
    for values, markers, target in zip(x[..., 0], x[..., 1], y[:, 0, 0]):
        assert np.isclose(target, sum(v for v, m in zip(values, markers) if m == 1.0))
    assert ((x[..., 0] >= 0) & (x[..., 0] <= 1)).all()


def test_adding_baseline_matches_predicting_one_on_a_large_sample():
    y = sample(T=50, B=200_000)["y"]
    assert abs(((y - 1.0) ** 2).mean().item() - Adding.baseline) / Adding.baseline < 0.01


def test_adding_markers_are_uniform_within_each_half():
    T = 20
    markers = sample(T, B=40_000)["x"][..., 1].double().mean(0)
    assert torch.allclose(markers, torch.full((T,), 1 / 10, dtype=torch.float64), atol=0.006)


def test_adding_generates_t_10000_in_one_batch():
    x = sample(T=10_000, B=2)["x"]
    assert x.shape == (2, 10_000, 2) and (x[..., 1].sum(1) == 2).all()


def test_adding_rejects_t_below_two():
    with pytest.raises(ConfigError, match=r"task.seq_len must be an integer >= 2, got 1"):
        Adding(seq_len=1)
