"""rnnlab.watch on torch.nn's recurrent modules against an independent float64 reference.

The reference unrolls the same weights with torch's own one-step modules (`nn.RNNCell`,
`nn.GRUCell`, `nn.LSTMCell`; the projected LSTM by its equations), one sequence at a time (so a
packed batch's lengths are simply each sequence's own), keeps every h_t with ``retain_grad`` and
reads ∂L/∂h_t from one backward pass of the same loss. The LSTM's state is the pair (h_t, c_t):
∂L/∂c_t is the derivative with respect to the cell state carried into step t+1 (h_t, made from
c_t, held fixed), read from a copy of c_t that only the next step uses.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import rnnlab
from rnnlab.records import Record, load
from rnnlab.watching import find_targets

B, T, FEATURES, H = 4, 7, 3, 5
LENGTHS = [7, 3, 5, 1]  # unequal, unsorted: the packed case


def module_of(kind: str, **options) -> nn.RNNBase:
    torch.manual_seed(0)
    cls = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[kind]
    return cls(FEATURES, H, **options).double()


def inputs(batch_first: bool) -> torch.Tensor:
    x = torch.randn(B, T, FEATURES, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    return x if batch_first else x.transpose(0, 1)


def readout(seed: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed random weights of the loss on each output and on each final state."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, T, 2 * H, dtype=torch.float64, generator=g),
            torch.randn(8, B, H, dtype=torch.float64, generator=g))


def loss_of(outputs: list[torch.Tensor], finals: list[torch.Tensor]) -> torch.Tensor:
    """The loss, from each sequence's outputs (L_b, D·H_out) and final states (layers·D, H_out):
    nonlinear in both, so every h_t matters through every later step."""
    w, v = readout()
    total = 0.0
    for b, (out, final) in enumerate(zip(outputs, finals)):
        total = total + torch.tanh((out * w[b, :out.shape[0], :out.shape[1]]).sum(1)).square().sum()
        total = total + torch.sin((final * v[:final.shape[0], b, :final.shape[1]]).sum())
    return total / len(outputs)


def per_sequence(output, h_n, packed: bool, batch_first: bool, lengths: list[int]):
    """The module's outputs split into sequences: (L_b, D·H_out) each, and (layers·D, H_out)."""
    if packed:
        padded, _ = pad_packed_sequence(output, batch_first=True)
    else:
        padded = output if batch_first else output.transpose(0, 1)
    return ([padded[b, :lengths[b]] for b in range(B)], [h_n[:, b] for b in range(B)])


def reference_profiles(module: nn.RNNBase, x_bf: torch.Tensor, lengths: list[int]) -> dict:
    """∂L/∂h_t (and ∂L/∂c_t) norms per layer and direction, (rows, T), by retain_grad."""
    D = 2 if module.bidirectional else 1
    lstm = isinstance(module, nn.LSTM)
    H_out = module.proj_size or H
    kept = {}  # (key, row, b, t) → the tensor whose grad is ∂L/∂·
    outputs, finals = [], []
    for b in range(B):
        layer_input = x_bf[b, :lengths[b]]
        last = []
        for layer in range(module.num_layers):
            directions = []
            for d in range(D):
                k = layer * D + d
                suffix = f"_l{layer}" + ("_reverse" if d else "")
                weights = {n: getattr(module, f"{n}{suffix}") for n in
                           ("weight_ih", "weight_hh", "bias_ih", "bias_hh")}
                times = range(lengths[b]) if d == 0 else range(lengths[b] - 1, -1, -1)
                h = torch.zeros(1, H_out, dtype=torch.float64)
                c = torch.zeros(1, H, dtype=torch.float64)
                out = [None] * lengths[b]
                for t in times:
                    x_t = layer_input[t:t + 1]
                    if lstm and module.proj_size:
                        gates = (x_t @ weights["weight_ih"].T + weights["bias_ih"]
                                 + h @ weights["weight_hh"].T + weights["bias_hh"])
                        i, f, g, o = gates.chunk(4, 1)
                        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                        h = (torch.sigmoid(o) * torch.tanh(c)) @ getattr(
                            module, f"weight_hr{suffix}").T
                    elif lstm:
                        h, c = torch_cell(module, weights)(x_t, (h, c))
                    else:
                        h = torch_cell(module, weights)(x_t, h)
                    h.retain_grad()
                    kept["dL_dh", k, b, t] = h
                    if lstm:  # the cell state carried to step t+1 (h_t already made from c_t)
                        c = c.clone()
                        c.retain_grad()
                        kept["dL_dc", k, b, t] = c
                    out[t] = h
                directions.append(torch.cat(out))
                last.append(h[0])
            layer_input = torch.cat(directions, 1)
        outputs.append(layer_input)
        finals.append(torch.stack(last))
    loss_of(outputs, finals).backward()
    profiles = {}
    for key in ("dL_dh", "dL_dc") if lstm else ("dL_dh",):
        squares = np.zeros((module.num_layers * D, T))
        for (name, k, _b, t), tensor in kept.items():
            if name == key and tensor.grad is not None:  # None: nothing later reads it
                squares[k, t] += float(tensor.grad.square().sum())
        profiles[key] = np.sqrt(squares)
    return profiles


def torch_cell(module: nn.RNNBase, weights: dict) -> nn.Module:
    """torch's own one-step module with the given layer's weights."""
    if isinstance(module, nn.LSTM):
        cell = nn.LSTMCell(weights["weight_ih"].shape[1], H).double()
    elif isinstance(module, nn.GRU):
        cell = nn.GRUCell(weights["weight_ih"].shape[1], H).double()
    else:
        cell = nn.RNNCell(weights["weight_ih"].shape[1], H, nonlinearity=module.nonlinearity
                          ).double()
    for name, value in weights.items():
        delattr(cell, name)
        setattr(cell, name, value)  # the module's own tensors: the gradient is the same graph's
    return cell


CASES = [("rnn", {}), ("rnn", {"nonlinearity": "relu", "num_layers": 2}),
         ("gru", {"num_layers": 2}), ("lstm", {}), ("lstm", {"num_layers": 2}),
         ("lstm", {"bidirectional": True}), ("gru", {"bidirectional": True, "num_layers": 2}),
         ("lstm", {"batch_first": True, "num_layers": 2}),
         ("lstm", {"proj_size": 3, "num_layers": 2, "bidirectional": True})]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize(("kind", "options"), CASES, ids=[f"{k}-{o}" for k, o in CASES])
def test_watched_profile_equals_retain_grad_reference_per_layer_and_direction(kind, options,
                                                                             packed):
    module = module_of(kind, **options)
    batch_first = options.get("batch_first", False)
    x = inputs(batch_first)
    lengths = LENGTHS if packed else [T] * B
    x_bf = x if batch_first else x.transpose(0, 1)
    expected = reference_profiles(module, x_bf, lengths)

    model = nn.Sequential()
    model.add_module("rnn", module)
    given = (pack_padded_sequence(x, torch.tensor(lengths), batch_first=batch_first,
                                  enforce_sorted=False) if packed else x)
    with rnnlab.watch(model) as flow:
        output, state = module(given)
        h_n = state[0] if isinstance(state, tuple) else state
        loss_of(*per_sequence(output, h_n, packed, batch_first, lengths)).backward()
    profiles = flow.profiles()["rnn"]
    assert sorted(profiles) == sorted(expected)
    for key, values in expected.items():
        assert profiles[key].shape == values.shape
        np.testing.assert_allclose(profiles[key], values, rtol=1e-10, atol=1e-300, err_msg=key)


def test_an_lstm_cell_loop_profile_equals_retain_grad_reference():
    torch.manual_seed(0)
    cell = nn.LSTMCell(FEATURES, H).double()
    x = inputs(batch_first=True)

    def run(keep: list | None) -> torch.Tensor:
        h = c = torch.zeros(B, H, dtype=torch.float64)
        outputs = []
        for t in range(T):
            h, c = cell(x[:, t], (h, c))
            if keep is not None:
                c = c.clone()  # the carried cell state (see the module docstring)
                h.retain_grad()
                c.retain_grad()
                keep.append((h, c))
            outputs.append(h)
        w, _ = readout()
        return torch.tanh((torch.stack(outputs, 1) * w[:, :, :H]).sum(2)).square().mean()

    kept: list = []
    run(kept).backward()
    model = nn.ModuleDict({"cell": cell})
    with rnnlab.watch(model) as flow:
        run(None).backward()
    profiles = flow.profiles()["cell"]
    np.testing.assert_allclose(profiles["dL_dh"][0], [float(h.grad.norm()) for h, _ in kept],
                               rtol=1e-10)
    np.testing.assert_allclose(profiles["dL_dc"][0], [
        float(c.grad.norm()) if c.grad is not None else 0.0 for _, c in kept], rtol=1e-10)


def test_an_unwatched_step_runs_the_fused_module_untouched():
    module = module_of("lstm", num_layers=2)
    model = nn.Sequential(module)
    x = inputs(batch_first=False)
    watch = rnnlab.watch(model)
    with watch:
        inside = module(x)[0]
    assert "forward" not in vars(module)  # the class's fused forward is back
    outside = module(x)[0]
    torch.testing.assert_close(inside, outside, rtol=1e-12, atol=1e-14)
    assert outside.grad_fn.name() != inside.grad_fn.name()  # one kernel against the unrolled graph


def test_find_targets_takes_the_outermost_recurrent_modules_or_the_named_ones():
    model = nn.ModuleDict({"encoder": nn.LSTM(3, 4), "head": nn.Linear(4, 2),
                           "loop": nn.GRUCell(3, 4)})
    assert [t.path for t in find_targets(model)] == ["encoder", "loop"]
    assert [t.path for t in find_targets(model, ["loop"])] == ["loop"]
    with pytest.raises(ValueError, match="'head' is a Linear, not a recurrent module"):
        find_targets(model, ["head"])
    with pytest.raises(ValueError, match="'decoder' is not a submodule"):
        find_targets(model, ["decoder"])
    with pytest.raises(ValueError, match="holds no recurrent module"):
        find_targets(nn.Linear(2, 2))


def test_save_writes_one_record_per_module_that_load_stacks(tmp_path):
    module = module_of("gru", num_layers=2, bidirectional=True)
    model = nn.Sequential(module)
    for step in (0, 10):
        with rnnlab.watch(model) as flow:
            module(inputs(False))[0].square().sum().backward()
        flow.save(tmp_path, step)
    record = Record.load(tmp_path / "0" / "step_0000010.npz")
    assert record.rows == ("l0", "l0_reverse", "l1", "l1_reverse")
    assert record.profiles["dL_dh"].shape == (4, T)
    stacked = load(tmp_path, module="0")
    assert stacked["step"].tolist() == [0, 10] and stacked["dL_dh"].shape == (2, 4, T)
    np.testing.assert_array_equal(stacked["dL_dh"][1], flow.profiles()["0"]["dL_dh"])
    assert stacked["decay_rate"].shape == (2, 4)
    assert list(stacked["rows"]) == list(record.rows)


def test_a_module_called_twice_gets_a_pass_per_call_each_its_own_profile():
    module = module_of("rnn")
    model = nn.Sequential(module)
    x = inputs(False)
    first = lambda: module(x)[0].sum()  # noqa: E731
    second = lambda: module(x[:3])[0].square().sum()  # noqa: E731
    with rnnlab.watch(model) as flow:
        (first() + second()).backward()
    profiles = flow.profiles()
    assert sorted(profiles) == ["0", "0@1"]
    for name, alone in (("0", first), ("0@1", second)):
        with rnnlab.watch(model) as single:
            alone().backward()
        np.testing.assert_allclose(profiles[name]["dL_dh"], single.profiles()["0"]["dL_dh"],
                                   rtol=1e-12)
    assert profiles["0"]["dL_dh"].shape == (1, T) and profiles["0@1"]["dL_dh"].shape == (1, 3)
