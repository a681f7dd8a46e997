"""The Cell contract, for every cell in conf/cell/ (a new cell is tested the moment it exists)."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from rnnlab.cells import Cell, state_keys

from .conftest import CONF, default_dtype

CELLS = sorted(p.stem for p in (CONF / "cell").glob("*.yaml"))


def make_cell(name: str, input_size: int = 3, **overrides) -> Cell:
    cfg = OmegaConf.load(CONF / "cell" / f"{name}.yaml")
    cfg.hidden_size = 6
    cfg.update(overrides)
    torch.manual_seed(0)
    with default_dtype(torch.float64):
        return instantiate(cfg, input_size=input_size)


def step_through(cell: Cell, u: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    state = cell.init_state(u.shape[0])
    outputs = []
    for u_t in u.unbind(1):
        state = cell.step(u_t, state, None)
        outputs.append(state[0])
    return torch.stack(outputs, 1), state


@pytest.mark.parametrize("name", CELLS)
def test_cell_state_matches_its_declared_names_and_shapes(name):
    cell = make_cell(name)
    assert isinstance(cell, Cell) and state_keys(cell.state_names)[0] == "dL_dz"
    state = cell.init_state(4)
    assert len(state) == len(cell.state_names)
    assert all(s.shape == (4, 6) and s.dtype == torch.float64 for s in state)
    new = cell.step(torch.randn(4, 3, dtype=torch.float64), state, None)
    assert len(new) == len(state) and all(s.shape == (4, 6) for s in new)


@pytest.mark.parametrize("name", CELLS)
def test_cell_sequence_path_matches_stepping(name):
    cell = make_cell(name)
    u = torch.randn(5, 9, 3, dtype=torch.float64, requires_grad=True)
    fast = cell.sequence(u, cell.init_state(5))
    if fast is None:
        pytest.skip(f"{name} has no sequence path")
    expected, expected_state = step_through(cell, u)
    torch.testing.assert_close(fast[0], expected, rtol=1e-10, atol=1e-12)
    for a, b in zip(fast[1], expected_state):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    grads_fast = torch.autograd.grad(fast[0].square().sum(), [u, *cell.parameters()])
    grads_step = torch.autograd.grad(expected.square().sum(), [u, *cell.parameters()])
    for a, b in zip(grads_fast, grads_step):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


PROJECTED = [(name, {}) for name in CELLS] + [
    ("rnn", {"nonlinearity": "relu"}), ("rnn", {"nonlinearity": "identity"}),
    ("rnn", {"constraint": "orthogonal", "gain": 0.9})]


@pytest.mark.parametrize(("name", "overrides"), PROJECTED)
def test_stepping_from_the_input_projection_matches_stepping(name, overrides):
    """`projected_step(input_projection(u)[t], …)` is `step(u[:, t], …)` with the inputs
    time-major, as the model passes them: states, and the gradients of u and every parameter,
    over 9 steps."""
    cell = make_cell(name, **overrides)
    if cell.input_projection is None:
        pytest.skip(f"{name} has no input projection")
    u = torch.randn(5, 9, 3, dtype=torch.float64, requires_grad=True)
    g = cell.input_projection(u.transpose(0, 1))
    assert g.shape[:2] == (9, 5)
    state, outputs = cell.init_state(5), []
    for g_t in g.unbind(0):
        state = cell.projected_step(g_t, state, None)
        outputs.append(state[0])
    projected = torch.stack(outputs, 1)
    expected, expected_state = step_through(cell, u)
    torch.testing.assert_close(projected, expected, rtol=1e-12, atol=1e-14)
    for a, b in zip(state, expected_state):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    grads = torch.autograd.grad(projected.square().sum() + sum(s.sin().sum() for s in state),
                                [u, *cell.parameters()])
    grads_step = torch.autograd.grad(expected.square().sum()
                                     + sum(s.sin().sum() for s in expected_state),
                                     [u, *cell.parameters()])
    for a, b in zip(grads, grads_step):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
