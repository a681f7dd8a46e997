"""The adding problem against its definition (Le et al. 2015; Arjovsky et al. 2016)."""

from __future__ import annotations

import numpy as np
import torch

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
