"""AntisymmetricRNN (Chang, Chen, Haber & Chi, ICLR 2019)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from rnnlab.cells.base import Cell, State
from rnnlab.cells.recurrences import (
    incoming_gradients,
    record_previous_chunk,
    recurrent_weight_gradient,
)
from rnnlab.config import is_number, require


class AntisymmetricRNN(Cell):
    """h_t = h_{t−1} + ε·tanh((W − Wᵀ − γI) h_{t−1} + V u_t + b): forward Euler on the ODE
    h' = tanh((W − Wᵀ − γI) h + V u + b).

    State (h,), (B, hidden_size). Chang, Chen, Haber & Chi, "AntisymmetricRNN: A Dynamical System
    View on Recurrent Neural Networks", ICLR 2019. W − Wᵀ has purely imaginary eigenvalues, so the
    ODE's Jacobian has eigenvalues with real part −γ·tanh' ≤ 0: stable and, at γ = 0, neither
    contracting nor expanding; the diffusion γ > 0 makes forward Euler with step ε stable too
    (|1 + ε λ| ≤ 1 needs a small margin into the left half-plane).

    Options: ``epsilon`` (ε, the step), ``gamma`` (γ, the diffusion), ``sigma`` (W ~ N(0, σ²/H)).
    V and b are initialised as ``nn.Linear``. The defaults, ε = 0.01, γ = 0.01, σ = 0.01, are
    from the paper's grids (ε ∈ {0.01, 0.1, 1}, γ ∈ {0.001, 0.01, 0.1, 1}); the authors' code is
    not public.
    """

    def __init__(self, input_size: int, hidden_size: int = 64, epsilon: float = 0.01,
                 gamma: float = 0.01, sigma: float = 0.01):
        super().__init__(input_size, hidden_size)
        require(is_number(epsilon) and epsilon > 0, "cell.epsilon", epsilon,
                "a finite number > 0")
        require(is_number(gamma) and gamma >= 0, "cell.gamma", gamma, "a finite number >= 0")
        require(is_number(sigma) and sigma >= 0, "cell.sigma", sigma, "a finite number >= 0")
        self.epsilon, self.gamma = float(epsilon), float(gamma)
        H = hidden_size
        self.input = nn.Linear(input_size, H)
        self.weight = nn.Parameter(torch.empty(H, H).normal_(0.0, sigma / math.sqrt(H)))

    def state_matrix(self) -> Tensor:
        """W − Wᵀ − γI: eigenvalues −γ + iω. (Not `recurrent_weight`: the step's Jacobian is
        I + ε·diag(tanh')·(W − Wᵀ − γI), not this matrix, so its spectrum is no gain.)"""
        eye = torch.eye(self.hidden_size, dtype=self.weight.dtype, device=self.weight.device)
        return self.weight - self.weight.T - self.gamma * eye

    def step(self, u_t: Tensor, state: State, dt: Tensor | None) -> State:
        return self.projected_step(self.input(u_t), state, dt)

    def slope(self, u: Tensor, h: Tensor, A: Tensor) -> Tensor:
        """ε(1 − a²), a = tanh(V u + b + A h): ∂h_t/∂pre_t of the steps from inputs u and states
        h (…, ·), A = W − Wᵀ − γI (`state_matrix`), for the Jacobian's products and the
        per-step parameter gradients; no graph."""
        with torch.no_grad():
            act = torch.tanh(torch.matmul(h, A.T).add_(self.input(u)))
            return torch.addcmul(torch.ones_like(act), act, act, value=-1).mul_(self.epsilon)

    def transition_jacobian(self, u_t: Tensor, state: State, dt: Tensor | None):
        """J = I + ε·diag(1 − a²)·A, a = tanh(V u_t + b + A h_{t−1}), A = W − Wᵀ − γI:
        Jv = v + s ⊙ (A v), Jᵀw = w + Aᵀ(s ⊙ w), s = ε(1 − a²) (one matmul each)."""
        A = self.state_matrix().detach()  # measured, never differentiated
        slope = self.slope(u_t, state[0], A)
        return (lambda v: torch.addcmul(v, slope, v @ A.T),
                lambda w: torch.addmm(w, slope * w, A))

    def step_parameter_grads(self, u: Tensor, previous: State, cotangents: State,
                             dt: Tensor | None) -> list[Tensor]:
        """dL/dW⁽ᵗ⁾ of C steps: with ∂L/∂pre_t = ε(1 − a_t²) ⊙ ∂L/∂h_t (a_t = tanh(pre_t)),
        A = W − Wᵀ − γI gets G_t = (∂L/∂pre_t)ᵀ h_{t−1} summed over the batch, so W gets
        G_t − G_tᵀ; V gets (∂L/∂pre_t)ᵀ u_t and b the sum of ∂L/∂pre_t (W, then V, b)."""
        (h,), (grad,) = previous, cotangents
        with torch.no_grad():
            d_pre = self.slope(u, h, self.state_matrix()).mul_(grad)
            d_a = torch.bmm(d_pre.transpose(1, 2), h)
            return [d_a - d_a.transpose(1, 2), torch.bmm(d_pre.transpose(1, 2), u), d_pre.sum(1)]

    def input_projection(self, u: Tensor) -> Tensor:
        """V u_t + b for many steps at once."""
        return self.input(u)

    def projected_step(self, g_t: Tensor, state: State, dt: Tensor | None) -> State:
        (h,) = state
        return (h + self.epsilon * torch.tanh(torch.addmm(g_t, h, self.state_matrix().T)),)

    def probed_sequence(self, g: Tensor, state: State, probes: State,
                        previous: list[State] | None) -> tuple[Tensor, State]:
        """A chunk of steps as one node (`AntisymmetricChunk`), W − Wᵀ − γI made once for it:
        ``g`` (C, B, H) from `input_projection`, time-major, as ``probes[0]``; returns h_t at
        every step and the last state."""
        hs, last = AntisymmetricChunk.apply(g, state[0], self.state_matrix(), probes[0],
                                            self.epsilon)
        record_previous_chunk(previous, state[0], hs)
        return hs, (last,)

    def plain_path(self, seq_len: int, device: torch.device) -> str:
        # Stepped, each step rebuilds W − Wᵀ − γI and its backward (three operations on an
        # H × H matrix, T times); a chunk makes it once. `scripts/bench.py`'s model at T = 100
        # (B = 64, H = 128, CPU): 40–41 steps/s stepped, 72–74 in chunks.
        return "chunks"


class AntisymmetricChunk(torch.autograd.Function):
    """h_t = h_{t−1} + ε·tanh(g_t + A h_{t−1}) + p_t over a chunk, A = W − Wᵀ − γI given (the
    gradient goes back to W through it), g (C, B, H) time-major, h0 (B, H), the probes p
    (C, B, H). With a_t = tanh(pre_t) kept, the step's Jacobian is I + ε·diag(1 − a_t²)·A, so
    backwards ∂L/∂pre_t = ε(1 − a_t²) ⊙ ∂L/∂h_t and ∂L/∂h_{t−1} gains ∂L/∂h_t + (∂L/∂pre_t) A:
    the probes' gradient is ∂L/∂h_t, g's is ∂L/∂pre_t, and A's Σ_t (∂L/∂pre_t)ᵀ h_{t−1}.
    Returns h_t at every step and the last state (a copy)."""

    @staticmethod
    def forward(ctx, g: Tensor, h0: Tensor, a: Tensor, p: Tensor, epsilon: float
                ) -> tuple[Tensor, Tensor]:
        hs = torch.empty_like(g)
        acts = torch.empty_like(g)  # tanh(pre_t)
        h = h0
        for t in range(g.shape[0]):
            torch.addmm(g[t], h, a.t(), out=acts[t]).tanh_()
            h = torch.add(h, acts[t], alpha=epsilon, out=hs[t]).add_(p[t])
        ctx.epsilon = epsilon
        ctx.save_for_backward(acts, hs, h0, a)
        return hs, hs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_hs: Tensor | None, d_last: Tensor | None):
        acts, hs, h0, a = ctx.saved_tensors
        one = hs.new_ones(())
        d_probe = incoming_gradients(d_hs, d_last, hs)  # ∂L/∂h_t once step t+1 has added
        d_pre = torch.addcmul(one, acts, acts, value=-1).mul_(ctx.epsilon)  # then × ∂L/∂h_t
        for t in range(acts.shape[0] - 1, -1, -1):
            d_pre[t].mul_(d_probe[t])
            if t > 0:
                d_probe[t - 1].add_(d_probe[t]).addmm_(d_pre[t], a)
        d_h0 = torch.addmm(d_probe[0], d_pre[0], a)
        return d_pre, d_h0, recurrent_weight_gradient(d_pre, h0, hs), d_probe, None
