"""The oscillator forecasting task against independent integrations and its baseline formula."""

from __future__ import annotations

import math

import pytest
import torch
from torchdiffeq import odeint

from rnnlab.config import ConfigError
from rnnlab.tasks import Oscillator
from rnnlab.tasks.oscillator import persistence_mse


def sample(n=64, seed=0, **options):
    task = Oscillator(**{"seq_len": 20, **options})
    return task, task.generate(n, torch.Generator().manual_seed(seed))


def test_oscillator_batch_carries_the_gaps_as_dt_and_as_the_second_feature():
    _, batch = sample(dt_min=0.2, dt_max=0.7)
    assert batch["x"].shape == (64, 20, 2) and batch["dt"].shape == (64, 20)
    assert batch["y"].shape == (64, 20, 1)
    assert torch.equal(batch["x"][..., 1], batch["dt"])
    assert ((batch["dt"] >= 0.2) & (batch["dt"] <= 0.7)).all()


def test_oscillator_target_at_each_step_is_the_next_observation():
    _, batch = sample()
    assert torch.equal(batch["y"][:, :-1, 0], batch["x"][:, 1:, 0])


def test_oscillator_n_out_keeps_the_last_targets():
    _, every = sample(seed=3)
    _, last = sample(seed=3, n_out=4)
    assert last["y"].shape == (64, 4, 1) and torch.equal(last["y"], every["y"][:, -4:])
    assert torch.equal(last["x"], every["x"])


def test_oscillator_initial_position_is_uniform_in_the_amplitude():
    _, batch = sample(n=20_000, amplitude=0.5)
    q0 = batch["x"][:, 0, 0].double()
    assert q0.abs().max() <= 0.5
    assert q0.var().item() == pytest.approx(0.25 / 3, rel=0.03)


def test_linear_oscillator_matches_stepping_the_matrix_exponential_over_each_gap():
    omega, gamma = 1.3, 0.4
    task, batch = sample(n=16, omega=omega, damping=gamma)
    x, y, dt = batch["x"].double(), batch["y"].double(), batch["dt"].double()
    A = torch.tensor([[0.0, 1.0], [-omega**2, -gamma]], dtype=torch.float64)
    # The momentum is not observed: recover p_0 from the first two positions.
    phi = torch.linalg.matrix_exp(A * dt[:, 0, None, None])  # (B, 2, 2)
    p0 = (y[:, 0, 0] - phi[:, 0, 0] * x[:, 0, 0]) / phi[:, 0, 1]
    z = torch.stack([x[:, 0, 0], p0], dim=1)
    for k in range(task.seq_len):
        z = (torch.linalg.matrix_exp(A * dt[:, k, None, None]) @ z[..., None])[..., 0]
        assert torch.allclose(z[:, 0], y[:, k, 0], atol=2e-6), k


def test_pendulum_matches_an_adaptive_ode_solver():
    omega, gamma = 1.5, 0.2
    task, batch = sample(n=4, force="pendulum", omega=omega, damping=gamma, amplitude=1.0)
    x, y, dt = batch["x"].double(), batch["y"].double(), batch["dt"].double()

    def field(t, z):
        return torch.stack([z[1], -omega**2 * torch.sin(z[0]) - gamma * z[1]])

    for row in range(4):
        times = torch.cat([torch.zeros(1, dtype=torch.float64), dt[row].cumsum(0)])
        # p_0 is not observed: find it by shooting on the first target.
        lo, hi = -omega - 0.1, omega + 0.1
        for _ in range(60):
            mid = (lo + hi) / 2
            z = odeint(field, torch.stack([x[row, 0, 0], torch.tensor(mid, dtype=torch.float64)]),
                       times[:2], rtol=1e-12, atol=1e-12)
            lo, hi = (mid, hi) if z[-1, 0] < y[row, 0, 0] else (lo, mid)
        z0 = torch.stack([x[row, 0, 0], torch.tensor(lo, dtype=torch.float64)])
        reference = odeint(field, z0, times, rtol=1e-10, atol=1e-10)[1:, 0]
        assert torch.allclose(reference, y[row, :, 0], atol=1e-5), row


def test_persistence_formula_is_exact_for_an_undamped_oscillator_with_fixed_gaps():
    # γ = 0 and (q, p/ω) isotropic: the covariance is rotation invariant, so at every step
    # E[(q(s + δ) − q(s))²] = 2 Var(q) (1 − cos ωδ), Var(q) = a²/3.
    for omega, gap, a in ((1.0, 0.3, 1.0), (2.5, 0.7, 0.4)):
        expected = 2 * a**2 / 3 * (1 - math.cos(omega * gap))
        assert persistence_mse(30, 30, omega, 0.0, gap, gap, a) == pytest.approx(expected,
                                                                                 rel=1e-10)


@pytest.mark.parametrize("options", [
    {},
    {"omega": 2.0, "damping": 0.5, "dt_min": 0.2, "dt_max": 1.5, "n_out": 5},
    {"damping": 0.0, "dt_min": 0.05, "dt_max": 2.0, "amplitude": 3.0},
])
def test_linear_baseline_matches_repeating_the_last_observation_on_a_large_sample(options):
    task, batch = sample(n=200_000, seed=1, **options)
    last = batch["x"][:, task.seq_len - task.n_out:, :1].double()
    loss = ((batch["y"].double() - last) ** 2).mean().item()
    assert abs(loss - task.baseline) / task.baseline < 0.01


def test_pendulum_baseline_is_repeating_the_last_observation_on_the_validation_set():
    task = Oscillator(seq_len=15, force="pendulum", batch_size=8, val_batches=3, seed=2)
    losses = [((b["y"] - b["x"][:, :, :1]) ** 2).double().mean() for b in task.val_dataloader()]
    assert len(losses) == 3
    assert task.baseline == pytest.approx(torch.stack(losses).mean().item(), rel=1e-6)


def test_oscillator_r2_is_one_for_perfect_and_zero_for_the_mean_forecast():
    _, batch = sample()
    y = batch["y"]
    task = Oscillator(seq_len=20)
    assert task.metrics(y, y)["r2"].item() == 1.0
    assert task.metrics(torch.full_like(y, y.mean().item()), y)["r2"].item() == pytest.approx(
        0.0, abs=1e-5)


def test_linear_oscillator_generates_t_10000_in_one_batch():
    task, batch = sample(n=2, seq_len=10_000)
    assert batch["x"].shape == (2, 10_000, 2) and torch.isfinite(batch["y"]).all()
    assert task.baseline > 0


@pytest.mark.parametrize(("options", "message"), [
    ({"damping": 2.0}, "task.damping must be a number in [0, 2·task.omega) = [0, 2)"),
    ({"damping": -0.1}, "task.damping must be a number in [0, 2·task.omega)"),
    ({"omega": 0}, "task.omega must be a finite number > 0"),
    ({"dt_min": 0.0}, "task.dt_min must be a finite number > 0"),
    ({"dt_min": 0.5, "dt_max": 0.4}, "task.dt_max must be a finite number >= task.dt_min = 0.5"),
    ({"force": "duffing"}, "task.force must be one of linear, pendulum"),
    ({"amplitude": float("inf")}, "task.amplitude must be a finite number > 0"),
    ({"seq_len": 10, "n_out": 11}, "task.n_out must be null (every step) or an integer in [1, "),
    ({"n_out": 0}, "task.n_out must be an integer >= 1"),
])
def test_oscillator_rejects_bad_options(options, message):
    with pytest.raises(ConfigError) as error:
        Oscillator(**options)
    assert message in str(error.value)
    assert f"(set {message.split()[0]}=...)" in str(error.value)
