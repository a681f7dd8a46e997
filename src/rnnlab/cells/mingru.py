"""minGRU (Feng, Tung, Ahmed, Bengio & Hajimirsadeghi, "Were RNNs All We Needed?", 2024)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from rnnlab.cells.base import Cell, State
from rnnlab.cells.recurrences import incoming_gradients, record_previous_chunk
from rnnlab.cells.scan import (
    block_length,
    chunk_adjoint,
    steps_adjoint,
    steps_forward,
    time_major,
)


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
    is `MinGRUScan`, the recurrence on a_t, b_t themselves (`rnnlab.cells.scan`: one in-place
    operation per step, a hand-written backward): it never divides by a running product (the
    reason for the paper's logs), and on this CPU it measured 13–22× faster than torch's
    logcumsumexp (`python scripts/bench.py --scans`). Both equal stepping to 1e-10 in float64.
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

    def step_parameter_grads(self, u: Tensor, previous: State, cotangents: State,
                             dt: Tensor | None) -> list[Tensor]:
        """dL/dW⁽ᵗ⁾ of C steps: with ∂L/∂h_t = g_h, the gate's pre-activation k gets
        g_h σ(k)σ(−k)(h̃ − h_{t−1}) and the candidate's c gets g_h σ(k) g'(c) (`candidate_slope`,
        as the scan's backward); both Linears' weights then get one batched outer product of
        [∂k, ∂c] with u_t, their biases its sum over the batch."""
        (h,), (grad,) = previous, cotangents
        with torch.no_grad():
            k, c = self.input_projection(u).chunk(2, -1)
            z, s = torch.sigmoid(k), torch.sigmoid(c)
            H = self.hidden_size
            d = grad.new_empty(*grad.shape[:-1], 2 * H)  # [∂k, ∂c]: one product for both
            d_k, d_c = d.chunk(2, -1)
            gz = torch.mul(grad, z)
            torch.mul(gz, candidate_slope(c, s), out=d_c)
            torch.addcmul(gz, gz, z, value=-1, out=d_k).mul_(torch.maximum(c + 0.5, s).sub_(h))
            d_w, d_b = torch.bmm(d.transpose(1, 2), u), d.sum(1)
            return [d_w[:, :H], d_b[:, :H], d_w[:, H:], d_b[:, H:]]

    def stacked(self) -> tuple[Tensor, Tensor]:
        """[W_z; W_h] (2H, input) and [b_z; b_h] (2H,): both gates as one linear map."""
        return (torch.cat([self.gate.weight, self.candidate.weight]),
                torch.cat([self.gate.bias, self.candidate.bias]))

    def input_projection(self, u: Tensor) -> Tensor:
        """[k_t, c_t] = [W_z u_t + b_z, W_h u_t + b_h]: u (…, input) → (…, 2H)."""
        return F.linear(u, *self.stacked())

    def projected_step(self, g_t: Tensor, state: State, dt: Tensor | None) -> State:
        k, c = g_t.chunk(2, -1)
        return (torch.sigmoid(-k) * state[0] + torch.sigmoid(k) * g(c),)

    def probed_sequence(self, g_: Tensor, state: State, probes: State,
                        previous: list[State] | None) -> tuple[Tensor, State]:
        """A chunk of probed steps h_t = a_t ⊙ h_{t−1} + b_t + p_t as one scan (`ProbedMinGRU`):
        the probe enters as b_t does, so its gradient is the scan's adjoint ∂L/∂h_t, and a
        monitored step runs the scan too. ``g_`` (C, B, 2H) from `input_projection`, time-major,
        as ``probes[0]`` (C, B, H); returns h_t at every step (C, B, H) and the last state."""
        hs, last = ProbedMinGRU.apply(g_, state[0], probes[0])
        record_previous_chunk(previous, state[0], hs)
        return hs, (last,)

    def sequence(self, u: Tensor, state: State) -> tuple[Tensor, State]:
        """u: (B, T, input) → h_t at every t (B, T, hidden), by the scan `MinGRUScan`."""
        h = MinGRUScan.apply(u, *self.stacked(), state[0])
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
        return self.keep(u_t).amax(dim=-1)

    def transition_jacobian(self, u_t: Tensor, state: State, dt: Tensor | None):
        """J v = (1 − z_t) ⊙ v = Jᵀ v: the gate reads the input alone."""
        keep = self.keep(u_t)
        return (lambda v: keep * v, lambda w: keep * w)

    def keep(self, u_t: Tensor) -> Tensor:
        """1 − z_t = σ(−(W_z u_t + b_z)), J's diagonal."""
        return torch.sigmoid(-self.gate(u_t))


class MinGRUScan(torch.autograd.Function):
    """h_t = (1 − z_t) ⊙ h_{t−1} + z_t ⊙ g(h̃_t) over the whole sequence, a block of
    `block_length` steps at a time, so that each block's gates (one matmul for both) and their
    gradients are made and used while in the cache. The backward pass recomputes each block's
    gates (one matmul again) instead of keeping them: only u and h are kept. With a_t = 1 − z_t,
    b_t = z_t ⊙ g(h̃_t) and the adjoint g_t = ∂L/∂h_t + a_{t+1} ⊙ g_{t+1} (`rnnlab.cells.scan`):

        ∂L/∂k_t = g_t ⊙ z_t ⊙ a_t ⊙ (g(h̃_t) − h_{t−1})     (k_t = W_z u_t + b_z)
        ∂L/∂h̃_t = g_t ⊙ z_t ⊙ g'(h̃_t),  g' = 1 for h̃ ≥ 0, σ(h̃)(1 − σ(h̃)) below

    u (B, T, input); weight (2H, input) and bias (2H,): [W_z; W_h] and [b_z; b_h]; h0 (B, H).
    Returns h (B, T, H), a view of a time-major buffer.
    """

    @staticmethod
    def forward(ctx, u: Tensor, weight: Tensor, bias: Tensor, h0: Tensor) -> Tensor:
        B, T, _ = u.shape
        u, weights = with_ones(u), with_bias(weight, bias)
        h = torch.empty(T, B, h0.shape[-1], dtype=h0.dtype, device=u.device)
        L = block_length(B, weight.shape[0])
        state = h0
        for t0 in range(0, T, L):
            t1 = min(t0 + L, T)
            z, a, c, sigma_c = gates(u[t0:t1], weights)
            b = candidate(c, sigma_c).mul_(z)  # z_t ⊙ g(c_t)
            state = steps_forward(a, b, state, h[t0:t1])
        ctx.save_for_backward(u, weights, h0, h)
        return time_major(h)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        u, weights, h0, h = ctx.saved_tensors  # u [u_t, 1] and h time-major
        T, B, inputs = u.shape[0], u.shape[1], u.shape[2] - 1
        grad = time_major(grad)
        grad_u = torch.empty(T, B, inputs, dtype=u.dtype, device=u.device)
        grad_weights = torch.zeros_like(weights)  # [∂L/∂W, ∂L/∂b] of each gate
        L = block_length(B, 2 * weights.shape[1])
        g = a_after = torch.zeros_like(h0)  # nothing after the last step
        for t0 in reversed(range(0, T, L)):
            t1 = min(t0 + L, T)
            z, a, c, sigma_c = gates(u[t0:t1], weights)
            slope = candidate_slope(c, sigma_c)
            g_c = candidate(c, sigma_c)
            grad_gates = torch.empty(2, *z.shape, dtype=h.dtype, device=h.device)
            grad_k, grad_c = grad_gates
            adjoint = torch.empty_like(z)
            g = steps_adjoint(a, grad[t0:t1], g, a_after, adjoint).clone()  # adjoint changes
            a_after = a[0]
            before = h[t0 - 1:t1 - 1] if t0 else torch.cat([h0[None], h[:t1 - 1]])
            adjoint.mul_(z)  # g_t ⊙ z_t, shared by both gates
            torch.sub(g_c, before, out=grad_k).mul_(a).mul_(adjoint)
            torch.mul(adjoint, slope, out=grad_c)
            rows = grad_gates.flatten(1, 2)  # (2, L·B, H)
            out = torch.mm(rows[0], weights[0, :, :inputs], out=grad_u[t0:t1].flatten(0, 1))
            out.addmm_(rows[1], weights[1, :, :inputs])
            grad_weights.baddbmm_(rows.transpose(1, 2), u[t0:t1].flatten(0, 1).expand(2, -1, -1))
        grad_weight, grad_bias = grad_weights.flatten(0, 1).split([inputs, 1], dim=1)
        return time_major(grad_u), grad_weight, grad_bias.flatten(), a_after * g


class ProbedMinGRU(torch.autograd.Function):
    """A probed chunk, h_t = (1 − z_t) ⊙ h_{t−1} + z_t ⊙ g(h̃_t) + p_t, from its input projection
    [k_t, c_t] (C, B, 2H), time-major, the state before it h0 (B, H) and the probes p (C, B, H).
    Keeps only the projection and the states, as `MinGRUScan` keeps u and h (autograd on the
    gates and a `linear_scan` kept five (C, B, H) tensors more), and its backward remakes the
    gates: ∂L/∂k_t and ∂L/∂c_t as there, ∂L/∂p_t = g_t the adjoint, ∂L/∂h0 = a_0 ⊙ g_0.
    Returns h_t at every step (C, B, H) and the last state (a copy)."""

    @staticmethod
    def forward(ctx, g_: Tensor, h0: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        z, a, c, sigma_c = activations(*split_projection(g_))
        b = candidate(c, sigma_c).mul_(z).add_(p)
        hs = torch.empty_like(b)
        steps_forward(a, b, h0, hs)
        ctx.save_for_backward(g_, h0, hs)
        return hs, hs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_hs: Tensor | None, d_last: Tensor | None
                 ) -> tuple[Tensor, Tensor, Tensor]:
        g_, h0, hs = ctx.saved_tensors
        z, a, c, sigma_c = activations(*split_projection(g_))
        slope = candidate_slope(c, sigma_c)
        g_c = candidate(c, sigma_c)
        adjoint = chunk_adjoint(a, incoming_gradients(d_hs, d_last, hs))  # ∂L/∂h_t, the probes'
        before = torch.cat([h0[None], hs[:-1]])
        shared = adjoint * z  # g_t ⊙ z_t, for both gates
        d_k = g_c.sub_(before).mul_(a).mul_(shared)
        return torch.cat([d_k, shared.mul_(slope)], -1), a[0] * adjoint[0], adjoint


def with_ones(u: Tensor) -> Tensor:
    """u (B, T, input) → [u_t, 1] time-major (T, B, input + 1): each block's rows (steps ×
    sequences) one matrix, and the biases one more column of the weights."""
    out = torch.empty(u.shape[1], u.shape[0], u.shape[2] + 1, dtype=u.dtype, device=u.device)
    out[..., :-1] = time_major(u)
    out[..., -1] = 1
    return out


def with_bias(weight: Tensor, bias: Tensor) -> Tensor:
    """[W_z, b_z] and [W_h, b_h]: (2, H, input + 1)."""
    return torch.cat([weight, bias[:, None]], dim=1).unflatten(0, (2, -1))


def gates(u: Tensor, weights: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For a block of inputs [u_t, 1] (L, B, input + 1): z_t, 1 − z_t = σ(−k_t), the
    candidate's pre-activation c_t and σ(c_t), each (L, B, H), fresh."""
    return activations(*pre_activations(u, weights))


def activations(k: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """From fresh pre-activations k, c (changed in place): z = σ(k), 1 − z = σ(−k), c, σ(c)."""
    z = torch.sigmoid(k)
    return z, torch.sigmoid(k.neg_()), c, torch.sigmoid(c)


def split_projection(g_: Tensor) -> tuple[Tensor, Tensor]:
    """k and c of a projection [k, c] (…, 2H), as fresh contiguous copies."""
    return tuple(x.clone(memory_format=torch.contiguous_format) for x in g_.chunk(2, -1))


def pre_activations(u: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """For a block of inputs [u_t, 1] (L, B, input + 1): k_t = W_z u_t + b_z and
    c_t = W_h u_t + b_h, each (L, B, H), contiguous (one batched matmul; halves of one
    (L, B, 2H) product would be strided, and every elementwise operation on them slower) and
    fresh, to be changed in place."""
    out = torch.bmm(u.flatten(0, 1).expand(2, -1, -1), weights.transpose(1, 2))
    return tuple(out.unflatten(1, u.shape[:2]))


def candidate(c: Tensor, sigma_c: Tensor) -> Tensor:
    """g(c) = max(c + 1/2, σ(c)) from c and σ(c), into σ(c)'s memory (c changed too)."""
    return torch.maximum(c.add_(0.5), sigma_c, out=sigma_c)


def candidate_slope(c: Tensor, sigma_c: Tensor) -> Tensor:
    """g'(c) = 1 for c > 0 and σ'(c) = σ(c) − σ(c)² for c < 0, as σ' + (1 + sign c)·(1 − σ')/2:
    no boolean mask (masked operations run 20× slower than arithmetic here), exactly σ' below 0
    (no cancellation: σ² ≤ σ/2 there), and at c = 0 the mean of the two sides, as autograd
    differentiates the tie in `g`'s max."""
    slope = torch.addcmul(sigma_c, sigma_c, sigma_c, value=-1)
    half_rest = torch.rsub(slope, 0.5, alpha=0.5)  # (1 − σ')/2
    return slope.addcmul_(torch.sign(c).add_(1), half_rest)
