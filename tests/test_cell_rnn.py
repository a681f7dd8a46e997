"""The Elman RNN's options against their definitions."""

from __future__ import annotations

import pytest
import torch

from .test_cells import make_cell, step_through


@pytest.mark.parametrize("gain", [0.5, 1.0, 1.7])
def test_orthogonal_init_scaled_by_gain_gives_gain_times_orthogonal(gain):
    W = make_cell("rnn", init="orthogonal", gain=gain).weight_hh.detach()
    torch.testing.assert_close(W.T @ W, gain**2 * torch.eye(6, dtype=W.dtype))


def test_identity_init_scaled_by_gain_is_gain_times_identity():
    W = make_cell("rnn", init="identity", gain=0.7).weight_hh.detach()
    torch.testing.assert_close(W, 0.7 * torch.eye(6, dtype=W.dtype))


def test_normal_init_has_entries_of_variance_one_over_hidden_size():
    W = make_cell("rnn", init="normal", hidden_size=400).weight_hh.detach()
    assert W.var().item() == pytest.approx(1 / 400, rel=0.02)


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu", "sigmoid", "identity"])
def test_step_applies_the_elman_equation(nonlinearity):
    cell = make_cell("rnn", nonlinearity=nonlinearity)
    u = torch.randn(4, 3, dtype=torch.float64)
    z = torch.randn(4, 6, dtype=torch.float64)
    pre = (cell.weight_hh @ z.T).T + (cell.weight_ih @ u.T).T + cell.bias_ih + cell.bias_hh
    phi = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid,
           "identity": lambda a: a}[nonlinearity]
    torch.testing.assert_close(cell.step(u, (z,), None)[0], phi(pre))


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_fused_sequence_matches_stepping_for_tanh_and_relu(nonlinearity):
    cell = make_cell("rnn", nonlinearity=nonlinearity)
    u = torch.randn(3, 12, 3, dtype=torch.float64)
    outputs, _ = cell.sequence(u, cell.init_state(3))
    torch.testing.assert_close(outputs, step_through(cell, u)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("nonlinearity", ["sigmoid", "identity"])
def test_sequence_path_is_absent_without_a_fused_kernel(nonlinearity):
    cell = make_cell("rnn", nonlinearity=nonlinearity)
    assert cell.sequence(torch.zeros(1, 2, 3, dtype=torch.float64), cell.init_state(1)) is None
