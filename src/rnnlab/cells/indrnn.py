"""IndRNN, the independently recurrent network (Li, Li, Cook, Zhu & Gao, CVPR 2018)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from rnnlab.cells.base import Cell, State
from rnnlab.cells.recurrences import incoming_gradients, record_previous_chunk
from rnnlab.cells.scan import chunk_adjoint, sum_over_steps
from rnnlab.config import is_int, is_number, require


class IndRNN(Cell):
    """h_t = relu(W u_t + b + w ⊙ h_{t−1}): one recurrent weight w_i per unit, no mixing in time.

    State (h,), (B, hidden_size). Li, Li, Cook, Zhu & Gao, "Independently Recurrent Neural
    Network (IndRNN): Building a longer and deeper RNN", CVPR 2018 (github.com/Sunnydreamrain/
    IndRNN_Theano_Lasagne). The Jacobian ∂h_t/∂h_{t−1} = diag(w ⊙ relu'(·)) is diagonal, so unit
    i's gradient over T steps is Π w_i (or 0 once the unit is off): bounding |w_i| ≤ MAG^{1/T}
    lets it grow by at most MAG, and w_i ≥ MAG^{−1/T} would keep it above 1/MAG.

    Options:

    - ``horizon`` (T) and ``magnitude`` (MAG): with ``horizon`` set, |w_i| ≤ MAG^{1/T} (the
      authors' adding script: MAG = 2, w initialised U(0, MAG^{1/T})). The bound is applied as
      w_eff = clamp(w, −bound, bound) in every step, so every path sees the same bounded weight;
      the authors instead clip the stored w before each update (a w past the bound gets no
      gradient here and stays at it, as clipping leaves it while the gradient pushes outward).
      ``horizon: null`` (default): no bound, w initialised U(0, 1).
    - W and b are initialised as ``nn.Linear`` (the authors use N(0, 0.001²) for W, with no
      encoder before it).
    """

    def __init__(self, input_size: int, hidden_size: int = 64, horizon: int | None = None,
                 magnitude: float = 2.0):
        super().__init__(input_size, hidden_size)
        require(horizon is None or is_int(horizon, 1), "cell.horizon", horizon,
                "null (no bound on the recurrent weights) or an integer >= 1 (the T of the "
                "bound |w| <= magnitude^(1/T))")
        require(is_number(magnitude) and magnitude >= 1, "cell.magnitude", magnitude,
                "a finite number >= 1 (the largest growth of a unit's gradient over horizon "
                "steps)")
        self.bound = float(magnitude) ** (1.0 / horizon) if horizon is not None else None
        self.input = nn.Linear(input_size, hidden_size)
        self.recurrent = nn.Parameter(torch.empty(hidden_size).uniform_(0.0, self.bound or 1.0))

    def recurrent_weights(self) -> Tensor:
        """w as the step uses it: clamped to ±bound when ``horizon`` is set. (hidden,)"""
        if self.bound is None:
            return self.recurrent
        return self.recurrent.clamp(-self.bound, self.bound)

    def step(self, u_t: Tensor, state: State, dt: Tensor | None) -> State:
        (h,) = state
        return (torch.relu(self.input(u_t) + self.recurrent_weights() * h),)

    def step_parameter_grads(self, u: Tensor, previous: State, cotangents: State,
                             dt: Tensor | None) -> list[Tensor]:
        """dL/dW⁽ᵗ⁾ of C steps: with δ_t = ∂L/∂h_t ⊙ 1[pre_t > 0], W gets δ_tᵀ u_t, b the sum
        of δ_t over the batch, and w the sum of δ_t ⊙ h_{t−1}, where the bound lets it through
        (as autograd differentiates `clamp`: where −bound ≤ w ≤ bound)."""
        (h,), (grad,) = previous, cotangents
        with torch.no_grad():
            pre = torch.addcmul(self.input(u), self.recurrent_weights(), h)
            delta = relu_backward(grad, pre)
            d_w = (delta * h).sum(1)
            if self.bound is not None:
                d_w = d_w * (self.recurrent.abs() <= self.bound)
            return [d_w, torch.bmm(delta.transpose(1, 2), u), delta.sum(1)]  # w, then W, b

    def input_projection(self, u: Tensor) -> Tensor:
        """W u_t + b for many steps at once: the loop then makes one matmul per chunk."""
        return self.input(u)

    def projected_step(self, g_t: Tensor, state: State, dt: Tensor | None) -> State:
        return (torch.relu(g_t + self.recurrent_weights() * state[0]),)

    def probed_sequence(self, g: Tensor, state: State, probes: State,
                        previous: list[State] | None) -> tuple[Tensor, State]:
        """A chunk of probed steps as one node (`ProbedIndRNN`): ``g`` (C, B, H) from
        `input_projection`, time-major, as ``probes[0]``; returns h_t at every step and the
        last state."""
        hs, last = ProbedIndRNN.apply(g, state[0], self.recurrent_weights(), probes[0])
        record_previous_chunk(previous, state[0], hs)
        return hs, (last,)

    def jacobian_norms(self, u_t: Tensor, state: State, dt: Tensor | None) -> Tensor:
        """max_i |w_i|·1[pre_i > 0] per row: J = diag(w ⊙ relu'(pre)), relu'(0) = 0 as in torch."""
        return self.slopes(u_t, state[0]).abs().amax(dim=-1)

    def transition_jacobian(self, u_t: Tensor, state: State, dt: Tensor | None):
        """J v = w ⊙ relu'(pre) ⊙ v = Jᵀ v."""
        slopes = self.slopes(u_t, state[0])
        return (lambda v: slopes * v, lambda w: slopes * w)

    def slopes(self, u_t: Tensor, h: Tensor) -> Tensor:
        """w ⊙ relu'(pre_t), J's diagonal, with the step's pre-activation W u_t + b + w ⊙ h."""
        w = self.recurrent_weights()
        return relu_backward(w.expand_as(h), self.input(u_t) + w * h)


class ProbedIndRNN(torch.autograd.Function):
    """A probed chunk h_t = relu(g_t + w ⊙ h_{t−1}) + p_t from its projection g (C, B, H),
    time-major, the state before it h0 (B, H), the weights w (H,) as the step uses them and the
    probes p (C, B, H). Keeps the states and the units' activations relu(pre_t). With
    m_t = 1[pre_t > 0] (relu'(0) = 0, as torch's), the step's Jacobian is diag(w ⊙ m_t), so the
    backward is the diagonal scan of `rnnlab.cells.scan`: the adjoint g_t = ∂L/∂h_t +
    w ⊙ m_{t+1} ⊙ g_{t+1} is the probes' gradient, ∂L/∂pre_t = m_t ⊙ g_t is g's, and
    ∂L/∂w = Σ_t ∂L/∂pre_t ⊙ h_{t−1}. Returns h_t at every step and the last state (a copy)."""

    @staticmethod
    def forward(ctx, g: Tensor, h0: Tensor, w: Tensor, p: Tensor) -> tuple[Tensor, Tensor]:
        hs = torch.empty_like(g)
        acts = torch.empty_like(g)  # relu(pre_t), before the probe
        h = h0
        for t in range(g.shape[0]):
            torch.addcmul(g[t], w, h, out=acts[t]).clamp_min_(0)
            h = torch.add(acts[t], p[t], out=hs[t])
        ctx.save_for_backward(acts, hs, h0, w)
        return hs, hs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_hs: Tensor | None, d_last: Tensor | None
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        acts, hs, h0, w = ctx.saved_tensors
        on = torch.sign(acts)  # m_t: 1 where relu(pre_t) > 0, else 0
        adjoint = chunk_adjoint(on * w, incoming_gradients(d_hs, d_last, hs))
        d_pre = on.mul_(adjoint)
        d_w = sum_over_steps(hs[:-1], d_pre[1:]) + sum_over_steps(h0[None], d_pre[:1])
        return d_pre, w * d_pre[0], d_w, adjoint


def relu_backward(grad: Tensor, pre: Tensor) -> Tensor:
    """grad where pre > 0, else 0: autograd's derivative of relu, by its own kernel (0 at
    pre = 0; at a nan pre, which is not ≤ 0, the gradient passes), about 40× faster here than a
    product with the boolean mask (0.07 against 3.0 ms for 100 × 64 × 128 values)."""
    return torch.ops.aten.threshold_backward(grad, pre, 0)
