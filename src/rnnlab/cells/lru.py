"""LRU, the Linear Recurrent Unit (Orvieto, Smith, Gu, Fernando, Gulcehre, Pascanu & De,
ICML 2023)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from rnnlab.cells.base import Cell, State
from rnnlab.cells.recurrences import record_previous_chunk
from rnnlab.cells.scan import (
    block_length,
    steps_adjoint,
    steps_forward,
    sum_over_steps,
    time_major,
)
from rnnlab.config import is_int, is_number, require


class LRU(Cell):
    """x_t = λ ⊙ x_{t−1} + γ ⊙ (B u_t), x ∈ ℂ^N, a diagonal linear recurrence:

        λ = exp(−exp(ν) + i·exp(θ))          γ = exp(γ_log), initially √(1 − |λ|²)

    Orvieto, Smith, Gu, Fernando, Gulcehre, Pascanu & De, "Resurrecting Recurrent Neural Networks
    for Long Sequences", ICML 2023 (their appendix's JAX code). ν, θ, γ_log, B = B_re + i·B_im are
    trained; the paper's output y_t = Re(C x_t) + D u_t is the model's linear decoder on
    (Re x, Im x) (Re(C x) = C_re Re x − C_im Im x, any C), without the skip D u_t.

    State (x,): the N = hidden_size/2 complex units as one real (B, hidden_size) tensor,
    interleaved (Re x_1, Im x_1, Re x_2, …) — `torch.view_as_real`'s layout, so packing and
    unpacking copy nothing — so the profile is ||∂L/∂x_t|| over the complex state and the decoder
    reads all of it. On it ∂x_t/∂x_{t−1} is a 2×2 block [[Re λ_j, −Im λ_j], [Im λ_j, Re λ_j]] per
    unit,
    |λ_j| times a rotation, so its spectral norm is max_j |λ_j| (`jacobian_norms`), the same for
    every step and input: the profile decays at most like (max |λ|)^(T−1−t).

    Options (the ring initialisation): |λ| uniform on the ring r_min ≤ |λ| ≤ r_max (area-uniform,
    as the paper), phase uniform in [0, max_phase]. Defaults r_min 0.9, r_max 0.999 (the paper's
    setting for long-range tasks; its code's defaults are 0, 1, 2π), max_phase 2π. B_re, B_im ~
    N(0, 1/(2·input)).

    `sequence` is `LRUScan`: the recurrence with a = λ the same every step, one in-place
    operation per step and a hand-written backward (the adjoint scan, `rnnlab.cells.scan`),
    equal to stepping to 1e-10 in float64.
    """

    state_names = ("x",)

    def __init__(self, input_size: int, hidden_size: int = 64, r_min: float = 0.9,
                 r_max: float = 0.999, max_phase: float = 6.283):
        super().__init__(input_size, hidden_size)
        require(is_int(hidden_size, 2) and hidden_size % 2 == 0, "cell.hidden_size", hidden_size,
                "an even integer >= 2 (real and imaginary parts of hidden_size/2 complex units)")
        require(is_number(r_min) and 0 <= r_min < 1, "cell.r_min", r_min,
                "a finite number in [0, 1) (the smallest initial |λ|)")
        require(is_number(r_max) and r_min <= r_max < 1, "cell.r_max", r_max,
                f"a finite number in [cell.r_min = {r_min}, 1) (the largest initial |λ|; 1 "
                "would make γ = √(1 − |λ|²) zero)")
        require(is_number(max_phase) and max_phase > 0, "cell.max_phase", max_phase,
                "a finite number > 0 (the largest initial arg λ, radians)")
        N = hidden_size // 2
        tiny = torch.finfo(torch.get_default_dtype()).tiny  # keeps both logs finite
        u1 = torch.rand(N).clamp_min(tiny)
        u2 = torch.rand(N).clamp_min(tiny)
        nu_log = torch.log(-0.5 * torch.log(u1 * (r_max**2 - r_min**2) + r_min**2))
        self.nu_log = nn.Parameter(nu_log)
        self.theta_log = nn.Parameter(torch.log(max_phase * u2))
        modulus = torch.exp(-torch.exp(nu_log))
        self.gamma_log = nn.Parameter(torch.log(torch.sqrt(1 - modulus**2)))
        self.B_re = nn.Parameter(torch.randn(N, input_size) / math.sqrt(2 * input_size))
        self.B_im = nn.Parameter(torch.randn(N, input_size) / math.sqrt(2 * input_size))

    def log_lambda(self) -> Tensor:
        """log λ = −exp(ν) + i·exp(θ), (N,) complex."""
        return torch.complex(-torch.exp(self.nu_log), torch.exp(self.theta_log))

    def drive_weight(self) -> Tensor:
        """γ ⊙ B as one real (2N, input) matrix whose rows alternate Re, Im."""
        gamma = torch.exp(self.gamma_log)[:, None]
        return torch.stack([gamma * self.B_re, gamma * self.B_im], dim=1).flatten(0, 1)

    def drive(self, u: Tensor) -> Tensor:
        """γ ⊙ (B u), complex, for u (…, input) → (…, N): one real product whose output rows
        alternate Re, Im, viewed as complex."""
        return unpack(u @ self.drive_weight().T)

    def step(self, u_t: Tensor, state: State, dt: Tensor | None) -> State:
        x = unpack(state[0])
        x = torch.exp(self.log_lambda()) * x + self.drive(u_t)
        return (pack(x),)

    def step_parameter_grads(self, u: Tensor, previous: State, cotangents: State,
                             dt: Tensor | None) -> list[Tensor]:
        """dL/dW⁽ᵗ⁾ of C steps, in the packed layout: with x_{t−1} = p + iq, the cotangent
        g = g_r + i g_i and λ = a + ib = e^(−ν)(cos θ + i sin θ), L gets ∂a + i ∂b = Σ conj(x) g
        over the batch, so ν (= exp ν_log) gets −(a ∂a + b ∂b) and θ (= exp θ_log) a ∂b − b ∂a.
        The drive γ ⊙ B u_t: with M_t = g_tᵀ u_t (2N, input), rows alternating Re, Im (one
        batched product), B_re and B_im get γ ⊙ M_t's rows and γ gets Σ_input (M_t ⊙ [B_re;
        B_im]) over each unit's two rows."""
        (x,), (grad,) = previous, cotangents
        C, N = x.shape[0], self.hidden_size // 2
        with torch.no_grad():
            nu, theta, gamma = (torch.exp(self.nu_log), torch.exp(self.theta_log),
                                torch.exp(self.gamma_log))
            modulus = torch.exp(-nu)
            a, b = modulus * torch.cos(theta), modulus * torch.sin(theta)
            d_lambda = torch.view_as_real((unpack(x).conj() * unpack(grad)).sum(1))
            d_a, d_b = d_lambda[..., 0], d_lambda[..., 1]
            M = torch.bmm(grad.transpose(1, 2), u)  # (C, 2N, input)
            B = torch.stack([self.B_re, self.B_im], dim=1).flatten(0, 1)
            d_gamma = (M * B).sum(2).view(C, N, 2).sum(2)
            d_B = M.view(C, N, 2, -1).mul_(gamma[:, None, None])
            return [-(a * d_a + b * d_b) * nu, (a * d_b - b * d_a) * theta, d_gamma * gamma,
                    d_B[:, :, 0], d_B[:, :, 1]]

    def input_projection(self, u: Tensor) -> Tensor:
        """u itself: the probed chunk (`LRUScan` with the probes) makes the drive γ ⊙ B u_t a
        block of steps at a time, in the cache, and its backward ∂L/∂u and ∂L/∂(γB) from the
        adjoint; a projection made beforehand for the whole chunk, its copies and its autograd
        nodes cost a monitored LRU step at T = 100 as much as the scan."""
        return u

    def projected_step(self, g_t: Tensor, state: State, dt: Tensor | None) -> State:
        return self.step(g_t, state, dt)

    def probed_sequence(self, g: Tensor, state: State, probes: State,
                        previous: list[State] | None) -> tuple[Tensor, State]:
        """A chunk of probed steps x_t = λ ⊙ x_{t−1} + γ ⊙ B u_t + p_t as one node (`LRUScan`
        with the probes): the probe enters as the drive does, so its gradient is the scan's
        adjoint ∂L/∂x_t.
        ``g`` (C, B, input) the inputs u_t (`input_projection`) and ``probes[0]`` (C, B, 2N),
        time-major; returns x_t at every step packed (C, B, 2N) and the last state."""
        hs, last = LRUScan.apply(g, self.drive_weight(), unpack(state[0]),
                                 torch.exp(self.log_lambda()), probes[0])
        record_previous_chunk(previous, state[0], hs)
        return hs, (last,)

    def sequence(self, u: Tensor, state: State) -> tuple[Tensor, State]:
        """u: (B, T, input) → x_t at every t as (B, T, hidden), by the scan `LRUScan`."""
        xs, last = LRUScan.apply(time_major(u), self.drive_weight(), unpack(state[0]),
                                 torch.exp(self.log_lambda()), None)
        return time_major(xs), (last,)

    def jacobian_norms(self, u_t: Tensor, state: State, dt: Tensor | None) -> Tensor:
        """max_j |λ_j| for every row: each unit's block is |λ_j| times a rotation."""
        modulus = torch.exp(-torch.exp(self.nu_log)).amax()
        return modulus.expand(u_t.shape[0])

    def transition_jacobian(self, u_t: Tensor, state: State, dt: Tensor | None):
        """J v = λ ⊙ v and Jᵀ w = conj(λ) ⊙ w on the packed state: each unit's block
        [[Re λ, −Im λ], [Im λ, Re λ]] is multiplication by λ, its transpose by conj(λ)."""
        lam = torch.exp(self.log_lambda().detach())  # measured, never differentiated
        conj = lam.conj()
        return (lambda v: pack(lam * unpack(v)), lambda w: pack(conj * unpack(w)))


class LRUScan(torch.autograd.Function):
    """x_t = λ ⊙ x_{t−1} + unpack(W u_t + p_t) over a sequence or a probed chunk, a block of
    `block_length` steps at a time: each block's drive (one matmul) is made and scanned while in
    the cache, and in the backward pass each block's adjoint g_t = ∂L/∂x_t + conj(λ) ⊙ g_{t+1}
    (`rnnlab.cells.scan`) goes straight into the block's ∂L/∂u = g W and ∂L/∂W += gᵀ u. Only
    u and the states x are kept for the backward pass; no (T, B, ·) drive is made.

    u (T, B, input) real, time-major; weight (2N, input), rows alternating Re, Im (γ folded in);
    x0 (B, N) and lam (N,) complex; p the probes (T, B, 2N) packed (the monitor's zeros), or None
    for an unprobed pass. The probe enters as the drive does, so its gradient is the adjoint
    itself, kept whole for it (unprobed: a block's at a time). Returns the packed states
    (T, B, 2N) and the last one (a copy).
    """

    @staticmethod
    def forward(ctx, u: Tensor, weight: Tensor, x0: Tensor, lam: Tensor, p: Tensor | None
                ) -> tuple[Tensor, Tensor]:
        u = u.contiguous()  # each block's rows (steps × sequences) in one matrix
        T, B, _ = u.shape
        x = torch.empty(T, B, lam.shape[0], dtype=lam.dtype, device=u.device)
        L = block_length(B, weight.shape[0])
        state = x0
        for t0 in range(0, T, L):
            t1 = min(t0 + L, T)
            rows = u[t0:t1].flatten(0, 1)
            drive = (torch.mm(rows, weight.T) if p is None
                     else torch.addmm(p[t0:t1].flatten(0, 1), rows, weight.T))
            state = steps_forward(lam, unpack(drive.view(t1 - t0, B, -1)), state, x[t0:t1])
        ctx.probed = p is not None
        ctx.save_for_backward(u, weight, x0, lam, x)
        xs = pack(x)
        return xs, xs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_xs: Tensor | None, d_last: Tensor | None
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        u, weight, x0, lam, x = ctx.saved_tensors
        T, B, N = x.shape
        lam_conj = lam.conj().resolve_conj()
        grad = unpack(d_xs) if d_xs is not None else torch.zeros_like(x)  # the reads' ∂L/∂x_t
        adjoints = torch.empty_like(x) if ctx.probed else None  # the probes' gradient
        grad_u = torch.empty_like(u)
        grad_weight = torch.zeros_like(weight)
        grad_lam = torch.zeros_like(lam)

        def block(t0: int, t1: int, adjoint: Tensor) -> None:
            before = x[t0 - 1:t1 - 1] if t0 else torch.cat([x0[None], x[:t1 - 1]])
            grad_lam.add_(sum_over_steps(before, adjoint))
            rows = pack(adjoint).flatten(0, 1)  # (steps·B, 2N): ∂L/∂(W u_t)
            torch.mm(rows, weight, out=grad_u[t0:t1].flatten(0, 1))
            grad_weight.addmm_(rows.T, u[t0:t1].flatten(0, 1))

        # The last step's adjoint: its read and what the next chunk sends back (the last state).
        g = adjoints[-1] if ctx.probed else torch.empty_like(x0)
        g.copy_(grad[-1])
        if d_last is not None:
            g += unpack(d_last)
        block(T - 1, T, g[None])
        L = block_length(B, weight.shape[0])
        for t1 in range(T - 1, 0, -L):
            t0 = max(t1 - L, 0)
            adjoint = adjoints[t0:t1] if ctx.probed else torch.empty_like(x[t0:t1])
            g = steps_adjoint(lam_conj, grad[t0:t1], g, lam_conj, adjoint)
            block(t0, t1, adjoint)
        return (grad_u, grad_weight, lam_conj * g, grad_lam,
                pack(adjoints) if ctx.probed else None)


def pack(x: Tensor) -> Tensor:
    """Complex (…, N) → real (…, 2N), interleaved (Re x_1, Im x_1, …): a view."""
    return torch.view_as_real(x).flatten(-2)


def unpack(state: Tensor) -> Tensor:
    """Real (…, 2N), interleaved → complex (…, N): a view where the memory layout allows."""
    pairs = state.unflatten(-1, (-1, 2))
    if (pairs.stride(-1) != 1 or pairs.storage_offset() % 2
            or any(s % 2 for s in pairs.stride()[:-1])):
        pairs = pairs.contiguous()
    return torch.view_as_complex(pairs)
