"""Gated cells: the GRU (Cho et al. 2014) and the LSTM (Hochreiter & Schmidhuber 1997).

Both keep their parameters under `torch.nn.GRU`/`torch.nn.LSTM`'s names and layout (gate blocks
stacked along the rows of ``weight_ih`` (G·H, input) and ``weight_hh`` (G·H, H)), so `step` runs
PyTorch's one-step kernel and `sequence` its fused whole-sequence kernel on the same tensors.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnlab.cells.base import Cell, State
from rnnlab.cells.recurrences import ProbedGRU, ProbedLSTM
from rnnlab.config import is_number, require, require_choice

INITS = ("default", "orthogonal")


class GatedCell(Cell):
    """Parameters of a cell with ``gates`` gate blocks, initialised as in `torch.nn.GRU`/`LSTM`.

    ``init``: ``default`` draws every weight from U(±1/√H) (PyTorch's init); ``orthogonal`` then
    makes each gate's (H, H) block of ``weight_hh`` an orthogonal matrix, so at init every gate
    starts from a norm-preserving recurrent map.
    """

    gates: int

    def __init__(self, input_size: int, hidden_size: int, init: str):
        super().__init__(input_size, hidden_size)
        require_choice("cell.init", init, INITS)
        G, H = self.gates, hidden_size
        bound = 1.0 / math.sqrt(H)
        self.weight_ih = nn.Parameter(torch.empty(G * H, input_size).uniform_(-bound, bound))
        self.weight_hh = nn.Parameter(torch.empty(G * H, H).uniform_(-bound, bound))
        self.bias_ih = nn.Parameter(torch.empty(G * H).uniform_(-bound, bound))
        self.bias_hh = nn.Parameter(torch.empty(G * H).uniform_(-bound, bound))
        if init == "orthogonal":
            with torch.no_grad():
                for block in self.weight_hh.split(H):
                    nn.init.orthogonal_(block)

    def weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The parameters in the order PyTorch's fused kernels take them."""
        return self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh

    def gate_inputs(self, u: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """W_ih u_t + b_ih and W_hh h_{t−1} + b_hh of C steps, (C, B, G·H) each."""
        return (u @ self.weight_ih.T + self.bias_ih, h @ self.weight_hh.T + self.bias_hh)

    @staticmethod
    def parameter_grads(d_ih: Tensor, d_hh: Tensor, u: Tensor, h: Tensor) -> list[Tensor]:
        """dL/dW⁽ᵗ⁾ from the gradients of W_ih u_t + b_ih (``d_ih``) and W_hh h_{t−1} + b_hh
        (``d_hh``), (C, B, G·H) each: [∂/∂W_ih, ∂/∂W_hh, ∂/∂b_ih, ∂/∂b_hh] per step (both
        biases' the same tensor where ``d_hh`` is ``d_ih``, as in the LSTM)."""
        d_b_ih = d_ih.sum(1)
        return [torch.bmm(d_ih.transpose(1, 2), u), torch.bmm(d_hh.transpose(1, 2), h),
                d_b_ih, d_b_ih if d_hh is d_ih else d_hh.sum(1)]


class GRU(GatedCell):
    """The GRU, as `torch.nn.GRU` (gate blocks r, z, n):

        r_t = σ(W_ir u_t + b_ir + W_hr h_{t−1} + b_hr)
        z_t = σ(W_iz u_t + b_iz + W_hz h_{t−1} + b_hz)
        n_t = tanh(W_in u_t + b_in + r_t ⊙ (W_hn h_{t−1} + b_hn))
        h_t = (1 − z_t) ⊙ n_t + z_t ⊙ h_{t−1}

    State (h,), each (B, hidden_size). The update gate z_t interpolates between the old state and
    the candidate, so ∂h_t/∂h_{t−1} ≈ diag(z_t) when z_t ≈ 1: a path on which the gradient neither
    vanishes nor explodes.
    """

    gates = 3

    def __init__(self, input_size: int, hidden_size: int = 64, init: str = "default"):
        super().__init__(input_size, hidden_size, init)

    def step(self, u_t: Tensor, state: State, dt: Tensor | None) -> State:
        (h,) = state
        return (torch.gru_cell(u_t, h, *self.weights()),)

    def step_parameter_grads(self, u: Tensor, previous: State, cotangents: State,
                             dt: Tensor | None) -> list[Tensor]:
        """dL/dW⁽ᵗ⁾ of C steps, from the gates recomputed for all of them at once: with
        g = ∂L/∂h_t, ∂/∂n = g(1 − z), ∂/∂z = g(h_{t−1} − n); the pre-activations' gradients
        ∂a_n = ∂n(1 − n²), ∂a_z = ∂z z(1 − z), ∂a_r = ∂a_n ⊙ (W_hn h + b_hn) r(1 − r); the input
        side's blocks [∂a_r, ∂a_z, ∂a_n], the recurrent side's [∂a_r, ∂a_z, ∂a_n ⊙ r]."""
        (h,), (grad,) = previous, cotangents
        H = self.hidden_size
        with torch.no_grad():
            gi, gh = self.gate_inputs(u, h)
            r = torch.sigmoid(gi[..., :H] + gh[..., :H])
            z = torch.sigmoid(gi[..., H:2 * H] + gh[..., H:2 * H])
            n = torch.tanh(torch.addcmul(gi[..., 2 * H:], r, gh[..., 2 * H:]))
            d_ih = torch.empty_like(gi)
            d_r, d_z, d_n = d_ih.split(H, -1)
            torch.mul(grad * (1 - z), 1 - n * n, out=d_n)
            torch.mul(grad * (h - n), z * (1 - z), out=d_z)
            torch.mul(d_n * gh[..., 2 * H:], r * (1 - r), out=d_r)
            d_hh = d_ih.clone()
            d_hh[..., 2 * H:].mul_(r)
            return self.parameter_grads(d_ih, d_hh, u, h)

    def transition_jacobian(self, u_t: Tensor, state: State, dt: Tensor | None):
        """J = ∂h_t/∂h_{t−1} = diag(z) + Σ_g diag(α_g) W_hg over the blocks g = r, z, n:

            α_r = (1 − z)(1 − n²) ⊙ (W_hn h + b_hn) ⊙ r(1 − r)
            α_z = (h − n) ⊙ z(1 − z)
            α_n = (1 − z)(1 − n²) ⊙ r

        Jv = z ⊙ v + Σ_g α_g ⊙ (W_hg v); Jᵀw = z ⊙ w + Σ_g W_hgᵀ (α_g ⊙ w): one matmul each."""
        (h,) = state
        H, W = self.hidden_size, self.weight_hh.detach()  # measured, never differentiated
        x_r, x_z, x_n = F.linear(u_t, self.weight_ih, self.bias_ih).split(H, 1)
        a_r, a_z, a_n = F.linear(h, W, self.bias_hh).split(H, 1)
        r, z = torch.sigmoid(x_r + a_r), torch.sigmoid(x_z + a_z)
        n = torch.tanh(x_n + r * a_n)
        through_n = (1 - z) * (1 - n * n)
        alpha = (through_n * a_n * r * (1 - r), (h - n) * z * (1 - z), through_n * r)

        # Fused multiply–adds into the output, no (N, 3H) products or repeated rows.
        def matvec(v: Tensor) -> Tensor:
            out = z * v
            for a, p in zip(alpha, (v @ W.T).split(H, 1)):
                out.addcmul_(a, p)
            return out

        def rmatvec(w: Tensor) -> Tensor:
            delta = torch.empty(w.shape[0], 3 * H, dtype=w.dtype, device=w.device)
            for k, a in enumerate(alpha):
                torch.mul(a, w, out=delta[:, k * H:(k + 1) * H])
            return torch.addmm(z * w, delta, W)

        return matvec, rmatvec

    def input_projection(self, u: Tensor) -> Tensor:
        return F.linear(u, self.weight_ih, self.bias_ih)

    def projected_step(self, g_t: Tensor, state: State, dt: Tensor | None) -> State:
        return (cell_step("GRU", g_t, state[0], None, self.weight_hh, self.bias_hh, None)[0],)

    def probed_sequence(self, g: Tensor, state: State, probes: State,
                        previous: list[State] | None) -> tuple[Tensor, State]:
        hs, h = ProbedGRU.apply(g, state[0], self.weight_hh, self.bias_hh, probes[0], previous)
        return hs, (h,)

    def plain_path(self, seq_len: int, device: torch.device) -> str:
        # On a CPU ATen's torch.gru is a loop of per-step operations (the LSTM's is oneDNN's
        # fused kernel), and `ProbedGRU`'s chunks, whose backward makes every gate's factor
        # for 64 steps at once, beat it: unmonitored training of `scripts/bench.py`'s model
        # (B = 64, H = 128, 2 threads, paired with the raw loop) at 1.14–1.17× the raw fused
        # loop against 0.98× (T = 100), 1.42× against 0.99× (T = 1000). On a GPU: cuDNN's.
        return "sequence" if device.type != "cpu" else "chunks"

    def sequence(self, u: Tensor, state: State) -> tuple[Tensor, State]:
        # Positional flags: has_biases, num_layers, dropout, train, bidirectional, batch_first.
        outputs, h_last = torch.gru(u, state[0].unsqueeze(0), self.weights(), True, 1, 0.0,
                                    self.training, False, True)
        return outputs, (h_last.squeeze(0),)


class LSTM(GatedCell):
    """The LSTM, as `torch.nn.LSTM` (gate blocks i, f, g, o):

        i_t = σ(W_ii u_t + b_ii + W_hi h_{t−1} + b_hi)
        f_t = σ(W_if u_t + b_if + W_hf h_{t−1} + b_hf)
        g_t = tanh(W_ig u_t + b_ig + W_hg h_{t−1} + b_hg)
        o_t = σ(W_io u_t + b_io + W_ho h_{t−1} + b_ho)
        c_t = f_t ⊙ c_{t−1} + i_t ⊙ g_t
        h_t = o_t ⊙ tanh(c_t)

    State (h, c), each (B, hidden_size); the decoder reads h, and the monitor records both
    ``dL_dz`` (h) and ``dL_dc`` (c). The cell state's Jacobian ∂c_t/∂c_{t−1} = diag(f_t) is the
    constant error carousel; ``forget_bias`` (Jozefowicz et al. 2015: 1.0) starts f_t near
    σ(1) ≈ 0.73 so that gradients reach far back from the first step. It is the initial total
    forget-gate bias b_if + b_hf (b_if = forget_bias, b_hf = 0).
    """

    gates = 4
    state_names = ("h", "c")

    def __init__(self, input_size: int, hidden_size: int = 64, init: str = "default",
                 forget_bias: float = 1.0):
        super().__init__(input_size, hidden_size, init)
        require(is_number(forget_bias), "cell.forget_bias", forget_bias, "a finite number")
        H = hidden_size
        with torch.no_grad():
            self.bias_ih[H:2 * H].fill_(forget_bias)
            self.bias_hh[H:2 * H].zero_()

    def step(self, u_t: Tensor, state: State, dt: Tensor | None) -> State:
        return tuple(torch.lstm_cell(u_t, state, *self.weights()))

    def step_parameter_grads(self, u: Tensor, previous: State, cotangents: State,
                             dt: Tensor | None) -> list[Tensor]:
        """dL/dW⁽ᵗ⁾ of C steps, from the gates recomputed for all of them at once: with
        ∂L/∂h_t = g_h, ∂L/∂c_t = g_c and δc = g_c + g_h o (1 − tanh² c_t), the pre-activations'
        gradients are δc g i(1 − i), δc c_{t−1} f(1 − f), δc i(1 − g²), g_h tanh(c_t) o(1 − o),
        the same on the input and the recurrent side."""
        (h, c), (grad_h, grad_c) = previous, cotangents
        H = self.hidden_size
        with torch.no_grad():
            gi, gh = self.gate_inputs(u, h)
            gates = gi.add_(gh)
            i, f, g, o = gates.split(H, -1)
            i, f, o = torch.sigmoid(i), torch.sigmoid(f), torch.sigmoid(o)
            g = torch.tanh(g)
            tanh_c = torch.tanh(torch.addcmul(f * c, i, g))
            dc = torch.addcmul(grad_c, grad_h * o, 1 - tanh_c * tanh_c)
            d = torch.empty_like(gates)
            d_i, d_f, d_g, d_o = d.split(H, -1)
            torch.mul(dc * g, i * (1 - i), out=d_i)
            torch.mul(dc * c, f * (1 - f), out=d_f)
            torch.mul(dc * i, 1 - g * g, out=d_g)
            torch.mul(grad_h * tanh_c, o * (1 - o), out=d_o)
            return self.parameter_grads(d, d, u, h)

    def transition_jacobian(self, u_t: Tensor, state: State, dt: Tensor | None):
        """J of the state (h, c), rows [h, c] (2H): with P = W_hh v_h (blocks i, f, g, o),

            Jv:  c part  dc = f ⊙ v_c + g i(1 − i) ⊙ P_i + c f(1 − f) ⊙ P_f + i(1 − g²) ⊙ P_g
                 h part  κ ⊙ dc + tanh(c_t) o(1 − o) ⊙ P_o,   κ = o (1 − tanh²(c_t))
            Jᵀw: e = w_c + κ ⊙ w_h;  c part f ⊙ e;  h part W_hhᵀ [α_i e, α_f e, α_g e, β w_h]

        (α the three coefficients of dc, β = tanh(c_t) o(1 − o)): one matmul each."""
        h, c = state
        H, W = self.hidden_size, self.weight_hh.detach()  # measured, never differentiated
        gates = torch.addmm(F.linear(u_t, self.weight_ih, self.bias_ih + self.bias_hh), h, W.T)
        i, f, o = (torch.sigmoid(gates[:, k * H:(k + 1) * H]) for k in (0, 1, 3))
        g = torch.tanh(gates[:, 2 * H:3 * H])
        tau = torch.tanh(f * c + i * g)
        kappa, beta = o * (1 - tau * tau), tau * o * (1 - o)
        alpha = (g * i * (1 - i), c * f * (1 - f), i * (1 - g * g))  # dc's coefficients

        # Each product written into its output's halves by fused multiply–adds, without the
        # concatenated and repeated copies of the rows (a third of a Lanczos step's time).
        def matvec(v: Tensor) -> Tensor:
            v_h, v_c = v.split(H, 1)
            P = (v_h @ W.T).split(H, 1)  # blocks i, f, g, o
            out = torch.empty_like(v)
            dc = torch.mul(f, v_c, out=out[:, H:])
            for a, p in zip(alpha, P):
                dc.addcmul_(a, p)
            torch.mul(kappa, dc, out=out[:, :H]).addcmul_(beta, P[3])
            return out

        def rmatvec(w: Tensor) -> Tensor:
            w_h, w_c = w.split(H, 1)
            e = torch.addcmul(w_c, kappa, w_h)
            delta = torch.empty(w.shape[0], 4 * H, dtype=w.dtype, device=w.device)
            for k, a in enumerate(alpha):
                torch.mul(a, e, out=delta[:, k * H:(k + 1) * H])
            torch.mul(beta, w_h, out=delta[:, 3 * H:])
            out = torch.empty_like(w)
            torch.mm(delta, W, out=out[:, :H])
            torch.mul(f, e, out=out[:, H:])
            return out

        return matvec, rmatvec

    def input_projection(self, u: Tensor) -> Tensor:
        return F.linear(u, self.weight_ih, self.bias_ih + self.bias_hh)

    def projected_step(self, g_t: Tensor, state: State, dt: Tensor | None) -> State:
        return cell_step("LSTM", g_t, state[0], state[1], self.weight_hh, None, None)

    def probed_sequence(self, g: Tensor, state: State, probes: State,
                        previous: list[State] | None) -> tuple[Tensor, State]:
        hs, h, c = ProbedLSTM.apply(g, *state, self.weight_hh, *probes, previous)
        return hs, (h, c)

    def sequence(self, u: Tensor, state: State) -> tuple[Tensor, State]:
        h0, c0 = (s.unsqueeze(0) for s in state)
        outputs, h_last, c_last = torch.lstm(u, (h0, c0), self.weights(), True, 1, 0.0,
                                             self.training, False, True)
        return outputs, (h_last.squeeze(0), c_last.squeeze(0))


def cell_step(mode: str, gi: Tensor, h: Tensor, c: Tensor | None, w_hh: Tensor,
              b_hh: Tensor | None, w_hr: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """One step of `torch.nn`'s RNN (``mode`` RNN_TANH, RNN_RELU), GRU or LSTM from the step's
    input projection ``gi`` = W_ih u_t + b_ih (+ b_hh, except in the GRU, whose n gate multiplies
    W_hn h + b_hn by r): the state's new (h, c), c None but for the LSTM. ``w_hr``: the LSTM's
    projection of h (``proj_size``), else None. The cells' `projected_step` and the watched
    modules' probed pass (`rnnlab.unrolled`) both run it."""
    if mode == "GRU":
        gh = F.linear(h, w_hh, b_hh)
        i_r, i_z, i_n = gi.chunk(3, 1)
        h_r, h_z, h_n = gh.chunk(3, 1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        n = torch.tanh(i_n + r * h_n)
        return n + z * (h - n), None
    pre = torch.addmm(gi, h, w_hh.t())
    if mode == "RNN_TANH":
        return torch.tanh(pre), None
    if mode == "RNN_RELU":
        return torch.relu(pre), None
    i, f, g, o = pre.chunk(4, 1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return (h if w_hr is None else F.linear(h, w_hr)), c
