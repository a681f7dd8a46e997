"""minGRU (Feng, Tung, Ahmed, Bengio & Hajimirsadeghi, "Were RNNs All We Needed?", 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnlab.cells.base import Cell, State


def g(x: Tensor) -> Tensor:
    """The paper's positive activation: x + 1/2 for x ≥ 0, σ(x) below (continuous at 0)."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def log_g(x: Tensor) -> Tensor:
    """log g(x), finite for every x (each branch is evaluated on all x)."""
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -F.softplus(-x))


class MinGRU(Cell):
    """The GRU with its gates computed from the input alone, in the paper's log-space form:

        z_t = σ(W_z u_t + b_z)          h̃_t = g(W_h u_t + b_h)
        h_t = (1 − z_t) ⊙ h_{t−1} + z_t ⊙ h̃_t

    State (h,), (B, hidden_size). Feng, Tung, Ahmed, Bengio & Hajimirsadeghi, "Were RNNs All We
    Needed?", arXiv:2410.01201, 2024. g keeps h̃_t > 0, so h_t > 0 from h_{−1} ≥ 0 and the
    recurrence h_t = a_t ⊙ h_{t−1} + b_t (a_t = 1 − z_t, b_t = z_t ⊙ h̃_t) can be summed in log
    space: with a*_t = Σ_{s≤t} log a_s,

        h_t = exp(a*_t) ⊙ h_{−1} + exp(a*_t + logcumsumexp_{s≤t}(log b_s − a*_s)),

    `sequence`'s fast path (one cumsum and one logcumsumexp over T instead of T steps; the h_{−1}
    term is kept apart so any initial state works). Its error grows with |a*_t| (cancellation
    between a*_t and the logcumsumexp): equal to stepping to 1e-10 in float64 at the tested T.
    ∂h_t/∂h_{t−1} = diag(1 − z_t) does not depend on h: `jacobian_norms` is max_i (1 − z_t,i).
    """

    def __init__(self, input_size: int, hidden_size: int = 64):
        super().__init__(input_size, hidden_size)
        self.gate = nn.Linear(input_size, hidden_size)  # W_z, b_z
        self.candidate = nn.Linear(input_size, hidden_size)  # W_h, b_h

    def step(self, u_t: Tensor, state: State, dt: Tensor | None) -> State:
        (h,) = state
        k = self.gate(u_t)
        # 1 − σ(k) = σ(−k), without the cancellation where σ(k) ≈ 1
        return (torch.sigmoid(-k) * h + torch.sigmoid(k) * g(self.candidate(u_t)),)

    def sequence(self, u: Tensor, state: State) -> tuple[Tensor, State]:
        """u: (B, T, input) → h_t at every t (B, T, hidden), by the log-space scan."""
        (h0,) = state
        k = self.gate(u)
        log_a = -F.softplus(k)  # log(1 − z_t)
        log_b = -F.softplus(-k) + log_g(self.candidate(u))  # log z_t + log h̃_t
        a_star = torch.cumsum(log_a, dim=1)
        h = (torch.exp(a_star + torch.logcumsumexp(log_b - a_star, dim=1))
             + torch.exp(a_star) * h0.unsqueeze(1))
        return h, (h[:, -1],)

    def jacobian_norms(self, u_t: Tensor, state: State, dt: Tensor | None) -> Tensor:
        """max_i (1 − z_t,i) per row: J = diag(1 − z_t)."""
        return torch.sigmoid(-self.gate(u_t)).amax(dim=-1)
