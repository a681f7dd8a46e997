"""The neural ODE cell against its definition, torchdiffeq, finite differences and the adjoint."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor
from torchdiffeq import odeint
from torchdiffeq._impl.odeint import SOLVERS as TORCHDIFFEQ_METHODS

from rnnlab import gradflow
from rnnlab.cells import NeuralODE
from rnnlab.cells.ode import ADAPTIVE, FIXED_GRID, SOLVERS, WHOLE_SEQUENCE_SOLVERS, Dynamics
from rnnlab.config import ConfigError
from rnnlab.model import RecurrentModel
from rnnlab.train import train

from .conftest import default_dtype
from .test_cell_gated import assert_probe_gradients_match_finite_differences
from .test_cells import step_through

SINGLE_STEP = [s for s in WHOLE_SEQUENCE_SOLVERS if s in FIXED_GRID]
RK_ADAPTIVE = [s for s in WHOLE_SEQUENCE_SOLVERS if s in ADAPTIVE]


def node(dtype=torch.float64, **kwargs) -> NeuralODE:
    """A small cell: input 3, hidden 4, g with one hidden layer of 8, δt = 0.2."""
    arguments = {"input_size": 3, "hidden_size": 4, "width": 8, "depth": 1, "dt": 0.2, **kwargs}
    with default_dtype(dtype):
        torch.manual_seed(0)
        return NeuralODE(**arguments)


def node_model(dtype=torch.float64, **cell) -> RecurrentModel:
    cell = {"_target_": "rnnlab.cells.ode.NeuralODE", "hidden_size": 4, "width": 8, "depth": 1,
            "dt": 0.3, **cell}
    with default_dtype(dtype):
        torch.manual_seed(0)
        return RecurrentModel(cell=cell, input_size=2, output_size=1, n_out=1, loss="mse",
                              encoder_size=3)


def regression_batch(T: int, B: int = 3, dtype=torch.float64, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(B, T, 2, generator=generator).to(dtype),
            "y": torch.randn(B, 1, 1, generator=generator).to(dtype)}


# Tolerances for adaptive methods: tight, but loose enough that the second-order ones stay quick.
TOLERANCE = {"dopri5": 1e-9, "dopri8": 1e-9, "bosh3": 1e-9, "scipy_solver": 1e-9,
             "fehlberg2": 1e-7, "adaptive_heun": 1e-7}


def solver_settings(solver: str) -> dict:
    """Tight tolerances for adaptive methods; SciPy's integrators need the adjoint."""
    settings = {"solver": solver}
    if solver in ADAPTIVE:
        settings.update(rtol=TOLERANCE[solver], atol=TOLERANCE[solver])
    if solver == "scipy_solver":
        settings["adjoint"] = True
    return settings


# --- definition --------------------------------------------------------------------------------
def test_every_torchdiffeq_method_is_a_solver_choice():
    assert set(TORCHDIFFEQ_METHODS) == set(SOLVERS) - {"manual_euler"}
    assert set(FIXED_GRID) | set(ADAPTIVE) == set(TORCHDIFFEQ_METHODS)


def test_dynamics_is_an_mlp_of_the_given_width_depth_and_activation():
    torch.manual_seed(0)
    g = Dynamics(input_size=3, hidden_size=4, width=5, depth=2, activation="softplus")
    linears = [m for m in g.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(7, 5), (5, 5), (5, 4)]
    h, z = torch.randn(2, 3), torch.randn(2, 4)
    a = F.softplus(F.linear(torch.cat([h, z], -1), linears[0].weight, linears[0].bias))
    a = F.softplus(F.linear(a, linears[1].weight, linears[1].bias))
    torch.testing.assert_close(g(h, z), F.linear(a, linears[2].weight, linears[2].bias))


def test_manual_euler_step_is_z_plus_g_times_dt():
    cell = node(solver="manual_euler")
    u, z = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    assert torch.equal(cell.step(u, (z,), None)[0], z + cell.g(u, z) * 0.2)
    dt = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5], dtype=torch.float64)
    assert torch.equal(cell.step(u, (z,), dt)[0], z + cell.g(u, z) * dt[:, None])


@pytest.mark.parametrize("solver", sorted(TORCHDIFFEQ_METHODS))
def test_step_integrates_dz_dt_equals_g_over_one_interval(solver):
    cell = node(**solver_settings(solver))
    u, z = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    got = cell.step(u, (z,), None)[0]
    times = torch.tensor([0.0, 0.2], dtype=torch.float64)
    if solver in FIXED_GRID:  # the same method, in time units: the same steps
        expected = odeint(lambda t, y: cell.g(u, y), z, times, method=solver)[-1]
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    else:  # an adaptive method reaches the exact flow to its tolerance
        expected = odeint(lambda t, y: cell.g(u, y), z, times, method="dopri8", rtol=1e-13,
                          atol=1e-14)[-1]
        torch.testing.assert_close(got, expected, rtol=0, atol=100 * TOLERANCE[solver])


@pytest.mark.parametrize("solver", ["manual_euler", "rk4", "dopri5"])
def test_per_sample_dt_integrates_each_sample_over_its_own_interval(solver):
    cell = node(**solver_settings(solver))
    u, z = torch.randn(3, 3, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    dt = torch.tensor([0.05, 0.2, 0.6], dtype=torch.float64)
    got = cell.step(u, (z,), dt)[0]
    for b in range(3):
        cell.dt = float(dt[b])
        expected = cell.step(u[b:b + 1], (z[b:b + 1],), None)[0]
        torch.testing.assert_close(got[b:b + 1], expected, rtol=0, atol=1e-8)


def test_euler_gives_the_same_outputs_and_profile_as_manual_euler_in_float32():
    batch = regression_batch(T=20, dtype=torch.float32)
    manual = node_model(torch.float32, solver="manual_euler", hidden_size=8)
    euler = node_model(torch.float32, solver="euler", hidden_size=8)
    for a, b in zip(manual.parameters(), euler.parameters()):
        assert torch.equal(a, b)
    torch.testing.assert_close(euler(batch["x"]), manual(batch["x"]), rtol=1e-6, atol=0)
    np.testing.assert_allclose(gradflow.grad_flow(euler, batch).profiles["dL_dz"],
                               gradflow.grad_flow(manual, batch).profiles["dL_dz"], rtol=1e-6)


# --- the logged profile is exact for every solver ----------------------------------------------
@pytest.mark.parametrize("solver", SOLVERS)
def test_logged_profile_matches_finite_differences(solver):
    settings = solver_settings(solver)
    model = node_model(**settings)
    T = 6
    # Adaptive step sizes are chosen from the state without a gradient, and the adjoint is the
    # gradient of the continuous problem: both agree with finite differences to the tolerance.
    exact = solver in FIXED_GRID or solver == "manual_euler"
    assert_probe_gradients_match_finite_differences(
        model, regression_batch(T), times=[0, 3, T - 1], rel=1e-6 if exact else 1e-4)


# --- the whole-sequence path -------------------------------------------------------------------
@pytest.mark.parametrize("solver", SINGLE_STEP)
def test_whole_sequence_matches_interval_by_interval_for_fixed_grid_methods(solver):
    cell = node(solver=solver, whole_sequence=True)
    u = torch.randn(3, 9, 3, dtype=torch.float64, requires_grad=True)
    outputs, (last,) = cell.sequence(u, cell.init_state(3))
    expected, (expected_last,) = step_through(cell, u)
    torch.testing.assert_close(outputs, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last, expected_last, rtol=1e-12, atol=1e-12)
    inputs = [u, *cell.parameters()]
    grads = torch.autograd.grad(outputs.square().sum(), inputs)
    expected_grads = torch.autograd.grad(expected.square().sum(), inputs)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("n_out", [1, 4, 9])
@pytest.mark.parametrize("solver", ["euler", "rk4"])
def test_whole_sequence_from_inputs_gives_the_read_states_and_their_gradients(solver, n_out):
    cell = node(solver=solver, whole_sequence=True)
    encoder = torch.nn.Linear(2, 3).double()
    x = torch.randn(3, 9, 2, dtype=torch.float64, requires_grad=True)
    read = cell.sequence_from_inputs(x, encoder, cell.init_state(3), n_out)
    expected = step_through(cell, encoder(x))[0][:, 9 - n_out:]
    torch.testing.assert_close(read, expected, rtol=1e-12, atol=1e-12)
    inputs = [x, *encoder.parameters(), *cell.parameters()]
    weights = torch.randn_like(expected)
    for a, b in zip(torch.autograd.grad((read * weights).sum(), inputs),
                    torch.autograd.grad((expected * weights).sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver", RK_ADAPTIVE)
def test_whole_sequence_matches_interval_by_interval_to_tolerance_for_adaptive_methods(solver):
    cell = node(whole_sequence=True, **solver_settings(solver))
    u = torch.randn(3, 6, 3, dtype=torch.float64)
    outputs, _ = cell.sequence(u, cell.init_state(3))
    torch.testing.assert_close(outputs, step_through(cell, u)[0], rtol=0,
                               atol=100 * TOLERANCE[solver])


def test_whole_sequence_rk4_evaluates_every_stage_on_its_own_intervals_input():
    cell = node(solver="rk4", whole_sequence=True)
    seen = []
    rate = cell.rate
    cell.rate = lambda h, z, scale: seen.append(h) or rate(h, z, scale)
    u = torch.randn(2, 5, 3, dtype=torch.float64)
    cell.sequence(u, cell.init_state(2))
    assert len(seen) == 4 * 5  # rk4: four stages per interval, the last one on t_{k+1}
    for call, h in enumerate(seen):
        assert torch.equal(h, u[:, call // 4]), f"stage {call % 4} of interval {call // 4}"


@pytest.mark.parametrize("solver", sorted(set(SOLVERS) - set(WHOLE_SEQUENCE_SOLVERS)))
def test_whole_sequence_is_refused_for_methods_that_cannot_take_it(solver):
    with pytest.raises(ConfigError, match=rf"cell.whole_sequence must be false with "
                                          rf"cell.solver={solver} .*\(set cell.whole_sequence="):
        node(solver=solver, whole_sequence=True, adjoint=solver == "scipy_solver")


def adjoint_gradients(solver: str, whole_sequence: bool, dt: float, segment: int = 0,
                      n_out: int = 3, adjoint: bool = True, **cell) -> tuple[Tensor, Tensor]:
    model = node_model(solver=solver, adjoint=adjoint, whole_sequence=whole_sequence, dt=dt,
                       adjoint_segment=segment, **cell)
    model.n_out = n_out
    x = torch.randn(5, 12, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y_hat = model(x)
    model.loss_fn(y_hat, torch.ones(5, n_out, 1, dtype=torch.float64)).backward()
    return y_hat.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize(("solver", "bound"), [("euler", 1e-2), ("midpoint", 1e-5),
                                               ("rk4", 1e-8)])
def test_whole_grid_adjoint_matches_stepping_adjoint_to_the_solvers_error(solver, bound):
    # Same forward; the backward reconstructs z from z_T instead of from each stored z_k.
    differences = []
    for dt in (0.2, 0.1):
        out_step, grad_step = adjoint_gradients(solver, False, dt)
        out_grid, grad_grid = adjoint_gradients(solver, True, dt)
        torch.testing.assert_close(out_grid, out_step, rtol=1e-12, atol=1e-14)
        differences.append(float((grad_grid - grad_step).norm() / grad_step.norm()))
    assert differences[1] < differences[0]  # shrinks with δt
    assert differences[0] < bound


@pytest.mark.parametrize("solver", ["euler", "rk4"])
@pytest.mark.parametrize("n_out", [1, 3, 12])
def test_adjoint_segments_of_one_interval_are_the_stepping_adjoint(solver, n_out):
    # Each segment restarts the backward reconstruction at its stored start, like stepping.
    out_step, grad_step = adjoint_gradients(solver, False, 0.2, n_out=n_out)
    out_grid, grad_grid = adjoint_gradients(solver, True, 0.2, segment=1, n_out=n_out)
    torch.testing.assert_close(out_grid, out_step, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_grid, grad_step, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("n_out", [1, 5, 12])
def test_adjoint_gradient_moves_from_stepping_as_segments_grow(n_out):
    # Reads that span segments (n_out = 5 with segments of 2 or 5) come out at the right times;
    # the reconstruction error grows with the segment: 1 (stepping) < 2 < 5 < 12 (whole grid).
    # odeint_adjoint restarts its reconstruction at every output time too, so with a read at
    # every step (n_out = T) every segment length gives stepping's gradients.
    out_step, grad_step = adjoint_gradients("euler", False, 0.2, n_out=n_out)
    differences = []
    for segment in (2, 5, 0):
        out, grad = adjoint_gradients("euler", True, 0.2, segment=segment, n_out=n_out)
        torch.testing.assert_close(out, out_step, rtol=1e-12, atol=1e-14)
        differences.append(float((grad - grad_step).norm() / grad_step.norm()))
    if n_out == 12:
        assert max(differences) < 1e-12
    else:
        assert 1e-8 < differences[0] < differences[1] < differences[2] < 1e-2


# --- the adjoint -------------------------------------------------------------------------------
def adjoint_and_discrete_parameter_gradients(dt: float, T: int):
    u = torch.ones(2, T, 3, dtype=torch.float64)  # the same input at every time: one ODE for all δt
    target = torch.linspace(-1, 1, 4, dtype=torch.float64)
    grads = []
    for settings in ({"solver": "euler", "adjoint": True}, {"solver": "manual_euler"}):
        cell = node(dt=dt, **settings)
        (z,) = step_through(cell, u)[1]
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(
            (z - target).square().sum(), list(cell.parameters()))]))
    return grads


def test_adjoint_gradient_differs_from_the_discrete_gradient_by_order_dt():
    differences = []
    for dt, T in ((0.2, 6), (0.1, 12), (0.05, 24)):  # the same time span, T·δt = 1.2
        adjoint, discrete = adjoint_and_discrete_parameter_gradients(dt, T)
        differences.append(((adjoint - discrete).norm() / discrete.norm()).item())
    assert differences[-1] > 1e-6  # not the discrete scheme's gradient …
    for coarse, fine in zip(differences, differences[1:]):
        assert 0.35 < fine / coarse < 0.65  # … but within O(δt) of it: halving δt halves it


def test_adjoint_sends_a_gradient_to_the_encoder():
    batch = regression_batch(T=10)
    grads = {}
    for name, settings in {"adjoint": {"solver": "euler", "adjoint": True},
                           "discrete": {"solver": "manual_euler"}}.items():
        model = node_model(dt=0.05, **settings)
        model.loss_fn(model(batch["x"]), batch["y"]).backward()
        grads[name] = model.encoder.weight.grad
    assert grads["adjoint"].abs().min() > 0
    torch.testing.assert_close(grads["adjoint"], grads["discrete"], rtol=0.05, atol=0)


def test_adjoint_input_gradient_does_not_hold_the_augmented_state():
    cell = node(solver="euler", adjoint=True)
    h = torch.randn(2, 3, dtype=torch.float64, requires_grad=True) * 1.0  # as the encoder's output
    seen = []
    h.register_hook(seen.append)
    (z,) = cell.step(h, cell.init_state(2), None)
    z.sum().backward()
    (grad,) = seen
    assert grad.untyped_storage().nbytes() == grad.numel() * grad.element_size()


def parameter_probe_gradients(model: RecurrentModel, x: Tensor, y: Tensor) -> dict:
    """dL/dq_t of every parameter probe, (T, *shape) each, keyed "module.name"."""
    probes = model.make_param_probes(x.shape[1])
    loss = model.loss_fn(model(x, None, model.make_probes(x.shape[0], x.shape[1]), probes), y)
    flat = {f"{m}.{n}": q for m, qs in probes.items() for n, q in qs.items()}
    return dict(zip(flat, torch.autograd.grad(loss, list(flat.values()))))


def test_adjoint_under_parameter_probes_sends_every_step_its_gradient():
    # The adjoint's backward evaluates g after the probed step has returned: it must use the
    # probed weights W + q_t, or g's probes (and g's W) get no gradient on monitored steps.
    x = torch.randn(5, 12, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    y = torch.ones(5, 1, 1, dtype=torch.float64)
    adjoint = node_model(solver="rk4", adjoint=True, adjoint_segment=1, dt=0.2)
    plain = dict(zip([n for n, _ in adjoint.named_parameters()], torch.autograd.grad(
        adjoint.loss_fn(adjoint(x), y), list(adjoint.parameters()))))
    probed = parameter_probe_gradients(adjoint, x, y)
    for name, grad in plain.items():
        assert grad.norm() > 0, name
        torch.testing.assert_close(probed[name].sum(0), grad, rtol=1e-10, atol=1e-14, msg=name)
    # Each step's contribution is the discrete one up to rk4's error (the adjoint's gradient
    # is the continuous ODE's; measured 2e-8 relative at δt = 0.2): checked against backprop
    # through the solver.
    direct = parameter_probe_gradients(node_model(solver="rk4", dt=0.2), x, y)
    for name, per_step in direct.items():
        assert (probed[name] - per_step).norm() <= 1e-6 * per_step.norm(), name


def test_adjoint_is_recorded_in_the_run_log(caplog):
    with caplog.at_level(logging.WARNING, logger="rnnlab.cells.ode"):
        node(solver="dopri5", adjoint=True)
    assert "are those of the continuous ODE" in caplog.text


# --- NFE ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("adjoint", [False, True], ids=["direct", "adjoint"])
@pytest.mark.parametrize("solver", ["euler", "rk4", "dopri5", "bosh3"])
def test_nfe_counts_every_evaluation_of_g_in_forward_and_backward(solver, adjoint):
    cell = node(solver=solver, adjoint=adjoint)
    calls = []
    cell.g.register_forward_hook(lambda module, args, output: calls.append(1))
    u = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    (z,) = step_through(cell, u)[1]
    forward_calls = len(calls)
    torch.autograd.grad(z.square().sum(), [u])
    assert cell.diagnostics() == {"nfe_forward": forward_calls,
                                  "nfe_backward": len(calls) - forward_calls}
    assert cell.diagnostics() == {"nfe_forward": 0, "nfe_backward": 0}  # read and reset
    if solver in FIXED_GRID:  # one step per interval: euler evaluates g once, rk4 four times
        assert forward_calls == {"euler": 1, "rk4": 4}[solver] * 4
    assert (len(calls) > forward_calls) == adjoint


def test_training_logs_nfe_to_tensorboard(make_cfg, tmp_path):
    train(make_cfg("cell=node", "cell.solver=rk4", "cell.adjoint=true", "task.seq_len=5",
                   "trainer.max_steps=2"))
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    for tag in ("cell/nfe_forward", "cell/nfe_backward"):  # rk4: 4 evaluations × 5 intervals
        assert [(e.step, e.value) for e in events.Scalars(tag)] == [(0, 20.0), (1, 20.0)]


# --- configuration errors ----------------------------------------------------------------------
BAD = [  # (arguments, the key the error names, the message)
    ({"solver": "rk45"}, "solver", "cell.solver must be one of manual_euler, euler, midpoint"),
    ({"dt": 0}, "dt", "cell.dt must be a finite number > 0, got 0"),
    ({"width": 0}, "width", "cell.width must be an integer >= 1, got 0"),
    ({"depth": 1.5}, "depth", "cell.depth must be an integer >= 1, got 1.5"),
    ({"activation": "gelu"}, "activation", "cell.activation must be one of tanh, relu"),
    ({"rtol": -1e-3}, "rtol", "cell.rtol must be a finite number > 0, got -0.001"),
    ({"adjoint": "yes"}, "adjoint", "cell.adjoint must be true or false, got 'yes'"),
    ({"solver": "manual_euler", "adjoint": True}, "adjoint",
     "cell.adjoint must be false with cell.solver=manual_euler"),
    ({"solver": "scipy_solver"}, "adjoint",
     "cell.adjoint must be true with cell.solver=scipy_solver"),
    ({"adjoint_segment": -1}, "adjoint_segment",
     "cell.adjoint_segment must be an integer >= 0, got -1"),
]


@pytest.mark.parametrize(("override", "key", "message"), BAD, ids=[str(b[0]) for b in BAD])
def test_bad_node_setting_names_key_and_fix(override, key, message):
    with pytest.raises(ConfigError) as error:
        node(**override)
    assert message in str(error.value) and f"(set cell.{key}=...)" in str(error.value)


@pytest.mark.parametrize(("settings", "expected"), [
    ({"solver": "manual_euler"}, False), ({"solver": "euler"}, True), ({"solver": "rk4"}, True),
    ({"solver": "explicit_adams"}, False), ({"solver": "dopri5"}, False),
    ({"solver": "rk4", "adjoint": True}, True), ({"solver": "dopri5", "adjoint": True}, False),
    ({"solver": "explicit_adams", "adjoint": True}, False)])
def test_whole_sequence_auto_takes_the_whole_sequence_path_where_it_is_the_same_model(settings,
                                                                                      expected):
    assert node(whole_sequence="auto", **settings).whole_sequence is expected


@pytest.mark.parametrize("solver", ["dopri5", "bosh3"])
def test_adaptive_adjoint_segments_match_the_stepping_adjoint_to_the_tolerance(solver):
    # A step ends on every grid time, the input jumping there, forwards and backwards; within a
    # segment the step size carries over from one interval to the next, so longer segments
    # agree with stepping to the tolerance, and segments of one interval exactly.
    tolerance = {"rtol": 1e-10, "atol": 1e-12}
    out_step, grad_step = adjoint_gradients(solver, False, 0.2, **tolerance)
    for segment, bound in ((1, 1e-12), (4, 1e-6), (0, 1e-6)):  # bosh3: 6.7e-8 at 4
        out, grad = adjoint_gradients(solver, True, 0.2, segment=segment, **tolerance)
        torch.testing.assert_close(out, out_step, rtol=0, atol=1e-10)
        assert float((grad - grad_step).norm() / grad_step.norm()) < bound, segment
    # and both are the gradient of the discrete scheme, to the tolerance
    _, exact = adjoint_gradients(solver, False, 0.2, adjoint=False, **tolerance)
    assert float((grad - exact).norm() / exact.norm()) < 1e-6
