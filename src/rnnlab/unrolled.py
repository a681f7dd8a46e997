"""`torch.nn.RNN`, `GRU` and `LSTM` step by step on their own parameters, a probe on every state.

PyTorch's fused kernels run a whole sequence in one call, so there is no h_t to take a gradient
of. `unrolled_forward(module, input, hx, probes)` computes what ``module(input, hx)`` computes —
every ``num_layers``, ``bidirectional``, ``batch_first``, ``bias``, ``proj_size``, inter-layer
dropout, unbatched and `PackedSequence` input of unequal lengths — one timestep at a time from the
module's own weights (``weight_ih_l<k>[_reverse]`` …), and adds a zero probe p_t to each state as
it is made: h_t ← h_t + p_t (and c_t ← c_t + p_c,t for the LSTM). After the backward pass p_t.grad
is ∂L/∂h_t, the total derivative through every later step and every later layer.

The equations are `torch.nn`'s (gates in the order of its weight rows):

    RNN   h_t = φ(W_ih x_t + b_ih + W_hh h_{t−1} + b_hh),  φ = tanh or relu
    GRU   r, z = σ(W_ir x_t + b_ir + W_hr h_{t−1} + b_hr), σ(… z …)
          n = tanh(W_in x_t + b_in + r ⊙ (W_hn h_{t−1} + b_hn)),  h_t = (1 − z) ⊙ n + z ⊙ h_{t−1}
    LSTM  i, f, g, o from W_ih x_t + b_ih + W_hh h_{t−1} + b_hh
          c_t = σ(f) ⊙ c_{t−1} + σ(i) ⊙ tanh(g),  h_t = σ(o) ⊙ tanh(c_t)  (times W_hr: proj_size)

Every timestep's input projection W_ih x_t + b_ih (+ b_hh) is one matrix product per layer and
direction before the loop; the loop does the recurrent product and the gate arithmetic.

Timesteps of a packed batch are the rows of its ``data`` split by ``batch_sizes``: at step t the
first n_t sequences (sorted by length) are active, the others keep their state (forward) or have not
started (reverse), so a sequence contributes to the timesteps it has, as in the fused kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from rnnlab.cells.gated import cell_step
from rnnlab.probing import zero_probe

MODES = ("RNN_TANH", "RNN_RELU", "GRU", "LSTM")


@dataclass
class LayerProbes:
    """The probes of one layer and direction: zero (N, size) tensors, N = Σ_t n_t rows (timestep
    t's rows are the t-th block of ``sizes``), added to h_t (and, for the LSTM, c_t)."""

    name: str  # "l0", "l0_reverse", "l1", … as in torch.nn's weight names
    h: Tensor
    c: Tensor | None
    sizes: list[int]  # n_t: the rows of each timestep


def row_names(module: nn.RNNBase) -> list[str]:
    """Layer and direction names in the order of torch.nn's weights: l0, l0_reverse, l1, …"""
    directions = ("", "_reverse") if module.bidirectional else ("",)
    return [f"l{layer}{d}" for layer in range(module.num_layers) for d in directions]


def unrolled_forward(module: nn.RNNBase, input: Tensor | PackedSequence,
                     hx: Tensor | tuple[Tensor, Tensor] | None,
                     probes: list[LayerProbes]) -> tuple:
    """``module(input, hx)`` step by step; appends one `LayerProbes` per layer and direction.

    Returns what the module returns: ``(output, h_n)``, or ``(output, (h_n, c_n))`` for the LSTM.
    """
    if module.mode not in MODES:
        raise ValueError(f"cannot unroll a {type(module).__name__} of mode {module.mode}")
    lstm = module.mode == "LSTM"
    H, H_out = module.hidden_size, module.proj_size or module.hidden_size
    D = 2 if module.bidirectional else 1
    packed = isinstance(input, PackedSequence)
    unbatched = not packed and input.dim() == 2
    if packed:
        data, batch_sizes, sorted_indices, unsorted_indices = input
        sizes = batch_sizes.tolist()
        layer_input = data  # (N, features), timestep t's rows the t-th block of sizes
    else:
        x = input.unsqueeze(0 if module.batch_first else 1) if unbatched else input
        x = x.transpose(0, 1) if module.batch_first else x  # (T, B, features)
        sizes = [x.shape[1]] * x.shape[0]
        layer_input = x.reshape(-1, x.shape[-1])
        sorted_indices = unsorted_indices = None
    B = sizes[0]
    h0, c0 = initial_states(module, hx, B, layer_input, unbatched, sorted_indices)

    h_n, c_n = [], []
    for layer in range(module.num_layers):
        outputs = []
        for direction in range(D):
            k = layer * D + direction
            name = row_names(module)[k]
            rows = sum(sizes)
            probe = LayerProbes(name, zero_probe((rows, H_out), layer_input),
                                zero_probe((rows, H), layer_input) if lstm else None, sizes)
            probes.append(probe)
            out, h_last, c_last = run_direction(module, name, layer_input, sizes, h0[k],
                                                c0[k] if lstm else None, probe, reverse=direction)
            outputs.append(out)
            h_n.append(h_last)
            c_n.append(c_last)
        layer_input = torch.cat(outputs, dim=1) if D == 2 else outputs[0]
        if module.dropout and module.training and layer < module.num_layers - 1:
            layer_input = F.dropout(layer_input, module.dropout, training=True)

    h_n = torch.stack(h_n)
    c_n = torch.stack(c_n) if lstm else None
    if packed:
        output = PackedSequence(layer_input, batch_sizes, sorted_indices, unsorted_indices)
        if unsorted_indices is not None:
            h_n = h_n.index_select(1, unsorted_indices)
            c_n = c_n.index_select(1, unsorted_indices) if lstm else None
    else:
        output = layer_input.reshape(len(sizes), B, -1)
        output = output.transpose(0, 1) if module.batch_first else output
        if unbatched:
            output = output.squeeze(0 if module.batch_first else 1)
            h_n = h_n.squeeze(1)
            c_n = c_n.squeeze(1) if lstm else None
    return (output, (h_n, c_n)) if lstm else (output, h_n)


def initial_states(module: nn.RNNBase, hx, B: int, like: Tensor, unbatched: bool,
                   sorted_indices: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(h0, c0) as (layers × directions, B, size) in the rows' (sorted) order; zeros if no hx."""
    D = 2 if module.bidirectional else 1
    H, H_out = module.hidden_size, module.proj_size or module.hidden_size
    if hx is None:
        h0 = torch.zeros(module.num_layers * D, B, H_out, dtype=like.dtype, device=like.device)
        c0 = torch.zeros(module.num_layers * D, B, H, dtype=like.dtype, device=like.device)
        return h0, c0 if module.mode == "LSTM" else None
    h0, c0 = hx if module.mode == "LSTM" else (hx, None)
    if unbatched:
        h0 = h0.unsqueeze(1)
        c0 = c0.unsqueeze(1) if c0 is not None else None
    if sorted_indices is not None:  # the user's order → the packed (sorted) order
        h0 = h0.index_select(1, sorted_indices)
        c0 = c0.index_select(1, sorted_indices) if c0 is not None else None
    return h0, c0


def run_direction(module: nn.RNNBase, name: str, x: Tensor, sizes: list[int], h: Tensor,
                  c: Tensor | None, probe: LayerProbes, reverse: int) -> tuple:
    """One layer in one direction over packed rows x (N, features): its output rows (N, H_out)
    in x's order, and the last state of every sequence (B, ·)."""
    w_ih, w_hh = getattr(module, f"weight_ih_{name}"), getattr(module, f"weight_hh_{name}")
    b_ih = getattr(module, f"bias_ih_{name}") if module.bias else None
    b_hh = getattr(module, f"bias_hh_{name}") if module.bias else None
    w_hr = getattr(module, f"weight_hr_{name}") if module.proj_size else None
    # The input projection of every timestep at once; b_hh joins it except in the GRU's n gate,
    # which multiplies W_hn h + b_hn by r.
    gi = F.linear(x, w_ih, b_ih)
    if b_hh is not None and module.mode != "GRU":
        gi = gi + b_hh
    gi_t, p_h, p_c = gi.split(sizes), probe.h.split(sizes), (
        probe.c.split(sizes) if c is not None else None)
    out: list[Tensor | None] = [None] * len(sizes)
    steps = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
    B = h.shape[0]
    for t in steps:
        n = sizes[t]
        h_prev, c_prev = (h, c) if n == B else (h[:n], c[:n] if c is not None else None)
        h_new, c_new = cell_step(module.mode, gi_t[t], h_prev, c_prev, w_hh, b_hh, w_hr)
        h_new = h_new + p_h[t]
        out[t] = h_new
        h = h_new if n == B else torch.cat([h_new, h[n:]])
        if c is not None:
            c_new = c_new + p_c[t]
            c = c_new if n == B else torch.cat([c_new, c[n:]])
    return torch.cat(out), h, c
