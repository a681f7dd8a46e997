"""coRNN, LEM, IndRNN, LRU, minGRU and AntisymmetricRNN against their papers' equations written out
in NumPy float64, their scans against stepping, their exact Jacobian norms against autograd's
Jacobian, and their options."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from rnnlab import gradflow
from rnnlab.cells import LEM, LRU, AntisymmetricRNN, CoRNN, IndRNN, MinGRU, scan
from rnnlab.cells.indrnn import relu_backward
from rnnlab.cells.lru import LRUScan, pack, unpack
from rnnlab.cells.mingru import MinGRUScan, candidate_slope, g
from rnnlab.cells.scan import linear_scan
from rnnlab.config import ConfigError

from .test_cells import make_cell, step_through

T, B = 7, 4


def np_params(cell) -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().astype(np.float64) for n, p in cell.named_parameters()}


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


# --- the papers' equations, one step, in NumPy ---------------------------------------------------
def cornn_reference(p, cell, u, y, z):
    """The authors' coRNNCell: i2h = Linear(input + 2H, H) on cat(x, hz, hy)."""
    i2h = np.concatenate([p["weight_u"], p["weight_z"], p["weight_y"]], axis=1)
    drive = np.tanh(np.concatenate([u, z, y], axis=1) @ i2h.T + p["bias"])
    z = z + cell.dt * (drive - cell.gamma * y - cell.epsilon * z)
    return y + cell.dt * z, z


def lem_reference(p, cell, u, y, z):
    """The authors' LEMCell: inp2hid chunks (dt1, dt2, i_z, i_y), hid2hid chunks (dt1, dt2, h_y)."""
    i_dt1, i_dt2, i_z, i_y = np.split(u @ p["inp2hid.weight"].T + p["inp2hid.bias"], 4, axis=1)
    h_dt1, h_dt2, h_y = np.split(y @ p["hid2hid.weight"].T + p["hid2hid.bias"], 3, axis=1)
    ms_dt_bar = cell.dt * sigmoid(i_dt1 + h_dt1)
    ms_dt = cell.dt * sigmoid(i_dt2 + h_dt2)
    z = (1 - ms_dt) * z + ms_dt * np.tanh(i_y + h_y)
    transformed = z @ p["transform_z.weight"].T + p["transform_z.bias"]
    y = (1 - ms_dt_bar) * y + ms_dt_bar * np.tanh(transformed + i_z)
    return y, z


def indrnn_reference(p, cell, u, h):
    w = p["recurrent"] if cell.bound is None else np.clip(p["recurrent"], -cell.bound, cell.bound)
    return np.maximum(u @ p["input.weight"].T + p["input.bias"] + w * h, 0.0)


def lru_reference(p, u, x):
    """The paper's appendix: Lambda = exp(-exp(nu_log) + 1j exp(theta_log)), B_norm = (B_re +
    1j B_im)·exp(gamma_log); x ∈ ℂ^N."""
    lam = np.exp(-np.exp(p["nu_log"]) + 1j * np.exp(p["theta_log"]))
    B_norm = (p["B_re"] + 1j * p["B_im"]) * np.exp(p["gamma_log"])[:, None]
    return lam * x + u @ B_norm.T


def mingru_reference(p, u, h):
    z = sigmoid(u @ p["gate.weight"].T + p["gate.bias"])
    k = u @ p["candidate.weight"].T + p["candidate.bias"]
    h_tilde = np.where(k >= 0, k + 0.5, sigmoid(k))
    return (1 - z) * h + z * h_tilde


def antisymmetric_reference(p, cell, u, h):
    W = p["weight"]
    A = W - W.T - cell.gamma * np.eye(W.shape[0])
    return h + cell.epsilon * np.tanh(h @ A.T + u @ p["input.weight"].T + p["input.bias"])


def run_reference(name: str, cell, u: np.ndarray) -> list[np.ndarray]:
    """Every step's first state (the LRU's packed as (Re x_1, Im x_1, Re x_2, …)) from zero
    initial states."""
    p = np_params(cell)
    H = cell.hidden_size
    y = z = np.zeros((u.shape[0], H))
    x = np.zeros((u.shape[0], H // 2), dtype=complex)
    out = []
    for u_t in u.transpose(1, 0, 2):
        if name == "cornn":
            y, z = cornn_reference(p, cell, u_t, y, z)
        elif name == "lem":
            y, z = lem_reference(p, cell, u_t, y, z)
        elif name == "indrnn":
            y = indrnn_reference(p, cell, u_t, y)
        elif name == "lru":
            x = lru_reference(p, u_t, x)
            y = np.stack([x.real, x.imag], axis=-1).reshape(x.shape[0], -1)
        elif name == "mingru":
            y = mingru_reference(p, u_t, y)
        elif name == "antisymmetric":
            y = antisymmetric_reference(p, cell, u_t, y)
        out.append(y)
    return out


CASES = {
    "cornn": {},
    "cornn_large_step": {"dt": 0.5, "gamma": 2.0, "epsilon": 0.3},
    "lem": {},
    "lem_large_step": {"dt": 1.0},
    "indrnn": {},
    "indrnn_bounded": {"horizon": 3, "magnitude": 2.0},
    "lru": {},
    "lru_wide_ring": {"r_min": 0.0, "r_max": 0.5, "max_phase": 3.0},
    "mingru": {},
    "antisymmetric": {},
    "antisymmetric_large_step": {"epsilon": 0.5, "gamma": 0.1, "sigma": 2.0},
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_step_follows_the_papers_equations_in_float64(case):
    name = case.split("_")[0]
    cell = make_cell(name, **CASES[case])
    if name == "indrnn" and cell.bound is not None:
        with torch.no_grad():  # some weights past the bound, some negative: the clamp acts
            cell.recurrent.copy_(torch.linspace(-1.5, 1.5, cell.hidden_size))
    u = torch.randn(B, T, 3, dtype=torch.float64) * 2
    outputs, _ = step_through(cell, u)
    expected = run_reference(name, cell, u.numpy())
    for t in range(T):
        np.testing.assert_allclose(outputs[:, t].detach().numpy(), expected[t], rtol=1e-12,
                                   atol=1e-14, err_msg=f"{case} t={t}")


# --- fast paths: the scans against stepping -----------------------------------------------------
def stepped_recurrence(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    h, out = h0, []
    for t in range(b.shape[1]):
        h = (a if a.dim() == 1 else a[:, t]) * h + b[:, t]
        out.append(h)
    return torch.stack(out, 1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.complex128])
@pytest.mark.parametrize("constant", [False, True], ids=["a_t", "a"])
@pytest.mark.parametrize("length", [1, 2, 12, 37])
def test_linear_scan_equals_the_loop_and_its_gradients_pass_gradcheck(dtype, constant, length):
    generator = torch.Generator().manual_seed(length)
    # |a| < 1, as in the cells: the finite differences of gradcheck stay accurate at T = 100
    a = 0.7 * torch.rand(*((4,) if constant else (3, length, 4)), generator=generator,
                         dtype=dtype)
    b = torch.randn(3, length, 4, generator=generator, dtype=dtype)
    h0 = torch.randn(3, 4, generator=generator, dtype=dtype)
    inputs = tuple(x.requires_grad_() for x in (a, b, h0))
    torch.testing.assert_close(linear_scan(*inputs), stepped_recurrence(*inputs), rtol=1e-12,
                               atol=1e-14)
    assert torch.autograd.gradcheck(linear_scan, inputs)


@pytest.mark.parametrize("path", ["lru", "mingru", "mingru_log_space"])
@pytest.mark.parametrize("length", [1, 5, 64, 101, 257])
# blocks of 1 step, of 2–5 steps (the last one shorter), and one block for the whole sequence
@pytest.mark.parametrize("block_values", [1, 100, scan.BLOCK_VALUES])
def test_scan_equals_stepping_to_1e10_with_gradients(path, length, block_values, monkeypatch):
    if path == "mingru_log_space" and block_values != scan.BLOCK_VALUES:
        pytest.skip("the log-space scan has no blocks")
    monkeypatch.setattr(scan, "BLOCK_VALUES", block_values)
    name = path.split("_")[0]
    cell = make_cell(name)
    sequence = cell.log_space_sequence if path == "mingru_log_space" else cell.sequence
    u = torch.randn(3, length, 3, dtype=torch.float64, requires_grad=True)
    # a non-zero initial state: the scans carry it separately
    start = (torch.rand(3, 6, dtype=torch.float64, requires_grad=True),)
    fast, fast_last = sequence(u, start)
    state, outputs = start, []
    for u_t in u.unbind(1):
        state = cell.step(u_t, state, None)
        outputs.append(state[0])
    stepped = torch.stack(outputs, 1)
    torch.testing.assert_close(fast, stepped, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(fast_last[0], state[0], rtol=1e-10, atol=1e-12)
    weights = torch.randn_like(stepped)  # a loss that reads every step
    inputs = [u, start[0], *cell.parameters()]
    grads_fast = torch.autograd.grad((fast * weights).sum(), inputs)
    grads_step = torch.autograd.grad((stepped * weights).sum(), inputs)
    for a, b in zip(grads_fast, grads_step):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("log_space", [False, True])
def test_mingru_scans_stay_at_1e10_when_the_gates_close_over_long_sequences(log_space):
    # large gate pre-activations: 1 − z_t near 0 or 1, a*_t down to about −10^3
    cell = make_cell("mingru")
    u = 8 * torch.randn(2, 400, 3, dtype=torch.float64)
    sequence = cell.log_space_sequence if log_space else cell.sequence
    fast, _ = sequence(u, cell.init_state(2))
    torch.testing.assert_close(fast, step_through(cell, u)[0], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("block_values", [1, 40, scan.BLOCK_VALUES])
def test_the_cells_scan_functions_pass_gradcheck(block_values, monkeypatch):
    # their hand-written backward passes against finite differences, over several blocks
    monkeypatch.setattr(scan, "BLOCK_VALUES", block_values)
    generator = torch.Generator().manual_seed(block_values)

    def randn(*shape, dtype=torch.float64):
        return torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_()

    lam = (0.8 * torch.rand(3, generator=generator, dtype=torch.float64)
           * torch.exp(1j * randn(3).detach())).requires_grad_()
    assert torch.autograd.gradcheck(  # unprobed: the sequence's scan, inputs time-major
        LRUScan.apply, (randn(2, 9, 4).transpose(0, 1), randn(6, 4),
                        randn(2, 3, dtype=torch.complex128), lam, None))
    assert torch.autograd.gradcheck(MinGRUScan.apply,
                                    (randn(2, 9, 4), randn(6, 4), randn(6), randn(2, 3)))


@pytest.mark.parametrize("block_values", [1, 40, scan.BLOCK_VALUES])
@pytest.mark.parametrize("zero_probes", [True, False])
def test_the_lrus_probed_chunk_is_the_recurrence_and_passes_gradcheck(block_values, zero_probes,
                                                                      monkeypatch):
    """`LRUScan` with probes (the monitor's probed chunk) over one and several blocks:
    x_t = λ x_{t−1} + W u_t + p_t stepped in complex arithmetic, and every gradient (inputs,
    drive weight, start state, λ, probes; each step's state and the last one read) against
    finite differences."""
    monkeypatch.setattr(scan, "BLOCK_VALUES", block_values)
    generator = torch.Generator().manual_seed(block_values)
    C, batch, N, inputs_size = 9, 2, 3, 4

    def randn(*shape, dtype=torch.float64, scale=1.0):
        return (scale * torch.randn(*shape, generator=generator, dtype=dtype)).requires_grad_()

    lam = (0.8 * torch.rand(N, generator=generator, dtype=torch.float64)
           * torch.exp(1j * randn(N).detach())).requires_grad_()
    u = randn(batch, C, inputs_size).transpose(0, 1)  # time-major, as the model passes a chunk
    inputs = (u, randn(2 * N, inputs_size), randn(batch, N, dtype=torch.complex128), lam,
              randn(C, batch, 2 * N, scale=0.0 if zero_probes else 0.3))
    xs, last = LRUScan.apply(*inputs)
    u_, weight, x, _, p = (v.detach() for v in inputs)
    stepped = []
    for t in range(C):
        x = lam.detach() * x + unpack(u_[t] @ weight.T + p[t])
        stepped.append(pack(x))
    torch.testing.assert_close(xs, torch.stack(stepped), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(last, xs[-1], rtol=0, atol=0)
    assert torch.autograd.gradcheck(LRUScan.apply, inputs)


def test_candidate_slope_is_autograds_derivative_of_g_including_the_tie_at_0():
    c = torch.tensor([-30.0, -2.0, -1e-3, 0.0, 1e-3, 2.0, 30.0], dtype=torch.float64,
                     requires_grad=True)
    (expected,) = torch.autograd.grad(g(c).sum(), c)
    assert expected[3] == 0.625  # torch.maximum splits the tie: (1 + σ'(0))/2
    torch.testing.assert_close(candidate_slope(c.detach(), torch.sigmoid(c.detach())), expected,
                               rtol=1e-15, atol=0)


def test_relu_backward_is_autograds_derivative_of_relu_at_zero_and_nan():
    pre = torch.tensor([-2.0, -0.0, 0.0, 1e-300, 3.0, float("nan"), float("inf")],
                       dtype=torch.float64, requires_grad=True)
    grad = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], dtype=torch.float64)
    (expected,) = torch.autograd.grad(torch.relu(pre), pre, grad)
    assert expected.tolist() == [0.0, 0.0, 0.0, 4.0, 5.0, 6.0, 7.0]  # nan: not ≤ 0, passed
    assert relu_backward(grad, pre.detach()).tolist() == expected.tolist()
    rows = torch.tensor([[1.0, -1.0], [0.0, 2.0]], dtype=torch.float64)
    assert relu_backward(torch.tensor([3.0, 4.0]).expand_as(rows), rows).tolist() == [
        [3.0, 0.0], [0.0, 4.0]]  # a broadcast gradient, as `IndRNN.jacobian_norms` gives it


@pytest.mark.parametrize("case", ["lru_near_1", "lru_near_0", "mingru_closing_gates"])
def test_scans_equal_stepping_to_1e10_at_10000_steps(case):
    # decays near 1 (|λ| up to 0.99999: nothing forgotten in 10^4 steps) and near 0
    overrides = {"lru_near_1": {"r_min": 0.9999, "r_max": 0.99999},
                 "lru_near_0": {"r_min": 0.0, "r_max": 1e-3}, "mingru_closing_gates": {}}[case]
    cell = make_cell(case.split("_")[0], **overrides)
    u = torch.randn(2, 10_000, 3, dtype=torch.float64, requires_grad=True)
    scale = 8.0 if case == "mingru_closing_gates" else 1.0  # 1 − z_t near 0 and near 1
    fast, _ = cell.sequence(scale * u, cell.init_state(2))
    stepped, _ = step_through(cell, scale * u)
    torch.testing.assert_close(fast, stepped, rtol=1e-10, atol=1e-12)
    weights = torch.randn_like(stepped)
    inputs = [u, *cell.parameters()]
    for a, b in zip(torch.autograd.grad((fast * weights).sum(), inputs),
                    torch.autograd.grad((stepped * weights).sum(), inputs)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_mingru_state_stays_positive_from_a_zero_start():
    cell = make_cell("mingru")
    outputs, _ = cell.sequence(torch.randn(2, 50, 3, dtype=torch.float64) * 5, cell.init_state(2))
    assert (outputs > 0).all()


# --- exact Jacobian norms of the diagonal cells --------------------------------------------------
def autograd_jacobian_norms(cell, u_t, state) -> torch.Tensor:
    """σ_max of the full autograd Jacobian of the step, per sequence: (B,)."""
    norms = []
    for b in range(u_t.shape[0]):
        J = torch.autograd.functional.jacobian(
            lambda s, b=b: cell.step(u_t[b:b + 1], (s,), None)[0], state[0][b:b + 1])
        H = state[0].shape[1]
        norms.append(torch.linalg.matrix_norm(J.reshape(H, H), 2))
    return torch.stack(norms)


@pytest.mark.parametrize("case", ["lru", "lru_wide_ring", "mingru", "indrnn", "indrnn_bounded"])
def test_jacobian_norms_are_the_spectral_norm_of_the_autograd_jacobian(case):
    name = case.split("_")[0]
    cell = make_cell(name, **CASES[case])
    if name == "indrnn":
        with torch.no_grad():  # negative, clamped and switched-off units
            cell.recurrent.copy_(torch.linspace(-1.5, 1.5, cell.hidden_size))
    u_t = torch.randn(5, 3, dtype=torch.float64) * 2
    state = (torch.randn(5, 6, dtype=torch.float64),)
    expected = autograd_jacobian_norms(cell, u_t, state)
    torch.testing.assert_close(cell.jacobian_norms(u_t, state, None), expected, rtol=1e-12,
                               atol=1e-14)


def test_monitor_uses_the_exact_norms_where_power_iteration_stops_short():
    # minGRU's J = diag(1 − z_t): from a random start, one power iteration is still off
    from .conftest import float64_model

    model = float64_model({"_target_": "rnnlab.cells.mingru.MinGRU", "hidden_size": 6})
    batch = {"x": torch.randn(3, 5, 2, dtype=torch.float64),
             "y": torch.zeros(3, 1, 1, dtype=torch.float64)}
    norms = gradflow.jacobians(model, batch, iterations=1).jacobian_norm
    with torch.no_grad():
        u = model.encoder(batch["x"])
        expected = torch.sigmoid(-model.cell.gate(u)).amax(dim=(0, 2))  # over batch and units
    np.testing.assert_allclose(norms, expected.numpy(), rtol=1e-12)
    model.cell.jacobian_norms = None  # the generic path: power iteration
    estimate = gradflow.jacobians(model, batch, iterations=1).jacobian_norm
    assert np.abs(estimate / expected.numpy() - 1).max() > 1e-4


# --- options -------------------------------------------------------------------------------------
def test_lru_ring_initialisation_and_gamma_normalisation():
    cell = make_cell("lru", hidden_size=400, r_min=0.4, r_max=0.8, max_phase=1.5)
    modulus = torch.exp(-torch.exp(cell.nu_log)).detach()
    phase = torch.exp(cell.theta_log).detach()
    assert modulus.min() >= 0.4 and modulus.max() <= 0.8
    assert phase.min() >= 0 and phase.max() <= 1.5
    # area-uniform on the ring: |λ|² uniform in [r_min², r_max²], mean (0.16 + 0.64) / 2
    assert modulus.square().mean().item() == pytest.approx(0.4, abs=0.03)
    torch.testing.assert_close(torch.exp(cell.gamma_log).detach(), (1 - modulus**2).sqrt())


def test_lru_jacobian_norm_is_the_largest_eigenvalue_modulus_and_bounds_the_profile():
    from .conftest import float64_model

    model = float64_model({"_target_": "rnnlab.cells.lru.LRU", "hidden_size": 8, "r_min": 0.5,
                           "r_max": 0.9})
    batch = {"x": torch.randn(3, 20, 2, dtype=torch.float64),
             "y": torch.randn(3, 1, 1, dtype=torch.float64)}
    record = gradflow.grad_flow(model, batch, jacobian_iterations=1)
    largest = float(torch.exp(-torch.exp(model.cell.nu_log.detach())).max())
    norms, profile = record.jacobians.jacobian_norm, record.profiles["dL_dz"]
    np.testing.assert_allclose(norms, largest, rtol=1e-12)
    bound = gradflow.jacobian_bound(profile, norms)
    assert (profile <= bound * (1 + 1e-9)).all()


def test_indrnn_bound_is_magnitude_to_the_one_over_horizon_and_initialises_below_it():
    cell = make_cell("indrnn", hidden_size=300, horizon=100, magnitude=2.0)
    assert cell.bound == pytest.approx(math.exp(math.log(2.0) / 100), rel=1e-15)
    w = cell.recurrent.detach()
    assert w.min() >= 0 and w.max() <= cell.bound
    assert make_cell("indrnn").bound is None


def test_antisymmetric_state_matrix_has_eigenvalues_minus_gamma_plus_imaginary():
    cell = make_cell("antisymmetric", gamma=0.3, sigma=1.0)
    eigenvalues = torch.linalg.eigvals(cell.state_matrix().detach())
    torch.testing.assert_close(eigenvalues.real, torch.full((6,), -0.3, dtype=torch.float64))


BAD = [
    (CoRNN, {"dt": 0.0}, "cell.dt must be a finite number > 0, got 0.0"),
    (CoRNN, {"gamma": "big"}, "cell.gamma must be a finite number, got 'big'"),
    (CoRNN, {"epsilon": float("nan")}, "cell.epsilon must be a finite number, got nan"),
    (LEM, {"dt": -1}, "cell.dt must be a finite number > 0, got -1"),
    (IndRNN, {"horizon": 0}, "cell.horizon must be null (no bound on the recurrent weights) or "
                             "an integer >= 1"),
    (IndRNN, {"magnitude": 0.5}, "cell.magnitude must be a finite number >= 1"),
    (LRU, {"hidden_size": 5}, "cell.hidden_size must be an even integer >= 2"),
    (LRU, {"r_min": 1.0}, "cell.r_min must be a finite number in [0, 1)"),
    (LRU, {"r_min": 0.5, "r_max": 0.4}, "cell.r_max must be a finite number in [cell.r_min = 0.5, "
                                        "1)"),
    (LRU, {"r_max": 1.0}, "cell.r_max must be a finite number in [cell.r_min = 0.9, 1)"),
    (LRU, {"max_phase": 0}, "cell.max_phase must be a finite number > 0"),
    (MinGRU, {"hidden_size": 0}, "cell.hidden_size must be an integer >= 1, got 0"),
    (AntisymmetricRNN, {"epsilon": 0}, "cell.epsilon must be a finite number > 0, got 0"),
    (AntisymmetricRNN, {"gamma": -0.1}, "cell.gamma must be a finite number >= 0, got -0.1"),
    (AntisymmetricRNN, {"sigma": -1}, "cell.sigma must be a finite number >= 0, got -1"),
]


@pytest.mark.parametrize(("cell", "override", "message"), BAD,
                         ids=[f"{c.__name__}-{next(iter(o))}" for c, o, _ in BAD])
def test_bad_setting_names_key_and_fix(cell, override, message):
    with pytest.raises(ConfigError) as error:
        cell(input_size=3, **override)
    key = list(override)[-1]
    assert message in str(error.value) and f"(set cell.{key}=...)" in str(error.value)


# --- bench --scans ------------------------------------------------------------------------------
def test_scan_benchmark_times_every_path_of_a_cell_and_tables_them():
    from rnnlab import bench

    case = {"cell": "mingru", "T": 6, "mode": "scan_time", "repeats": 2, "device": "cpu",
            "threads": 1, "batch": 2, "hidden": 4}
    timing = bench.run_case(case)
    assert set(timing["seconds"]) == {"loop", "scan", "log_space"}
    assert all(len(s) == 2 and min(s) > 0 for s in timing["all_seconds"].values())
    memory = [{"cell": "mingru", "T": 6, "mode": "scan_memory", "path": p, "peak_mb": mb}
              for p, mb in [("inputs only", 100.0), ("loop", 130.0), ("scan", 110.0),
                            ("log_space", 120.0)]]
    _, summary = bench.scan_table([{**case, **timing}, *memory], "t")
    by_path = {row["path"]: row for row in summary}
    loop = timing["seconds"]["loop"]
    assert by_path["scan"]["loop_over_path"] == pytest.approx(loop / timing["seconds"]["scan"])
    assert by_path["loop"]["loop_over_path"] == pytest.approx(1.0)
    assert [by_path[p]["mb_above_inputs"] for p in ("loop", "scan", "log_space")] == [30, 10, 20]
