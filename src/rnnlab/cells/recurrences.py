"""The probed loop of the tanh RNN, the GRU and the LSTM as one autograd node per chunk of steps.

A probed pass steps z_t = step(g_t, z_{t−1}) + p_t for zero probes p_t, and the gradients of the
probes are the profile ∂L/∂z_t. Recorded by autograd, each step is a dozen small nodes, and at
short T their bookkeeping costs more than the arithmetic. Here the forward loop runs without
recording and keeps what the backward needs (the gates and the states the steps started from);
the backward walks the steps in reverse by the cells' equations written out, and on the way
hands every probe its gradient: at step t, ∂L/∂z_t is the gradient arriving from the read of z_t
and from step t+1, exactly what autograd accumulates on p_t. The recurrent weight's gradient is
then one matmul over all the chunk's steps, Σ_t (∂L/∂pre_t)ᵀ z_{t−1}.

Each Function takes the chunk's input projection g (C, B, G), time-major (`Cell.input_projection`
of the chunk's inputs), the state it starts from, the recurrent weights and one (C, B, H) probe
per state, and returns z[0] at every step (C, B, H) and the last state. The tests hold every
gradient to autograd's on the cells' own `projected_step` (float64, 1e-12) and, with the probes
at zero and away from it, to finite differences.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from rnnlab.cells.base import State

# previous-states list of the probed pass (`RecurrentModel.unroll`), or None
Previous = list[State] | None


def record_previous(previous: Previous, *states: Tensor) -> None:
    if previous is not None:
        previous.append(tuple(s.detach() for s in states))


def record_previous_chunk(previous: Previous, start: Tensor, states: Tensor) -> None:
    """z_{t−1} of every step of a chunk of a one-tensor state, as stepping records them: the
    state the chunk starts from, then each step's ``states`` (C, B, ·) but the last."""
    if previous is not None:
        previous += [(h.detach(),) for h in (start, *states[:-1].unbind(0))]


def incoming_gradients(d_hs: Tensor | None, d_last: Tensor | None, hs: Tensor) -> Tensor:
    """∂L/∂z_t from outside the chunk, (C, B, H): the reads of z_t (``d_hs``) and, at the last
    step, what the next chunk sends back (``d_last``). The backward adds step t+1's share."""
    d = torch.zeros_like(hs) if d_hs is None else d_hs.clone()
    if d_last is not None:
        d[-1] += d_last
    return d


def recurrent_weight_gradient(d_pre: Tensor, h0: Tensor, hs: Tensor) -> Tensor:
    """Σ_t (∂L/∂pre_t)ᵀ z_{t−1} over the chunk, z_{−1} = h0: one matmul for steps 1 … C−1."""
    return torch.addmm(d_pre[0].t() @ h0, d_pre[1:].flatten(0, 1).t(), hs[:-1].flatten(0, 1))


class ProbedElman(torch.autograd.Function):
    """z_t = tanh(g_t + W z_{t−1}) + p_t over a chunk (the Elman RNN's tanh step)."""

    @staticmethod
    def forward(ctx, g: Tensor, h0: Tensor, w_hh: Tensor, p_h: Tensor,
                previous: Previous) -> tuple[Tensor, Tensor]:
        C = g.shape[0]
        hs = g.new_empty(C, *h0.shape)  # z_t with its probe
        acts = g.new_empty(C, *h0.shape)  # tanh(pre_t)
        h = h0
        for t in range(C):
            record_previous(previous, h)
            torch.addmm(g[t], h, w_hh.t(), out=acts[t]).tanh_()
            h = torch.add(acts[t], p_h[t], out=hs[t])
        ctx.save_for_backward(acts, hs, h0, w_hh)
        return hs, hs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_hs: Tensor | None, d_last: Tensor | None):
        acts, hs, h0, w_hh = ctx.saved_tensors
        C = acts.shape[0]
        one = hs.new_ones(())
        d_probe = incoming_gradients(d_hs, d_last, hs)
        d_pre = torch.empty_like(acts)
        for t in range(C - 1, -1, -1):
            torch.addcmul(one, acts[t], acts[t], value=-1, out=d_pre[t]).mul_(d_probe[t])
            if t > 0:
                d_probe[t - 1].addmm_(d_pre[t], w_hh)
        d_w = recurrent_weight_gradient(d_pre, h0, hs)
        return d_pre, d_pre[0] @ w_hh, d_w, d_probe, None


class ProbedGRU(torch.autograd.Function):
    """`torch.nn.GRU`'s step from gi_t = W_i u_t + b_i over a chunk, h_t ← h_t + p_t:
    r, z = σ(gi_{r,z} + W_{r,z} h + b_{r,z}), n = tanh(gi_n + r ⊙ (W_n h + b_n)),
    h' = n + z ⊙ (h − n).

    Every pre-activation's gradient is ∂L/∂h_t times a factor of the forward's values alone:
    (1 − z)(1 − n²) for n's, (h − n)·z(1 − z) for z's, n's times (W_n h + b_n)·r(1 − r) for r's
    (times r for W_n h + b_n). The backward makes the factors for the whole chunk at once, so
    each step is a product, the gradient through z and the matmul through W_h."""

    @staticmethod
    def forward(ctx, g: Tensor, h0: Tensor, w_hh: Tensor, b_hh: Tensor, p_h: Tensor,
                previous: Previous) -> tuple[Tensor, Tensor]:
        C, (B, H) = g.shape[0], h0.shape
        hs = g.new_empty(C, B, H)
        gates = g.new_empty(C, B, 3 * H)  # r, z, n after their nonlinearities
        gh = g.new_empty(C, B, 3 * H)  # W_h h + b_h (its n block is read by the backward)
        h = h0
        for t in range(C):
            record_previous(previous, h)
            torch.addmm(b_hh, h, w_hh.t(), out=gh[t])
            a = torch.add(g[t], gh[t], out=gates[t])
            a[:, :2 * H].sigmoid_()
            r, z, n = a.chunk(3, 1)
            torch.addcmul(g[t, :, 2 * H:], r, gh[t, :, 2 * H:], out=n).tanh_()
            h = torch.add(n, torch.sub(h, n).mul_(z), out=hs[t]).add_(p_h[t])
        ctx.save_for_backward(gates, gh, hs, h0, w_hh)
        return hs, hs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_hs: Tensor | None, d_last: Tensor | None):
        gates, gh, hs, h0, w_hh = ctx.saved_tensors
        C, B, H = hs.shape
        one = hs.new_ones(())
        r, z, n = gates.chunk(3, -1)
        # factors: d_gi_t = d_gi_factor_t ⊙ (∂L/∂h_t per block), d_gh_t likewise
        d_gi = torch.empty_like(gates)
        f_r, f_z, f_n = d_gi.chunk(3, -1)
        torch.addcmul(one, n, n, value=-1, out=f_n).mul_(torch.sub(one, z))
        torch.sub(hs[:-1], n[1:], out=f_z[1:])
        torch.sub(h0, n[0], out=f_z[0])
        f_z.mul_(torch.addcmul(z, z, z, value=-1))
        torch.addcmul(r, r, r, value=-1, out=f_r).mul_(f_n).mul_(gh[..., 2 * H:])
        d_gh = d_gi.clone()
        d_gh[..., 2 * H:].mul_(r)
        d_gi = d_gi.view(C, B, 3, H)
        d_gh = d_gh.view(C, B, 3, H)
        d_probe = incoming_gradients(d_hs, d_last, hs)
        for t in range(C - 1, -1, -1):
            dh = d_probe[t]  # ∂L/∂h_t, whole once step t+1 has added its share
            d_gh[t].mul_(dh.unsqueeze(1))
            if t > 0:
                d_probe[t - 1].addcmul_(dh, z[t]).addmm_(d_gh[t].view(B, 3 * H), w_hh)
        d_gi.mul_(d_probe.unsqueeze(2))
        d_gi, d_gh = d_gi.view(C, B, 3 * H), d_gh.view(C, B, 3 * H)
        d_h0 = torch.addmm(d_probe[0] * z[0], d_gh[0], w_hh)
        d_w = recurrent_weight_gradient(d_gh, h0, hs)
        return d_gi, d_h0, d_w, d_gh.sum((0, 1)), d_probe, None


class ProbedLSTM(torch.autograd.Function):
    """`torch.nn.LSTM`'s step from gi_t = W_i u_t + b_i + b_h over a chunk, h_t ← h_t + p_t,
    c_t ← c_t + q_t: i, f, o = σ(…), g = tanh(…) of pre = gi_t + W_h h; c' = f ⊙ c + i ⊙ g;
    h' = o ⊙ tanh(c'). Every step writes into preallocated buffers (no copies).

    With δc = ∂L/∂c'_t = (1 − tanh²c')·o·∂L/∂h_t + ∂L/∂c_t, the gate pre-activations' gradients
    are δc·g·i(1 − i), δc·c·f(1 − f), δc·i(1 − g²) and ∂L/∂h_t·tanh c'·o(1 − o): each a factor of
    the forward's values alone, which the backward makes for the whole chunk at once."""

    @staticmethod
    def forward(ctx, g: Tensor, h0: Tensor, c0: Tensor, w_hh: Tensor, p_h: Tensor, p_c: Tensor,
                previous: Previous) -> tuple[Tensor, Tensor, Tensor]:
        C, (B, H) = g.shape[0], h0.shape
        hs, cs = g.new_empty(C, B, H), g.new_empty(C, B, H)  # the states, probes added
        gates = g.new_empty(C, B, 4 * H)  # i, f, g, o after their nonlinearities
        tanh_c = g.new_empty(C, B, H)  # tanh(c'_t), before c's probe
        h, c = h0, c0
        for t in range(C):
            record_previous(previous, h, c)
            a = torch.addmm(g[t], h, w_hh.t(), out=gates[t])
            a[:, :2 * H].sigmoid_()
            a[:, 2 * H:3 * H].tanh_()
            a[:, 3 * H:].sigmoid_()
            i, f, gg, o = a.chunk(4, 1)
            c = torch.mul(f, c, out=cs[t]).addcmul_(i, gg)  # c'_t, then c_t = c'_t + q_t
            h = torch.addcmul(p_h[t], o, torch.tanh(c, out=tanh_c[t]), out=hs[t])
            c.add_(p_c[t])
        ctx.save_for_backward(gates, tanh_c, hs, cs, h0, c0, w_hh)
        return hs, hs[-1].clone(), cs[-1].clone()

    @staticmethod
    @once_differentiable
    def backward(ctx, d_hs: Tensor | None, d_h_last: Tensor | None, d_c_last: Tensor | None):
        gates, tanh_c, hs, cs, h0, c0, w_hh = ctx.saved_tensors
        C, B, H = hs.shape
        one = hs.new_ones(())
        i, f, gg, o = gates.chunk(4, -1)
        d_pre = torch.empty_like(gates)  # first the factors, then (in place) the gradients
        f_i, f_f, f_g, f_o = d_pre.chunk(4, -1)
        torch.addcmul(i, i, i, value=-1, out=f_i).mul_(gg)
        torch.addcmul(f, f, f, value=-1, out=f_f)
        f_f[0].mul_(c0)
        f_f[1:].mul_(cs[:-1])
        torch.addcmul(one, gg, gg, value=-1, out=f_g).mul_(i)
        torch.addcmul(o, o, o, value=-1, out=f_o).mul_(tanh_c)
        h_to_c = torch.addcmul(one, tanh_c, tanh_c, value=-1).mul_(o)  # ∂c'-path of ∂L/∂h_t
        d_probe_h = incoming_gradients(d_hs, d_h_last, hs)
        d_probe_c = torch.empty_like(cs)
        d_probe_c[-1] = d_c_last if d_c_last is not None else 0
        dc = torch.empty_like(h0)  # ∂L/∂c'_t
        for t in range(C - 1, -1, -1):
            dh = d_probe_h[t]  # the read's gradient and step t+1's: ∂L/∂h_t
            torch.addcmul(d_probe_c[t], h_to_c[t], dh, out=dc)
            d_pre[t, :, :3 * H].view(B, 3, H).mul_(dc.unsqueeze(1))
            d_pre[t, :, 3 * H:].mul_(dh)
            if t > 0:
                torch.mul(dc, f[t], out=d_probe_c[t - 1])
                d_probe_h[t - 1].addmm_(d_pre[t], w_hh)
        d_h0, d_c0 = d_pre[0] @ w_hh, dc * f[0]
        d_w = recurrent_weight_gradient(d_pre, h0, hs)
        return d_pre, d_h0, d_c0, d_w, d_probe_h, d_probe_c, None
