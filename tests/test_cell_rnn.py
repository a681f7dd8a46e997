"""The Elman RNN's options against their definitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rnnlab import gradflow
from rnnlab.cells import ElmanRNN
from rnnlab.config import ConfigError
from rnnlab.tasks import Adding

from .conftest import float64_model
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


# --- the orthogonal constraint (expRNN) ------------------------------------------------------
def linear_model(seed: int = 0, **cell):
    """A float64 model on an Elman RNN, with the encoder and decoder it trains through."""
    cell = {"_target_": "rnnlab.cells.rnn.ElmanRNN", "hidden_size": 8, **cell}
    return float64_model(cell, seed=seed)


def adding_batch(T: int, seed: int) -> dict:
    batch = Adding(seq_len=T, batch_size=8).generate(8, torch.Generator().manual_seed(seed))
    return {k: v.double() for k, v in batch.items()}


def train_steps(model, steps: int, lr: float = 0.05) -> None:
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for seed in range(steps):
        batch = adding_batch(20, seed)
        optimizer.zero_grad()
        model.loss_fn(model(batch["x"]), batch["y"]).backward()
        optimizer.step()


@pytest.mark.parametrize("gain", [0.9, 1.0])
def test_orthogonal_constraint_keeps_W_gain_times_orthogonal_through_training(gain):
    model = linear_model(nonlinearity="tanh", constraint="orthogonal", gain=gain)
    W0 = model.cell.weight_hh.detach().clone()
    train_steps(model, 5)
    W = model.cell.weight_hh.detach()
    assert (W - W0).abs().max() > 1e-2  # training moved W …
    torch.testing.assert_close(W.T @ W, gain**2 * torch.eye(8, dtype=W.dtype),
                               rtol=0, atol=1e-12)  # … along the orthogonal group


def linear_profile_after_training(**cell) -> np.ndarray:
    model = linear_model(nonlinearity="identity", **cell)
    train_steps(model, 5)
    dL_dz = gradflow.grad_flow(model, adding_batch(30, seed=100)).profiles["dL_dz"]
    return dL_dz / dL_dz[-1]


def test_orthogonal_constraint_keeps_the_linear_gradient_norm_constant_in_training():
    ratio = linear_profile_after_training(init="orthogonal", constraint="orthogonal")
    np.testing.assert_allclose(ratio, np.ones(30), rtol=1e-9)


def test_unconstrained_orthogonal_init_loses_norm_preservation_in_training():
    ratio = linear_profile_after_training(init="orthogonal", constraint="none")
    assert np.abs(np.log10(ratio)).max() > 0.01


@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
def test_orthogonal_constraint_fused_sequence_matches_stepping(nonlinearity):
    cell = make_cell("rnn", nonlinearity=nonlinearity, constraint="orthogonal", gain=0.8)
    u = torch.randn(3, 12, 3, dtype=torch.float64)
    outputs, _ = cell.sequence(u, cell.init_state(3))
    expected = step_through(cell, u)[0]
    torch.testing.assert_close(outputs, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(outputs.square().sum(), list(cell.parameters()))
    expected_grads = torch.autograd.grad(expected.square().sum(), list(cell.parameters()))
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_unknown_constraint_names_key_and_fix():
    with pytest.raises(ConfigError, match=r"cell.constraint must be one of none, orthogonal, "
                                          r"got 'unitary' \(set cell.constraint=...\)"):
        ElmanRNN(input_size=3, constraint="unitary")


def test_orthogonal_constraint_survives_a_state_dict_round_trip():
    trained = linear_model(nonlinearity="tanh", constraint="orthogonal", gain=0.9)
    train_steps(trained, 3)
    # a fresh model draws other weights, and another orthogonal base
    fresh = linear_model(seed=1, nonlinearity="tanh", constraint="orthogonal", gain=0.9)
    assert not torch.allclose(fresh.cell.weight_hh, trained.cell.weight_hh)
    fresh.load_state_dict(trained.state_dict())
    assert torch.equal(fresh.cell.weight_hh, trained.cell.weight_hh)
