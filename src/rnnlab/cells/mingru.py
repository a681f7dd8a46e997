"""minGRU (Feng, Tung, Ahmed, Bengio & Hajimirsadeghi, "Were RNNs All We Needed?", 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnlab.cells.base import Cell, State
from rnnlab.cells.scan import linear_scan


def g(x: Tensor) -> Tensor:
    """The paper's positive activation, x + 1/2 for x ≥ 0 and σ(x) below, as max(x + 1/2, σ(x)):
    the same function (σ lies below its tangent 1/2 + x/4 for x ≥ 0 and above it for x < 0),
    in three passes instead of a `where` over both branches."""
    return torch.maximum(x + 0.5, torch.sigmoid(x))


def log_space_scan(log_a: Tensor, log_b: Tensor, h0: Tensor) -> Tensor:
    """The paper's parallel scan of h_t = a_t ⊙ h_{t−1} + b_t for b_t > 0, in log space:

        h_t = exp(a*_t) ⊙ h_{−1} + exp(a*_t + logcumsumexp_{s≤t}(log b_s − a*_s)),
        a*_t = Σ_{s≤t} log a_s

    (the h_{−1} term kept apart, so h_{−1} may be any real). log_a, log_b: (B, T, H); h0:
    (B, H). Its error grows with |a*_t| (cancellation between a*_t and the logcumsumexp).
    """
    a_star = torch.cumsum(log_a, dim=1)
    return (torch.exp(a_star + torch.logcumsumexp(log_b - a_star, dim=1))
            + torch.exp(a_star) * h0.unsqueeze(1))


class MinGRU(Cell):
    """The GRU with its gates computed from the input alone, in the paper's log-space form:

        z_t = σ(W_z u_t + b_z)          h̃_t = g(W_h u_t + b_h)
        h_t = (1 − z_t) ⊙ h_{t−1} + z_t ⊙ h̃_t

    State (h,), (B, hidden_size). Feng, Tung, Ahmed, Bengio & Hajimirsadeghi, "Were RNNs All We
    Needed?", arXiv:2410.01201, 2024 (its appendix's minimal PyTorch code). g keeps h̃_t > 0, so
    h_t > 0 from h_{−1} ≥ 0, and the recurrence h_t = a_t ⊙ h_{t−1} + b_t (a_t = 1 − z_t,
    b_t = z_t ⊙ h̃_t) has a parallel form. The paper's is the log-space scan (`log_space_scan`:
    one cumsum and one logcumsumexp), which needs log b_t, hence b_t > 0. `sequence` instead
    runs the chunked scan `rnnlab.cells.scan.linear_scan` on a_t, b_t themselves: it never
    divides by a running product (the reason for the paper's logs), since 0 < a_t < 1 only
    shrinks them, and on this CPU it measured faster than torch's logcumsumexp
    (`python scripts/bench.py --scans`). Both equal stepping to 1e-10 in float64 (tests).
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
        """u: (B, T, input) → h_t at every t (B, T, hidden), by the chunked scan."""
        k = self.gate(u)
        h = linear_scan(torch.sigmoid(-k), torch.sigmoid(k) * g(self.candidate(u)), state[0])
        return h, (h[:, -1],)

    def log_space_sequence(self, u: Tensor, state: State) -> tuple[Tensor, State]:
        """`sequence` by the paper's log-space scan (for comparison: `bench.py --scans`)."""
        k = self.gate(u)
        log_a = -F.softplus(k)  # log(1 − z_t)
        h_tilde = self.candidate(u)
        # log z_t + log g(h̃_t): log(h̃ + 1/2) above 0, log σ(h̃) = −softplus(−h̃) below
        log_b = -F.softplus(-k) + torch.where(h_tilde >= 0, torch.log(F.relu(h_tilde) + 0.5),
                                              -F.softplus(-h_tilde))
        h = log_space_scan(log_a, log_b, state[0])
        return h, (h[:, -1],)

    def jacobian_norms(self, u_t: Tensor, state: State, dt: Tensor | None) -> Tensor:
        """max_i (1 − z_t,i) per row: J = diag(1 − z_t)."""
        return torch.sigmoid(-self.gate(u_t)).amax(dim=-1)
