"""The GRU and LSTM against their equations, torch.nn.GRU/LSTM, and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rnnlab import gradflow
from rnnlab.cells import GRU, LSTM
from rnnlab.cells.base import state_keys
from rnnlab.config import ConfigError
from rnnlab.tasks import Adding

from .conftest import float64_model
from .test_cells import make_cell, step_through

MODULES = {"gru": torch.nn.GRU, "lstm": torch.nn.LSTM}


def gates(cell, u, h, n):
    """The n gate pre-activations W_i· u + b_i· and W_h· h + b_h·, each a list of n (B, H)."""
    x = (u @ cell.weight_ih.T + cell.bias_ih).chunk(n, dim=-1)
    r = (h @ cell.weight_hh.T + cell.bias_hh).chunk(n, dim=-1)
    return x, r


def test_gru_step_applies_the_gru_equations():
    cell = make_cell("gru")
    u, h = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    (xr, xz, xn), (hr, hz, hn) = gates(cell, u, h, 3)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    torch.testing.assert_close(cell.step(u, (h,), None)[0], (1 - z) * n + z * h,
                               rtol=1e-12, atol=1e-12)


def test_lstm_step_applies_the_lstm_equations():
    cell = make_cell("lstm")
    u = torch.randn(4, 3, dtype=torch.float64)
    h, c = torch.randn(4, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)
    x, r = gates(cell, u, h, 4)
    i, f, g, o = (a + b for a, b in zip(x, r))
    c_next = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h_next = torch.sigmoid(o) * torch.tanh(c_next)
    got = cell.step(u, (h, c), None)
    torch.testing.assert_close(got[0], h_next, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], c_next, rtol=1e-12, atol=1e-12)


def torch_module_with_cell_parameters(name, cell):
    module = MODULES[name](cell.input_size, cell.hidden_size, batch_first=True).double()
    with torch.no_grad():
        for key in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(module, f"{key}_l0").copy_(getattr(cell, key))
    return module


@pytest.mark.parametrize("path", ["step", "sequence"])
@pytest.mark.parametrize("name", ["gru", "lstm"])
def test_cell_matches_torch_module_outputs_and_parameter_gradients(name, path):
    cell = make_cell(name, init="orthogonal")
    module = torch_module_with_cell_parameters(name, cell)
    u = torch.randn(3, 11, 3, dtype=torch.float64)
    target = torch.randn(3, 11, 6, dtype=torch.float64)
    if path == "step":
        outputs, state = step_through(cell, u)
    else:
        outputs, state = cell.sequence(u, cell.init_state(3))
    expected, expected_state = module(u)
    expected_state = expected_state if name == "lstm" else (expected_state,)
    torch.testing.assert_close(outputs, expected, rtol=1e-10, atol=1e-12)
    for ours, theirs in zip(state, expected_state):
        torch.testing.assert_close(ours, theirs.squeeze(0), rtol=1e-10, atol=1e-12)
    (outputs - target).square().sum().backward()
    (expected - target).square().sum().backward()
    for key in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        torch.testing.assert_close(getattr(cell, key).grad, getattr(module, f"{key}_l0").grad,
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("forget_bias", [0.0, 1.0, 2.5])
def test_lstm_forget_bias_is_the_initial_total_forget_gate_bias(forget_bias):
    cell = make_cell("lstm", forget_bias=forget_bias)
    H = 6
    total = (cell.bias_ih + cell.bias_hh).detach()
    torch.testing.assert_close(total[H:2 * H], torch.full((H,), forget_bias, dtype=total.dtype))
    # with zero input and state, the forget gate opens to σ(forget_bias), the others are U(±2/√H)
    assert total[:H].abs().max() <= 2 / H**0.5 and total[2 * H:].abs().max() <= 2 / H**0.5


@pytest.mark.parametrize("name", ["gru", "lstm"])
def test_orthogonal_init_makes_each_recurrent_gate_block_orthogonal(name):
    cell = make_cell(name, init="orthogonal")
    for block in cell.weight_hh.detach().split(6):
        torch.testing.assert_close(block.T @ block, torch.eye(6, dtype=block.dtype))


@pytest.mark.parametrize(("cell", "override", "message"), [
    (GRU, {"init": "xavier"}, "cell.init must be one of default, orthogonal, got 'xavier'"),
    (LSTM, {"forget_bias": "one"}, "cell.forget_bias must be a finite number, got 'one'"),
    (LSTM, {"hidden_size": 0}, "cell.hidden_size must be an integer >= 1, got 0"),
])
def test_bad_gated_setting_names_key_and_fix(cell, override, message):
    with pytest.raises(ConfigError) as error:
        cell(input_size=3, **override)
    key = next(iter(override))
    assert message in str(error.value) and f"(set cell.{key}=...)" in str(error.value)


# --- the logged profile against finite differences -------------------------------------------


def assert_probe_gradients_match_finite_differences(model, batch, times, eps=1e-6, rel=1e-6):
    """For each state s and step t: (L(+εv) − L(−εv))/2ε = <∂L/∂s_t, v> for a random v, with
    the perturbation added through the model's probe; and the logged norm is ||∂L/∂s_t||."""
    x, y = batch["x"], batch["y"]
    B, T = x.shape[:2]
    probes = model.make_probes(B, T)
    grads = torch.autograd.grad(model.loss_fn(model(x, batch.get("dt"), probes), y), probes)
    profiles = gradflow.grad_flow(model, batch).profiles
    generator = torch.Generator().manual_seed(1)
    for s, key in enumerate(state_keys(model.cell.state_names)):
        norms = grads[s].flatten(1).norm(dim=1).numpy()
        np.testing.assert_allclose(profiles[key], norms, rtol=1e-12)
        for t in times:
            v = torch.randn(B, model.cell.hidden_size, generator=generator, dtype=x.dtype)
            losses = []
            for sign in (1.0, -1.0):
                shifted = [torch.zeros_like(p) for p in probes]
                shifted[s][t] = sign * eps * v
                with torch.no_grad():
                    losses.append(model.loss_fn(model(x, batch.get("dt"), tuple(shifted)), y))
            finite_difference = ((losses[0] - losses[1]) / (2 * eps)).item()
            analytic = (grads[s][t] * v).sum().item()
            assert finite_difference == pytest.approx(analytic, rel=rel, abs=1e-12), (key, t)


@pytest.mark.parametrize("name", ["gru", "lstm"])
def test_logged_profile_matches_finite_differences(name):
    target = {"gru": "rnnlab.cells.gated.GRU", "lstm": "rnnlab.cells.gated.LSTM"}[name]
    model = float64_model({"_target_": target, "hidden_size": 5}, encoder_size=3)
    T = 12
    batch = Adding(seq_len=T, batch_size=4).generate(4, torch.Generator().manual_seed(0))
    batch = {k: v.double() for k, v in batch.items()}
    assert_probe_gradients_match_finite_differences(model, batch, times=[0, 5, T - 1])
