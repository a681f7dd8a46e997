"""The Cell contract: the transition g of a recurrent network, one step at a time."""

from __future__ import annotations

import keyword

import torch
from torch import Tensor, nn

from rnnlab.config import ConfigError, require_int

State = tuple[Tensor, ...]
# Record keys that are not state profiles but begin like one: the per-step parameter
# contributions ``dL_dW_<module>``. A state named ``W_…`` would be read as one of them.
RESERVED_PREFIX = "W_"


def state_key(name: str, index: int) -> str:
    """The record key of state ``index`` named ``name`` (see `state_keys`)."""
    if index == 0:
        return "dL_dz"
    return f"dL_dz_{index}" if name == "z" else f"dL_d{name}"


def state_keys(state_names: tuple[str, ...]) -> tuple[str, ...]:
    """The record key of each state's profile ||dL/ds_t||, unique for names `check_state_names`
    accepts.

    - the first state, which the decoder reads, is ``dL_dz`` whatever its name (z is the lab's
      name for the read state: coRNN's and LEM's y is ``dL_dz``);
    - every later state ``s`` is ``dL_d<s>`` (the LSTM's c: ``dL_dc``);
    - a later state that is itself named ``z`` (coRNN's and LEM's second state) would take the
      first state's key, so it is ``dL_dz_<index>`` instead: ``dL_dz_1``.
    """
    return tuple(state_key(name, i) for i, name in enumerate(state_names))


def check_state_names(cell: str, state_names: tuple[str, ...]) -> None:
    """ConfigError unless every state gets its own record key and TensorBoard tag.

    Refused: an empty or non-tuple ``state_names``; a name that is not a Python identifier (it
    becomes part of an .npz key and a tag) or is a keyword; a name starting ``W_`` (its key
    ``dL_dW_…`` is read as a parameter contribution); a name given to two states; two states
    with the same key (a name such as ``z_1`` that meets `state_keys`' rule for a later ``z``).
    """
    def refuse(why: str) -> ConfigError:
        return ConfigError(f"{cell}.state_names = {state_names!r}: {why}; rename the state in "
                           f"{cell}.state_names (each name an identifier, not starting "
                           f"{RESERVED_PREFIX!r}, its key {{dL_dz for the first, dL_d<name> for "
                           f"the others, dL_dz_<i> for a later z}} unique)")

    if not isinstance(state_names, tuple) or not state_names:
        raise refuse("must be a non-empty tuple of names")
    for name in state_names:
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise refuse(f"{name!r} is not an identifier")
        if name.startswith(RESERVED_PREFIX):
            raise refuse(f"{name!r} would be recorded as dL_d{name}, a parameter "
                         "contribution's key")
    for i, name in enumerate(state_names):
        if name in state_names[:i]:
            raise refuse(f"{name!r} names two states (#{state_names.index(name)} and #{i})")
    keys = state_keys(state_names)
    for i, key in enumerate(keys):
        if key in keys[:i]:
            first = keys.index(key)
            raise refuse(f"states {state_names[first]!r} (#{first}) and {state_names[i]!r} "
                         f"(#{i}) would both be recorded as {key}")


class Cell(nn.Module):
    """Base class of every recurrent transition g: z_t = g(u_t, z_{t-1}; w).

    A subclass implements the equation of its cell and nothing else; the model owns the loop over
    time, the probes that measure dL/dz_t, the encoder and the decoder.

    Contract (docs/architecture.md, "Contracts"):

    - `state_names`: names of the tensors that make up the state z, e.g. ``("h",)`` or
      ``("h", "c")``. ``state_names[0]`` is what the decoder reads and what ``dL_dz`` measures;
      every other state ``s`` is measured as ``dL_d<s>`` (the LSTM's cell state gives ``dL_dc``),
      and a later state named ``z`` as ``dL_dz_<index>`` (`state_keys`). Names that would still
      share a key, or are not identifiers, are refused when the cell is constructed
      (`check_state_names`). Each profile is the gradient with respect to that tensor as the
      state passed to step t+1, the others held: a state the step computes from the new value
      of another (the LSTM's h from c_t) gets 0 at T−1 when the loss reads only the first.
    - `init_state(batch_size)` returns the initial state, each tensor (B, hidden_size), on the
      device and dtype of the cell's parameters.
    - `step(u_t, state, dt)` returns the next state. ``u_t``: (B, input_size), the encoder output
      at step t; ``dt``: the (B,) time gaps when the task supplies them, else ``None`` (cells with
      a time step then use their configured one; discrete cells ignore it).
    - optional `sequence(u, state)` -> ``(outputs, state)`` with ``u``: (B, T, input_size),
      ``outputs``: (B, T, hidden_size) the first state at every step — a faster whole-sequence
      path that must match stepping `step` to float tolerance. The base returns ``None`` (no fast
      path); the model then loops over `step`. The model uses it on unmonitored training steps
      and in validation, never when the task supplies time gaps ``dt``.
    - optional `jacobian_norms(u_t, state, dt)` -> (B,): the exact spectral norm of
      J = ∂step(u_t, state, dt)/∂state per sequence (the state's tensors concatenated), for cells
      whose J is cheap to take apart (diagonal: max |J_ii|; 2×2 rotation blocks: max |λ|). The
      monitor then uses it instead of power iteration. The base has none (``None``).
    - optional `transition_jacobian(u_t, state, dt)` -> ``(matvec, rmatvec)``: J and Jᵀ of the
      same step as two functions on rows of the flattened state (N, D), D the state's tensors
      concatenated, ``u_t`` and ``state`` (N, ·): ``matvec(v) = J v`` and ``rmatvec(w) = Jᵀ w``
      per row, written out from the step's own derivatives (called without gradient). The
      Lanczos iteration of the Jacobian norms then needs no autograd graph: two matmuls with
      the recurrent weight and a few elementwise products per iteration (docs/cells.md: 1.19–1.54×
      faster than autograd for the Elman RNN, GRU and LSTM), and the Lyapunov spectrum's
      backward products Jᵀ Q none either (1.15–1.84× faster at T = 100 for the LSTM … LRU).
      The base has none (``None``): autograd on `forward_mode_step` (`step` for the spectrum)
      serves every cell.
    - optional `input_projection(u)` and `projected_step(g_t, state, dt)`, together: the part of
      `step` that reads the input alone (W_ih u_t + b), for many steps at once, ``u`` (…,
      input_size) → ``g`` (…, ·) acting on the last dimension (the model passes a chunk of C
      steps time-major, (C, B, input_size)), and the rest of the step from ``g[t]``, so that
      ``projected_step(input_projection(u)[t], state, dt) == step(u[t], state, dt)``. The
      step-by-step loop (monitored steps, cells without a fused path) then makes one matmul per
      chunk of steps instead of one per step. Per-step parameter probes (W + q_t) always go
      through `step`. The base has neither (``None``).
    - optional, with the projection, `probed_sequence(g, state, probes, previous)` ->
      ``(first, state)``: a chunk of C probed steps z_t = projected_step(g[t], z_{t−1}) + p_t
      in one autograd node (`rnnlab.cells.recurrences`), ``g`` (C, B, ·), ``probes`` one
      (C, B, hidden) tensor per state (zeros, from the monitor), ``first`` z[0] at every step
      (C, B, hidden); it appends z_{t−1} (detached) to ``previous`` unless None. The probes'
      gradients must be the loop's. The base has none (``None``).
    - optional `step_parameter_grads(u, previous, cotangents, dt)` -> one (C, *shape) tensor
      per parameter, in `named_parameters` order: dL/dW⁽ᵗ⁾ of C steps at once, the vector–Jacobian
      product of each step alone with respect to the parameters, written out from the step's
      own derivatives. ``u`` (C, B, input_size), ``previous`` one (C, B, hidden) tensor per
      state (z_{t−1}), ``cotangents`` likewise (∂L/∂z_t), ``dt`` (C, B) or None. The per-step
      contributions then need no `torch.func.vmap` of autograd (`per_step_parameter_grads`,
      which gives the same numbers for any cell). The base has none (``None``).
    - optional `diagnostics()` -> ``{name: number}``: read (and reset) by the model after every
      training step and logged as ``cell/<name>``, e.g. an ODE solver's ``nfe_forward``. The base
      returns ``{}``.

    The model owns the loop, so `step` must not keep state between calls other than counters
    for `diagnostics`: the probes that measure ``dL_dz`` are added to what `step` returns.
    On monitored steps `step` runs under `torch.func.functional_call` with per-step weights
    W + q_t (the parameter probes); a backward that evaluates a module again after `step` has
    returned (an adjoint method, a custom autograd Function) must use the weights `step` read,
    ``dict(module.named_parameters())`` taken inside `step`, as the ODE cell's adjoint does.

    Constructed by Hydra as ``instantiate(cfg.cell, input_size=...)``: the model passes
    ``input_size``; every other argument comes from the cell's YAML, whose ``_target_`` names the
    class. Check arguments in ``__init__`` with `rnnlab.config.require*`, naming the key as
    ``cell.<arg>``, so a bad value stops the run before training with the key and the fix.

    A cell of your own lives in your package and its YAML in your config directory
    (``<dir>/cell/<name>.yaml``, a name rnnlab's cells do not have); run it with
    ``RNNLAB_CONFIG_PATH=<dir> rnnlab train cell=<name>`` (README, "Add your own cell"). A
    minimal cell::

        class IndRNN(Cell):
            '''h_t = relu(W u_t + w ⊙ h_{t-1} + b)  (Li et al. 2018)'''

            def __init__(self, input_size: int, hidden_size: int = 64):
                super().__init__(input_size, hidden_size)
                self.input = nn.Linear(input_size, hidden_size)
                self.recurrent = nn.Parameter(torch.rand(hidden_size))

            def step(self, u_t, state, dt):
                (h,) = state
                return (torch.relu(self.input(u_t) + self.recurrent * h),)
    """

    state_names: tuple[str, ...] = ("h",)
    jacobian_norms = None  # optional: (u_t, state, dt) -> (B,), see the contract
    transition_jacobian = None  # optional: (u_t, state, dt) -> (matvec, rmatvec), the contract
    input_projection = None  # optional: u (C, B, input) -> g (C, B, ·), with projected_step
    projected_step = None  # optional: (g_t, state, dt) -> State, see the contract
    probed_sequence = None  # optional: (g, state, probes, previous) -> (first, state)
    step_parameter_grads = None  # optional: (u, previous, cotangents, dt) -> [(C, *shape)]

    def __init__(self, input_size: int, hidden_size: int):
        super().__init__()
        check_state_names(type(self).__name__, self.state_names)
        self.input_size = require_int("cell.input_size", input_size)
        self.hidden_size = require_int("cell.hidden_size", hidden_size)

    def init_state(self, batch_size: int) -> State:
        p = next(self.parameters())
        return tuple(
            torch.zeros(batch_size, self.hidden_size, device=p.device, dtype=p.dtype)
            for _ in self.state_names
        )

    def step(self, u_t: Tensor, state: State, dt: Tensor | None) -> State:
        raise NotImplementedError(f"{type(self).__name__} must implement step(u_t, state, dt)")

    def sequence(self, u: Tensor, state: State) -> tuple[Tensor, State] | None:
        return None

    def plain_path(self, seq_len: int, device: torch.device) -> str:
        """How an unprobed pass of ``seq_len`` steps on ``device`` trains fastest, which
        ``model.fast_path=auto`` (the default) takes: ``"sequence"`` (`sequence`, where it
        returns one), ``"chunks"`` (`probed_sequence` over the chunks of `input_projection`,
        with zero probes) or ``"steps"`` (`projected_step` / `step`). All compute the same
        function. Default: the cell's `sequence` wherever it has one."""
        return "sequence"

    def sequence_from_inputs(self, x: Tensor, encoder: nn.Module, state: State,
                             n_out: int) -> Tensor | None:
        """Optional, before `sequence` on unmonitored steps: z[0] on the last ``n_out`` steps,
        (B, n_out, hidden), from the raw inputs x (B, T, features) with u_t = encoder(x_t)
        evaluated by the cell. For a cell that gains from knowing what is read (the ODE stacks
        only those states) or whose backward must not carry a gradient for every u_t (the
        ODE's whole-grid adjoint, the encoder inside g); None: not offered.
        """
        return None

    def forward_mode_step(self, u_t: Tensor, state: State, dt: Tensor | None) -> State:
        """`step` as a map torch.func can trace (jvp/vjp, for the transition Jacobians).

        The same function as `step`; override it only where `step` goes through an autograd
        Function that torch.func does not support (the ODE cell's adjoint).
        """
        return self.step(u_t, state, dt)

    def diagnostics(self) -> dict[str, float]:
        return {}
