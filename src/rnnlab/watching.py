"""Gradient flow through time for any PyTorch model: find its recurrent modules and probe them.

    with rnnlab.watch(model) as flow:
        loss = loss_fn(model(x), y)
        loss.backward()
    flow.profiles()          # {"lstm": {"dL_dh": (layers × directions, T), "dL_dc": …}}
    flow.save(dirpath, step)  # <dirpath>/lstm/step_<step:07d>.npz

Inside the ``with`` block every watched module runs its probed path (`rnnlab.probing`): the same
function on the very same parameters, one timestep at a time, with a zero probe added to every
state. Outside it, the model is untouched: the same fused kernels, the same numbers.

What is watched (`find_targets`), each module once:

- a module that probes itself (`rnnlab.probing.SelfProbing`: rnnlab's `RecurrentModel`);
- `torch.nn.RNN`, `GRU`, `LSTM`: run by `rnnlab.unrolled.unrolled_forward` instead of the fused
  kernel; profiles ``dL_dh`` (and ``dL_dc`` for the LSTM) with one row per layer and direction;
- `torch.nn.RNNCell`, `GRUCell`, `LSTMCell` called in a loop: each call is a timestep, a probe is
  added to what it returns; one row, ``cell``;
- an rnnlab `Cell` stepped in a loop: each ``step`` call is a timestep; profiles by its state
  names (`rnnlab.cells.base.state_keys`).

A module called several times inside one ``with`` block gets one pass per call; the passes after
the first are named ``<path>@1``, ``<path>@2``, ….
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from rnnlab.cells.base import Cell
from rnnlab.probing import (
    ProbedPass,
    ProbeRequest,
    Reduce,
    SelfProbing,
    StateProbes,
    zero_probe,
)
from rnnlab.unrolled import LayerProbes, row_names, unrolled_forward

log = logging.getLogger(__name__)

KINDS = ("torch.nn.RNN / GRU / LSTM", "torch.nn.RNNCell / GRUCell / LSTMCell",
         "an rnnlab Cell", "a module with `probing(request)` (rnnlab.probing.SelfProbing)")


class Target:
    """One watched module: `arm` before the forward pass, `disarm` after the backward pass;
    `passes` holds what each forward call probed."""

    def __init__(self, path: str, module: nn.Module):
        self.path = path
        self.module = module
        self.passes: list[ProbedPass] = []

    def arm(self, request: ProbeRequest) -> None:
        self.passes = []

    def disarm(self) -> None:
        pass

    def pass_names(self, count: int | None = None) -> list[str]:
        """The names of the first ``count`` passes (default: of those probed)."""
        count = len(self.passes) if count is None else count
        return [self.path if i == 0 else f"{self.path}@{i}" for i in range(count)]


class SelfProbingTarget(Target):
    """A module with a probed path of its own: its `probing` context does the work."""

    def arm(self, request: ProbeRequest) -> None:
        self.context: AbstractContextManager = self.module.probing(request)
        self.passes = self.context.__enter__()

    def disarm(self) -> None:
        self.context.__exit__(None, None, None)


@dataclass
class ModuleCall:
    """What a watched `torch.nn` RNN, GRU or LSTM was called with on a probed pass (detached):
    the trajectory its Lyapunov spectrum follows (`rnnlab.lyapunov.watched_lyapunov`)."""

    module: nn.RNNBase
    input: Tensor | PackedSequence
    hx: Tensor | tuple[Tensor, Tensor] | None


def detached(hx):
    return None if hx is None else (hx.detach() if isinstance(hx, Tensor)
                                    else tuple(h.detach() for h in hx))


class TorchRNNTarget(Target):
    """`torch.nn.RNN`, `GRU`, `LSTM`: while armed, its forward is `unrolled_forward` on its own
    weights (an attribute of the instance, removed on disarm: the class's fused forward is back).
    ``calls`` keeps what each pass was called with."""

    def __init__(self, path: str, module: nn.RNNBase):
        super().__init__(path, module)
        self.calls: list[ModuleCall] = []

    def arm(self, request: ProbeRequest) -> None:
        super().arm(request)
        self.calls = []
        module = self.module

        def forward(input, hx=None):
            self.calls.append(ModuleCall(module, input if isinstance(input, PackedSequence)
                                         else input.detach(), detached(hx)))
            layers: list[LayerProbes] = []
            out = unrolled_forward(module, input, hx, layers)
            states = {"dL_dh": [StateProbes([p.h], p.sizes) for p in layers]}
            if module.mode == "LSTM":
                states["dL_dc"] = [StateProbes([p.c], p.sizes) for p in layers]
            self.passes.append(ProbedPass(states, rows=tuple(row_names(module))))
            return out

        module.forward = forward

    def disarm(self) -> None:
        self.module.__dict__.pop("forward", None)


class CallLoopTarget(Target):
    """A step module called once per timestep in the user's loop: each call's output gets a
    probe. Subclasses say how to call it and which of its outputs are states."""

    keys: tuple[str, ...]
    rows: tuple[str, ...] | None

    def arm(self, request: ProbeRequest) -> None:
        super().arm(request)
        self.steps: list[tuple[Tensor, ...]] = []  # each call's probes, one per state

    def probe(self, states: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """Add a fresh zero probe to each state this call returns."""
        probes = tuple(zero_probe(s.shape, s) for s in states)
        self.steps.append(probes)
        return tuple(s + p for s, p in zip(states, probes))

    def disarm(self) -> None:
        if self.steps:  # one pass: the loop's calls are its timesteps
            per_state = list(zip(*self.steps))
            self.passes.append(ProbedPass(
                {key: [StateProbes(list(leaves), [leaf.shape[0] if leaf.dim() > 1 else 1
                                                  for leaf in leaves])]  # unbatched: one row
                 for key, leaves in zip(self.keys, per_state)}, rows=self.rows))
        self.steps = []


class TorchCellTarget(CallLoopTarget):
    """`torch.nn.RNNCell`, `GRUCell`, `LSTMCell`: a forward hook adds the probes."""

    rows = ("cell",)

    def __init__(self, path: str, module: nn.RNNCellBase):
        super().__init__(path, module)
        self.keys = ("dL_dh", "dL_dc") if isinstance(module, nn.LSTMCell) else ("dL_dh",)

    def arm(self, request: ProbeRequest) -> None:
        super().arm(request)

        def hook(module, args, output):
            if isinstance(output, tuple):
                return self.probe(output)
            return self.probe((output,))[0]

        self.handle = self.module.register_forward_hook(hook)

    def disarm(self) -> None:
        self.handle.remove()
        super().disarm()


class CellTarget(CallLoopTarget):
    """An rnnlab `Cell` stepped in a loop: its ``step`` is wrapped while armed."""

    rows = None

    def __init__(self, path: str, module: Cell):
        from rnnlab.cells.base import state_keys

        super().__init__(path, module)
        self.keys = state_keys(module.state_names)

    def arm(self, request: ProbeRequest) -> None:
        super().arm(request)
        step = type(self.module).step.__get__(self.module)

        def probed_step(u_t, state, dt):
            return self.probe(tuple(step(u_t, state, dt)))

        self.module.step = probed_step

    def disarm(self) -> None:
        self.module.__dict__.pop("step", None)
        super().disarm()


def target_for(path: str, module: nn.Module) -> Target | None:
    if isinstance(module, SelfProbing) and not isinstance(module, Cell):
        return SelfProbingTarget(path, module)
    if isinstance(module, nn.RNNBase):
        return TorchRNNTarget(path, module)
    if isinstance(module, nn.RNNCellBase):
        return TorchCellTarget(path, module)
    if isinstance(module, Cell):
        return CellTarget(path, module)
    return None


def find_targets(model: nn.Module, modules: Iterable[str | nn.Module] | None = None
                 ) -> list[Target]:
    """The recurrent modules of ``model``, outermost first (a watched module's own submodules
    are its business), or those named in ``modules`` (paths as in ``model.named_modules()``, or
    the modules themselves). An empty result, or a name that is not a recurrent module, is an
    error saying what can be watched."""
    named = dict(model.named_modules())
    if modules is not None:
        paths = {id(m): p for p, m in named.items()}
        targets = []
        for wanted in modules:
            path = paths.get(id(wanted)) if isinstance(wanted, nn.Module) else wanted
            if path not in named:
                raise ValueError(f"modules: {wanted!r} is not a submodule of "
                                 f"{type(model).__name__} (its modules: "
                                 f"{', '.join(repr(p) for p in named if p) or 'none'})")
            target = target_for(path, named[path])
            if target is None:
                raise ValueError(f"modules: {path!r} is a {type(named[path]).__name__}, not a "
                                 f"recurrent module; what can be watched: {'; '.join(KINDS)}")
            targets.append(target)
        return targets
    targets: list[Target] = []
    for path, module in named.items():
        if any(path == t.path or path.startswith(f"{t.path}.") or not t.path for t in targets):
            continue
        target = target_for(path, module)
        if target is not None:
            targets.append(target)
    if not targets:
        raise ValueError(f"{type(model).__name__} holds no recurrent module to watch; what can "
                         f"be watched: {'; '.join(KINDS)} (or name them: modules=[...])")
    return targets


class Watch:
    """Probes the recurrent modules of ``model`` while active (`start` … `stop`, or ``with``).

    Args:
        model: any `torch.nn.Module` (a LightningModule too).
        modules: which modules to watch (paths or modules); default: every recurrent module.
        contributions: also the per-step parameter contributions, where a module offers them.
    """

    def __init__(self, model: nn.Module, modules: Iterable[str | nn.Module] | None = None,
                 contributions: bool = False):
        self.model = model
        self.targets = find_targets(model, modules)
        self.request = ProbeRequest(contributions=contributions)
        self.active = False

    def start(self) -> Watch:
        for target in self.targets:
            target.arm(self.request)
        self.active = True
        return self

    def stop(self) -> None:
        """Disarm every module (the probes and their gradients stay readable)."""
        if self.active:
            self.active = False
            for target in self.targets:
                target.disarm()

    def __enter__(self) -> Watch:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def passes(self) -> dict[str, ProbedPass]:
        """Pass name (the module's path, ``<path>@<i>`` for later calls) → its probes."""
        return {name: p for t in self.targets for name, p in zip(t.pass_names(), t.passes)}

    def release(self, calls: bool = False) -> None:
        """Drop the last passes' probes once their records are made, and with ``calls`` the
        recorded module calls: otherwise their tensors (every step's probes and gradients, the
        states a probed pass kept) stay alive until the next `start`."""
        for target in self.targets:
            target.passes = []
            if calls and isinstance(target, TorchRNNTarget):
                target.calls = []

    def module_calls(self) -> dict[str, ModuleCall]:
        """Pass name → what each watched torch.nn RNN, GRU or LSTM was called with."""
        return {name: call for t in self.targets if isinstance(t, TorchRNNTarget)
                for name, call in zip(t.pass_names(len(t.calls)), t.calls)}

    def profiles(self, reduce: Reduce = None, world_size: int = 1
                 ) -> dict[str, dict[str, np.ndarray]]:
        """Pass name → profile key → ||∂L/∂h_t||: (rows, T) float64 for torch.nn modules, (T,)
        for rnnlab cells and models. Call after the backward pass."""
        return {name: p.profiles(reduce, world_size) for name, p in self.passes().items()}

    def save(self, dirpath: str | Path, step: int) -> list[Path]:
        """Write each pass's record as ``<dirpath>/<pass name>/step_<step:07d>.npz``."""
        from rnnlab.records import Record

        return [Record.from_pass(step, p).save(Path(dirpath) / name)
                for name, p in self.passes().items()]


def watch(model: nn.Module, modules: Iterable[str | nn.Module] | None = None,
          contributions: bool = False) -> Watch:
    """A `Watch` over ``model``: ``with watch(model) as flow: …; flow.profiles()``."""
    return Watch(model, modules, contributions)
