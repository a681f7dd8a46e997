"""Ways to run a cell's step and the encoder/decoder other than plainly: with per-step parameters
W + q_t (the monitor's parameter probes) and compiled by `torch.compile`.

The per-step parameters are swapped in by `torch.func.functional_call` for the duration of the
call: a cell whose backward evaluates a module again after `step` has returned (the ODE cell's
adjoint) must evaluate it with the weights it read during `step`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap

from rnnlab.cells.base import Cell, State


def per_step_parameters(cell: Cell, probes: dict[str, Tensor]):
    """``step(u_t, state, dt, t)`` that runs step t of ``cell`` with parameters W + q_t.

    ``probes``: parameter name → (T, *shape). Works for any cell: the parameters are swapped
    with `torch.func.functional_call`.
    """
    caller = _StepCaller(cell)
    params = dict(cell.named_parameters())
    names = list(probes)
    per_step = list(zip(*(probes[n].unbind(0) for n in names)))  # split once: linear backward

    def step(u_t: Tensor, state: State, dt_t: Tensor | None, t: int) -> State:
        probed = {f"cell.{n}": params[n] + q for n, q in zip(names, per_step[t])}
        return functional_call(caller, probed, (u_t, state, dt_t))

    return step


def per_step_parameter_grads(cell: Cell, u: Tensor, previous: State, cotangents: State,
                             dt: Tensor | None) -> list[Tensor]:
    """dL/dW⁽ᵗ⁾ of every cell parameter for C steps at once, one `vmap` over the steps of the
    vector–Jacobian product of `step` with respect to its parameters: ``u`` (C, B, input),
    ``previous`` and ``cotangents`` one (C, B, hidden) tensor per state (z_{t−1} and ∂L/∂z_t),
    ``dt`` (C, B) or None. Returns one (C, *shape) gradient per parameter, in
    `named_parameters` order: the numbers `per_step_parameters` gives step by step, without
    the Python loop. Raises what `vmap` raises for a step it cannot batch (data-dependent
    control flow, an ODE solver's adaptive steps).
    """
    caller = _StepCaller(cell)
    params = {f"cell.{n}": p.detach() for n, p in cell.named_parameters()}

    def one_step(u_t: Tensor, z: State, cotangent: State, dt_t: Tensor | None):
        _, pullback = vjp(lambda w: functional_call(caller, w, (u_t, z, dt_t)), params)
        return pullback(tuple(cotangent))[0]

    grads = vmap(one_step, in_dims=(0, 0, 0, 0 if dt is not None else None))(
        u, tuple(previous), tuple(cotangents), dt)
    return list(grads.values())


class CompiledStep:
    """``cell.step`` compiled by `torch.compile`: the same function, its elementwise work fused.

    torch.compile treats a module's integer attributes as constants, so a cell that counts in one
    (the ODE's ``nfe``) would compile again on every new count until torch gives up and runs
    eagerly. The integers the first call changes are taken for counters: later calls run with
    them at 0, and what they count is added back afterwards.
    """

    def __init__(self, cell: Cell):
        self.cell = cell
        self.compiled = torch.compile(cell.step, dynamic=False)
        self.counters: list[str] | None = None  # found on the first call

    def __call__(self, u_t: Tensor, state: State, dt_t: Tensor | None) -> State:
        if self.counters is None:
            before = integer_attributes(self.cell)
            out = self.compiled(u_t, state, dt_t)
            after = integer_attributes(self.cell)
            self.counters = [k for k, v in before.items() if after.get(k) != v]
            return out
        counts = {k: getattr(self.cell, k) for k in self.counters}
        for k in counts:
            setattr(self.cell, k, 0)
        try:
            return self.compiled(u_t, state, dt_t)
        finally:
            for k, v in counts.items():
                setattr(self.cell, k, v + getattr(self.cell, k))


def integer_attributes(module: nn.Module) -> dict[str, int]:
    return {k: v for k, v in vars(module).items() if type(v) is int}


class _StepCaller(nn.Module):
    """Exposes ``cell.step`` as ``forward``, which `functional_call` calls."""

    def __init__(self, cell: Cell):
        super().__init__()
        self.cell = cell

    def forward(self, u_t: Tensor, state: State, dt_t: Tensor | None) -> State:
        return self.cell.step(u_t, state, dt_t)


def map_over_time(module: nn.Module, probes: dict[str, Tensor], x: Tensor) -> Tensor:
    """``module`` applied at every step t with parameters W + q_t: x (B, T, …) → (B, T, …).

    ``probes``: parameter name → (T, *shape). One `vmap` over time, no Python loop.
    """
    params = dict(module.named_parameters())

    def call(q_t: dict[str, Tensor], x_t: Tensor) -> Tensor:
        return functional_call(module, {n: params[n] + q for n, q in q_t.items()}, (x_t,))

    return vmap(call, in_dims=(0, 1), out_dims=1)(probes, x)
