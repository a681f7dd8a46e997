"""The Elman RNN: z_t = φ(W z_{t−1} + U u_t + b)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize

from rnnlab.cells.base import Cell, State
from rnnlab.cells.recurrences import ProbedElman
from rnnlab.config import is_number, require, require_choice
from rnnlab.meanfield import CRITICAL_BIAS_SCALE, critical_weight_scale

NONLINEARITIES = {
    "tanh": torch.tanh,
    "relu": torch.relu,
    "sigmoid": torch.sigmoid,
    "identity": lambda x: x,
}
# φ'(a) from the pre-activation a and φ(a), as autograd differentiates each φ (relu: 1 where
# a > 0, else 0).
SLOPES = {
    "tanh": lambda a, y: 1 - y * y,
    "relu": lambda a, y: (a > 0).to(a.dtype),
    "sigmoid": lambda a, y: y * (1 - y),
    "identity": lambda a, y: torch.ones_like(a),
}
INITS = ("default", "orthogonal", "identity", "normal", "critical")
CONSTRAINTS = ("none", "orthogonal")


class Scale(nn.Module):
    """W ↦ gain·W, a parametrization stacked on the orthogonal one: W = gain·Q."""

    def __init__(self, gain: float):
        super().__init__()
        self.gain = gain

    def forward(self, W: Tensor) -> Tensor:
        return self.gain * W

    def right_inverse(self, W: Tensor) -> Tensor:
        return W / self.gain


class ElmanRNN(Cell):
    """z_t = φ(W z_{t−1} + U u_t + b), with b = b_ih + b_hh as in `torch.nn.RNN`.

    - ``nonlinearity`` φ ∈ {tanh, relu, sigmoid, identity}; identity gives the linear RNN whose
      gradient scales by exactly ``gain`` per step when W is orthogonal (docs/architecture.md).
    - ``init`` of W: ``default`` (PyTorch's U(±1/√H)), ``orthogonal`` (W = Q, QᵀQ = I),
      ``identity`` (the IRNN of Le et al. 2015), ``normal`` (N(0, 1/H): spectral radius ≈ 1),
      ``critical`` (tanh: W = σ_w·Q orthogonal, b ~ N(0, σ_b²) with (σ_w, σ_b) on the mean-field
      order-to-chaos boundary, `rnnlab.meanfield`; Chen, Pennington & Schoenholz 2018).
    - ``gain`` scales W after init: ``init=orthogonal gain=g`` gives W = g·Q.
    - ``constraint=orthogonal`` keeps W = gain·Q with Q exactly orthogonal throughout training:
      the optimiser moves an unconstrained matrix A and Q = B·exp(A − Aᵀ)
      (`torch.nn.utils.parametrizations.orthogonal`; expRNN, Lezcano-Casado & Martínez-Rubio
      2019). With ``nonlinearity=identity gain=1`` every backward step is a rotation, so
      ||dL/dz_t|| stays constant in t for the whole run. The initial Q is W's init, made
      orthogonal by a QR decomposition unless it already is.

    Parameters are named as in `torch.nn.RNN` (with the constraint, ``weight_hh`` is computed
    from ``parametrizations.weight_hh.original``); for tanh and relu, `sequence` runs PyTorch's
    fused kernel on them.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int = 64,
        nonlinearity: str = "tanh",
        init: str = "default",
        gain: float = 1.0,
        constraint: str = "none",
    ):
        super().__init__(input_size, hidden_size)
        self.nonlinearity = require_choice("cell.nonlinearity", nonlinearity, tuple(NONLINEARITIES))
        require_choice("cell.init", init, INITS)
        require(is_number(gain) and gain > 0,
                "cell.gain", gain, "a finite number > 0")
        require_choice("cell.constraint", constraint, CONSTRAINTS)
        self.phi = NONLINEARITIES[nonlinearity]
        if nonlinearity != "tanh":  # `ProbedElman` writes out tanh's step
            self.probed_sequence = None
        H = hidden_size
        bound = 1.0 / math.sqrt(H)
        self.weight_ih = nn.Parameter(torch.empty(H, input_size).uniform_(-bound, bound))
        self.weight_hh = nn.Parameter(torch.empty(H, H).uniform_(-bound, bound))
        self.bias_ih = nn.Parameter(torch.empty(H).uniform_(-bound, bound))
        self.bias_hh = nn.Parameter(torch.empty(H).uniform_(-bound, bound))
        with torch.no_grad():
            if init == "orthogonal":
                nn.init.orthogonal_(self.weight_hh)
            elif init == "identity":
                self.weight_hh.copy_(torch.eye(H))
            elif init == "normal":
                self.weight_hh.normal_(0.0, 1.0 / math.sqrt(H))
            elif init == "critical":
                nn.init.orthogonal_(self.weight_hh)
                self.weight_hh.mul_(critical_weight_scale(CRITICAL_BIAS_SCALE))
                self.bias_ih.zero_()
                self.bias_hh.normal_(0.0, CRITICAL_BIAS_SCALE)
            if constraint == "none":
                self.weight_hh.mul_(gain)
        if constraint == "orthogonal":
            parametrizations.orthogonal(self, "weight_hh")
            parametrize.register_parametrization(self, "weight_hh", Scale(gain))
            self.step_parameter_grads = None  # the parameter is Q's generator, not W

    def step(self, u_t: Tensor, state: State, dt: Tensor | None) -> State:
        (z,) = state
        pre = u_t @ self.weight_ih.T + self.bias_ih + z @ self.weight_hh.T + self.bias_hh
        return (self.phi(pre),)

    def transition_jacobian(self, u_t: Tensor, state: State, dt: Tensor | None):
        """J = diag(φ'(a_t)) W, a_t = W z_{t−1} + U u_t + b: Jv = φ' ⊙ (W v), Jᵀw = Wᵀ(φ' ⊙ w)."""
        (z,) = state
        W = self.weight_hh  # once: with the constraint, a parametrization computes it
        pre = u_t @ self.weight_ih.T + self.bias_ih + z @ W.T + self.bias_hh
        slope = SLOPES[self.nonlinearity](pre, self.phi(pre))
        return (lambda v: slope * (v @ W.T)), (lambda w: (slope * w) @ W)

    def step_parameter_grads(self, u: Tensor, previous: State, cotangents: State,
                             dt: Tensor | None) -> list[Tensor]:
        """dL/dW⁽ᵗ⁾ of C steps: with δ_t = φ'(a_t) ⊙ ∂L/∂z_t, a_t = W z_{t−1} + U u_t + b,
        ∂/∂U = δ_tᵀ u_t, ∂/∂W = δ_tᵀ z_{t−1} and ∂/∂b_ih = ∂/∂b_hh = Σ_b δ_t (one batched
        matmul each over the C steps)."""
        (z,), (grad,) = previous, cotangents
        with torch.no_grad():
            pre = torch.baddbmm(self.input_projection(u), z,
                                self.weight_hh.T.expand(z.shape[0], -1, -1))
            delta = SLOPES[self.nonlinearity](pre, self.phi(pre)).mul_(grad)
            db = delta.sum(1)
            return [torch.bmm(delta.transpose(1, 2), u), torch.bmm(delta.transpose(1, 2), z),
                    db, db.clone()]

    def input_projection(self, u: Tensor) -> Tensor:
        return u @ self.weight_ih.T + (self.bias_ih + self.bias_hh)

    def projected_step(self, g_t: Tensor, state: State, dt: Tensor | None) -> State:
        return (self.phi(torch.addmm(g_t, state[0], self.weight_hh.T)),)

    def probed_sequence(self, g: Tensor, state: State, probes: State,
                        previous: list[State] | None) -> tuple[Tensor, State]:
        hs, h = ProbedElman.apply(g, state[0], self.weight_hh, probes[0], previous)
        return hs, (h,)

    def plain_path(self, seq_len: int, device: torch.device) -> str:
        # On a CPU, ATen's rnn_tanh / rnn_relu are no fused kernel but a loop of the same
        # per-step operations as `projected_step`'s, which adds each step's input projection
        # into its matmul (addmm): measured with `scripts/bench.py`'s model (B = 64, H = 128,
        # 2 threads, paired with the raw loop), stepping trained 13% faster at T = 100 and
        # 14–30% at T = 1000 (the chunks of `ProbedElman`: no faster than ATen's). On a GPU:
        # cuDNN's.
        return "sequence" if device.type != "cpu" else "steps"

    def sequence(self, u: Tensor, state: State) -> tuple[Tensor, State] | None:
        if self.nonlinearity not in ("tanh", "relu"):
            return None
        fused = torch.rnn_tanh if self.nonlinearity == "tanh" else torch.rnn_relu
        weights = (self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        outputs, z_last = fused(u, state[0].unsqueeze(0), weights, True, 1, 0.0, self.training,
                                False, True)
        return outputs, (z_last.squeeze(0),)

    def recurrent_weight(self) -> Tensor:
        """W, which multiplies the state every step (the monitor logs its spectrum)."""
        return self.weight_hh
