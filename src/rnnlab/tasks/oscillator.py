"""Forecasting a damped oscillator from irregular observations (the neural-ODE example).

Hidden state: position q and momentum p of

    dq/dt = p,   dp/dt = −ω² f(q) − γ p,    f(q) = q (``force=linear``) or sin q (``pendulum``),

with q_0 ~ U[−a, a], p_0 ~ U[−aω, aω] (a = ``amplitude``) and 0 ≤ γ < 2ω (underdamped). It is
observed at times s_0 = 0 < s_1 < … < s_T with gaps δ_k = s_k − s_{k−1} ~ U[dt_min, dt_max]
i.i.d. Step k = 0 … T − 1 of a sequence carries

    x_k = (q(s_k), δ_{k+1}),   dt_k = δ_{k+1},   target y_k = q(s_{k+1}),

so a model must forecast the next observation knowing when it comes: an ODE cell integrates its
state over the true gap dt_k, a discrete cell reads the gap as a feature. MSE is read on the last
``n_out`` steps (null: all T). The linear oscillator is generated in closed form, the pendulum by
RK4 with steps of at most 0.1/ω. The metric ``r2`` is 1 − MSE / Var(y) over the batch.

Baseline: repeat the last observation, ŷ_k = q(s_k). For the linear oscillator its MSE is exact:
with Φ(t) = exp(A t), A = [[0, 1], [−ω², −γ]], S_k = E[z(s_k) z(s_k)ᵀ] and c = (1, 0),

    E[(q(s_{k+1}) − q(s_k))²] = tr(E_δ[(Φ(δ) − I)ᵀ c cᵀ (Φ(δ) − I)] · S_k),
    vec S_{k+1} = E_δ[Φ(δ) ⊗ Φ(δ)] vec S_k,   S_0 = diag(a²/3, a²ω²/3),

averaged over the read steps; the expectations over δ are integrals of matrix exponentials, done
exactly with the augmented-matrix identity (`persistence_mse`). The pendulum has no closed form:
its baseline is the persistence MSE on the fixed validation set, the data val/loss is read on.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from rnnlab.config import is_number, require, require_choice, require_int
from rnnlab.tasks.base import Batch, Task, batch_generator

FORCES = ("linear", "pendulum")
RK4_STEP = 0.1  # largest RK4 step, in units of 1/ω


def mean_matrix_exp(M: Tensor, low: float, high: float) -> Tensor:
    """E[exp(M δ)] for δ ~ U[low, high] (M: (n, n) float64), exact also for singular M.

    ∫_0^t exp(M s) ds is the top-right block of exp([[M, I], [0, 0]] t).
    """
    if high == low:
        return torch.linalg.matrix_exp(M * low)
    n = M.shape[0]
    augmented = torch.zeros(2 * n, 2 * n, dtype=M.dtype)
    augmented[:n, :n], augmented[:n, n:] = M, torch.eye(n, dtype=M.dtype)
    integral = [torch.linalg.matrix_exp(augmented * t)[:n, n:] for t in (low, high)]
    return (integral[1] - integral[0]) / (high - low)


def persistence_mse(seq_len: int, n_out: int, omega: float, damping: float, dt_min: float,
                    dt_max: float, amplitude: float) -> float:
    """Exact MSE of ŷ_k = q(s_k) for the linear oscillator, averaged over k ∈ [T − n_out, T)."""
    A = torch.tensor([[0.0, 1.0], [-omega**2, -damping]], dtype=torch.float64)
    eye = torch.eye(2, dtype=torch.float64)

    def kron_sum(M: Tensor) -> Tensor:  # exp(δ (M⊗I + I⊗M)) = exp(M δ) ⊗ exp(M δ)
        return torch.kron(M, eye) + torch.kron(eye, M)

    C = torch.tensor([[1.0, 0.0], [0.0, 0.0]], dtype=torch.float64)  # c cᵀ
    mean_phi = mean_matrix_exp(A, dt_min, dt_max)
    mean_phiT_phi = mean_matrix_exp(kron_sum(A.T.contiguous()), dt_min, dt_max)
    mean_phiT_C_phi = (mean_phiT_phi @ C.reshape(4)).reshape(2, 2)
    W = (mean_phiT_C_phi - mean_phi.T @ C - C @ mean_phi + C).numpy().reshape(4)
    P = mean_matrix_exp(kron_sum(A), dt_min, dt_max).numpy()
    S = np.diag([amplitude**2 / 3, (amplitude * omega) ** 2 / 3]).reshape(4)
    total = 0.0
    for k in range(seq_len):
        if k >= seq_len - n_out:
            total += float(W @ S)  # tr(W S), S symmetric
        S = P @ S
    return total / n_out


class Oscillator(Task):
    """x: (B, T, 2) = (observation, gap to the next); dt: (B, T); y: (B, n_out, 1)."""

    loss = "mse"
    input_size = 2
    output_size = 1

    def __init__(self, seq_len: int = 100, force: str = "linear", omega: float = 1.0,
                 damping: float = 0.1, dt_min: float = 0.1, dt_max: float = 0.5,
                 amplitude: float = 1.0, n_out: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.seq_len = require_int("task.seq_len", seq_len)
        self.force = require_choice("task.force", force, FORCES)
        require(is_number(omega) and omega > 0, "task.omega", omega, "a finite number > 0")
        require(is_number(damping) and 0 <= damping < 2 * omega, "task.damping", damping,
                f"a number in [0, 2·task.omega) = [0, {2 * omega:g}) (an underdamped oscillator)")
        require(is_number(dt_min) and dt_min > 0, "task.dt_min", dt_min, "a finite number > 0")
        require(is_number(dt_max) and dt_max >= dt_min, "task.dt_max", dt_max,
                f"a finite number >= task.dt_min = {dt_min}")
        require(is_number(amplitude) and amplitude > 0, "task.amplitude", amplitude,
                "a finite number > 0")
        if n_out is not None:
            require_int("task.n_out", n_out)
            require(n_out <= seq_len, "task.n_out", n_out,
                    f"null (every step) or an integer in [1, task.seq_len = {seq_len}]")
        self.omega, self.damping, self.amplitude = float(omega), float(damping), float(amplitude)
        self.dt_min, self.dt_max = float(dt_min), float(dt_max)
        self.n_out = seq_len if n_out is None else n_out
        self._baseline: float | None = None

    @property
    def baseline(self) -> float:
        if self._baseline is None:
            if self.force == "linear":
                self._baseline = persistence_mse(self.seq_len, self.n_out, self.omega,
                                                 self.damping, self.dt_min, self.dt_max,
                                                 self.amplitude)
            else:
                self._baseline = self.validation_persistence_mse()
        return self._baseline

    def validation_persistence_mse(self) -> float:
        """MSE of repeating the last observation over the fixed validation set."""
        squared = []
        for index in range(self.val_batches):
            batch = self.generate(self.batch_size, batch_generator(self.seed, "val", index))
            last = batch["x"][:, self.seq_len - self.n_out:, :1].double()
            squared.append(((batch["y"].double() - last) ** 2).mean())
        return float(torch.stack(squared).mean())

    def generate(self, batch_size: int, generator: torch.Generator) -> Batch:
        B, T, a = batch_size, self.seq_len, self.amplitude
        # Gaps are rounded to float32 first, so the dt a cell integrates over is the true gap.
        gaps = (self.dt_min + (self.dt_max - self.dt_min) * torch.rand(B, T, generator=generator)
                ).double()
        q0 = a * (2 * torch.rand(B, generator=generator, dtype=torch.float64) - 1)
        p0 = a * self.omega * (2 * torch.rand(B, generator=generator, dtype=torch.float64) - 1)
        if self.force == "linear":
            q = self.linear_positions(q0, p0, gaps)
        else:
            q = self.pendulum_positions(q0, p0, gaps)
        x = torch.stack([q[:, :T], gaps], dim=-1).float()
        y = q[:, T - self.n_out + 1:].unsqueeze(-1).float()
        return {"x": x, "y": y, "dt": gaps.float()}

    def linear_positions(self, q0: Tensor, p0: Tensor, gaps: Tensor) -> Tensor:
        """q(s_0 … s_T): (B, T + 1) in closed form,
        q(s) = e^{−βs} (q_0 cos ω_d s + (p_0 + β q_0)/ω_d · sin ω_d s), β = γ/2, ω_d² = ω² − β²."""
        beta = self.damping / 2
        omega_d = math.sqrt(self.omega**2 - beta**2)
        s = torch.cat([torch.zeros_like(gaps[:, :1]), gaps.cumsum(1)], dim=1)
        q0, p0 = q0[:, None], p0[:, None]
        return torch.exp(-beta * s) * (q0 * torch.cos(omega_d * s)
                                       + (p0 + beta * q0) / omega_d * torch.sin(omega_d * s))

    def pendulum_positions(self, q0: Tensor, p0: Tensor, gaps: Tensor) -> Tensor:
        """q(s_0 … s_T): (B, T + 1) by RK4, each gap split into equal steps ≤ RK4_STEP/ω.

        A recurrence in time, so it loops over T (in NumPy: the per-call cost of torch on (B,)
        vectors would dominate); it is vectorised over the batch.
        """
        w2, gamma = self.omega**2, self.damping
        substeps = max(1, math.ceil(self.dt_max * self.omega / RK4_STEP))
        h_all = gaps.numpy() / substeps

        def field(q, p):
            return p, -w2 * np.sin(q) - gamma * p

        q, p = q0.numpy().copy(), p0.numpy().copy()
        out = np.empty((len(q), gaps.shape[1] + 1))
        out[:, 0] = q
        for k in range(gaps.shape[1]):
            h = h_all[:, k]
            for _ in range(substeps):
                dq1, dp1 = field(q, p)
                dq2, dp2 = field(q + h / 2 * dq1, p + h / 2 * dp1)
                dq3, dp3 = field(q + h / 2 * dq2, p + h / 2 * dp2)
                dq4, dp4 = field(q + h * dq3, p + h * dp3)
                q = q + h / 6 * (dq1 + 2 * dq2 + 2 * dq3 + dq4)
                p = p + h / 6 * (dp1 + 2 * dp2 + 2 * dp3 + dp4)
            out[:, k + 1] = q
        return torch.from_numpy(out)

    def metrics(self, y_hat: Tensor, y: Tensor) -> dict[str, Tensor]:
        return {"r2": 1 - ((y_hat - y) ** 2).mean() / y.var(unbiased=False).clamp_min(1e-12)}
