"""The recurrent model: encoder → cell g unrolled over T steps → decoder, parameters shared in time.

    h(t) = Enc(x(t)),   z(t) = g(h(t), z(t−1); w),   y(t) = Dec(z(t))

The loss is read on the last ``n_out`` steps. Training uses the cell's fast `sequence` path when
it has one. Inside ``model.probing(request)`` (`rnnlab.probing`: how the gradient-flow instrument
asks for a probed step) the probed loop runs instead, adding a zero probe p_t to every state so
that after backward p_t.grad = ∂L/∂z_t (the total derivative).

Parameter probes measure the per-step contributions dL/dW⁽ᵗ⁾ of the shared parameters: step t
runs encoder, cell and decoder with W + q_t for a zero q_t, so after backward q_t.grad = dL/dW⁽ᵗ⁾
and Σ_t q_t.grad = dL/dW (docs/architecture.md, "The science"). Under the monitor the cell's are
computed after the backward pass instead, a chunk of steps at a time (`cell_contributions`).

Gradient flossing (``model.flossing``, `rnnlab.flossing`) runs before the first training step
(`on_train_start`) and adds its term to the loss of chosen steps (`flossing_term`).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rnnlab.cells.base import Cell, State, state_keys
from rnnlab.config import ConfigError, is_int, require, require_choice, require_int
from rnnlab.flossing import Flossing, cycled, flossing_loss, prefloss
from rnnlab.probing import ProbedPass, ProbeRequest, StateProbes, zero_probe
from rnnlab.steps import (
    CompiledStep,
    integer_attributes,
    map_over_time,
    per_step_parameter_grads,
    per_step_parameters,
)

log = logging.getLogger(__name__)

MODULES = ("encoder", "cell", "decoder")
# module → parameter name → (T, *parameter shape): the zero probe q_t of every step t
ParamProbes = dict[str, dict[str, Tensor]]
# per state, a zero probe (T, B, hidden), or its chunks of steps (`RecurrentModel.make_probes`)
Probes = tuple[Tensor | list[Tensor], ...]
# Values of the cell's per-step parameter copies per chunk of `cell_contributions` (× a few for
# their gradients and the graph): 2**22 float32 values are 16 MiB.
CONTRIBUTION_CHUNK_VALUES = 2**22
# … and at most this many values in each of a chunk's activations (C steps × batch × state
# width; the vmap of a step's vector–Jacobian product keeps a dozen such tensors). A cell with
# few parameters would otherwise run hundreds of steps at once: the minGRU at T = 1000
# (B = 64, H = 128) peaked at 1155 MB in chunks of 496 steps, 888 MB in chunks of 124.
CONTRIBUTION_ACTIVATION_VALUES = 2**20
# Steps whose input projection (`Cell.input_projection`) the step-by-step loop makes at once
# when it does not checkpoint segments (then a segment's): one matmul per chunk, and at most
# a chunk's projection alive beside the graph.
PROJECTION_STEPS = 64
PLAIN_PATHS = ("sequence", "chunks", "steps")  # how an unprobed pass may run (`Cell.plain_path`)
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD,
              "rmsprop": torch.optim.RMSprop}


class RecurrentModel(pl.LightningModule):
    """``forward(x, dt=None, probes=None, param_probes=None)``: x (B, T, input_size) → y_hat
    (B, n_out, output_size).

    Args:
        cell: the cell's config (``_target_`` and its arguments), instantiated with ``input_size``.
        input_size, output_size, n_out, loss: from the task (`Task.describe`).
        encoder_size: width of the linear encoder h(t) = Enc(x(t)).
        optimizer: ``{"name": adam|adamw|sgd|rmsprop, "lr": …}``; other keys go to the optimizer.
        fast_path: how unmonitored steps train: ``auto`` as the cell says is fastest at this T
            on this device (`Cell.plain_path`: its `sequence`, its probed chunks with zero
            probes, or stepping; stepping becomes its chunks with ``checkpoint_steps``),
            ``True`` its `sequence` wherever it has one, ``False`` stepping.
        compile: on unprobed passes of a cell without a `sequence` path, loop over a
            `torch.compile`d ``cell.step`` (compiled on first use, again per new input shape).
        checkpoint_steps: K > 0 recomputes the step-by-step loop (probed passes, cells without
            a fused path) in segments of K steps in the backward pass: activation memory for
            T/K states and one segment instead of T steps, for one more forward pass. The
            gradients are the same; counters of the cell's work (an ODE's NFE) include the
            recomputation.
        flossing: ``{k, weight, pre_steps, every_n_steps, lr}`` (`rnnlab.flossing.Flossing`);
            None: no flossing.
    """

    def __init__(self, cell: dict[str, Any], input_size: int, output_size: int, n_out: int = 1,
                 loss: str = "mse", encoder_size: int = 32,
                 optimizer: dict[str, Any] | None = None, fast_path: bool | str = "auto",
                 compile: bool = False, checkpoint_steps: int = 0,
                 flossing: dict[str, Any] | None = None):
        super().__init__()
        self.save_hyperparameters()
        require(isinstance(compile, bool), "model.compile", compile, "true or false")
        require(is_int(checkpoint_steps, 0), "model.checkpoint_steps", checkpoint_steps,
                "0 (keep every step's activations) or an integer >= 1 (steps per recomputed "
                "segment)")
        require_choice("task.loss", loss, ("mse", "cross_entropy"))
        require_int("model.encoder_size", encoder_size)
        self.optimizer_cfg = dict(optimizer or {"name": "adam", "lr": 1e-3})
        require_choice("model.optimizer.name", self.optimizer_cfg.get("name"), tuple(OPTIMIZERS))
        check_optimizer_keys(self.optimizer_cfg)
        require(isinstance(fast_path, bool) or fast_path == "auto", "model.fast_path", fast_path,
                "auto, true or false")
        self.flossing = Flossing.from_config(flossing)
        self.encoder = nn.Linear(input_size, encoder_size)
        self.cell: Cell = instantiate(cell, input_size=encoder_size, _convert_="all")
        if not isinstance(self.cell, Cell):
            raise ConfigError(f"cell._target_ must name a subclass of rnnlab.cells.Cell, got "
                              f"{type(self.cell).__name__}")
        check_cell_step(self.cell, cell.get("_target_"))
        self.decoder = nn.Linear(self.cell.hidden_size, output_size)
        self.n_out = n_out
        self.last_val_step = -1  # global step of the last validation outside the sanity check
        # The open `probing` context: what it asks for, and where each forward pass's probes go.
        self._probing: tuple[ProbeRequest, list[ProbedPass]] | None = None
        self.cell_totals: dict[str, float] = {}  # sums of the cell's diagnostics over training
        self.train_loss: Tensor | None = None  # the last training step's loss (detached)
        self._compiled_step: CompiledStep | None = None  # made on first use
        # `cell_contributions` batches its steps with vmap until the cell's step refuses it
        self.batched_contributions = True

    # --- the probed path: rnnlab.probing's contract -----------------------------------------------
    @contextmanager
    def probing(self, request: ProbeRequest) -> Iterator[list[ProbedPass]]:
        """Inside: every forward pass runs the probed path and appends its `ProbedPass` (state
        probes ``dL_dz``, ``dL_d<state>``; with ``request.contributions`` the parameter probes of
        encoder, cell and decoder) to the yielded list."""
        if self._probing is not None:
            raise RuntimeError("RecurrentModel.probing is already open (one probed step at a time)")
        passes: list[ProbedPass] = []
        self._probing = (request, passes)
        try:
            yield passes
        finally:
            self._probing = None

    @contextmanager
    def trajectory(self, x: Tensor, dt: Tensor | None = None
                   ) -> Iterator[tuple[Tensor, list[State]]]:
        """For analysing the transitions of a batch x (B, T, …): yields the cell's inputs
        u = encoder(x) (B, T, input) and ``previous[t]`` = z_{t−1}, the state step t starts from
        (z_{−1} the initial state), from one pass of the loop without gradient.

        The model is in eval mode inside, as analysis is, so it neither counts as training work
        (an ODE cell's NFE) nor draws training randomness; its mode is restored after.
        """
        segments = self.trajectory_segments(x, dt, max(1, x.shape[1]))
        try:
            _, u, _, previous = next(segments)
            yield u, previous
        finally:
            segments.close()  # its mode restored

    def trajectory_segments(self, x: Tensor, dt: Tensor | None, length: int
                            ) -> Iterator[tuple[int, Tensor, Tensor | None, list[State]]]:
        """`trajectory` a segment of ``length`` steps at a time, so that only one segment's
        states are held: yields (t0, u[:, t0:t1], dt[:, t0:t1], previous[t0:t1]) for
        consecutive segments, each pass continuing from the state the one before ended in (the
        same steps as one pass: the same numbers). In eval mode, without gradient, as
        `trajectory`."""
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                u = self.encoder(x)
            T, state = u.shape[1], None
            for t0 in range(0, T, length):
                t1 = min(t0 + length, T)
                previous: list[State] = []
                last: list[State] = []
                part = dt[:, t0:t1] if dt is not None else None
                with torch.no_grad():  # (not around the yield: the caller keeps its grad mode)
                    self.unroll(u[:, t0:t1], part, previous_states=previous,
                                initial_state=state, last_state=last)
                state = last[0]
                yield t0, u[:, t0:t1], part, previous
        finally:
            self.train(was_training)

    def probed_pass(self, x: Tensor, request: ProbeRequest) -> tuple[ProbedPass, Probes,
                                                                    ParamProbes | None]:
        """Fresh probes for a forward pass over x (B, T, …), and the pass that reads them. With
        ``request.contributions`` the encoder's and decoder's parameter probes (T times their
        few parameters); the cell's contributions are streamed after the backward pass
        (`cell_contributions`), in memory that does not grow with T."""
        B, T = x.shape[:2]
        probes = self.make_probes(B, T, chunk=self.probe_chunk())
        param_probes = (self.make_param_probes(T, ("encoder", "decoder"))
                        if request.contributions else None)
        keys = state_keys(self.cell.state_names)
        states = {key: [StateProbes(p, [1] * T)] for key, p in zip(keys, probes)}
        if request.stream and not request.contributions:  # nothing else reads their gradients
            for group in states.values():
                group[0].stream()
        return ProbedPass(states, params=param_probes), probes, param_probes

    # --- the unrolled network ------------------------------------------------------------------
    def probe_chunk(self) -> int:
        """Steps per probe leaf of a probed pass: the chunk of steps the loop runs at once."""
        return self.hparams.checkpoint_steps or PROJECTION_STEPS

    def make_probes(self, batch_size: int, seq_len: int, chunk: int | None = None) -> Probes:
        """Zero probes to be added as z_t ← z_t + p_t: one (T, B, hidden) leaf per state, or with
        ``chunk`` a list of leaves of ``chunk`` steps each (the last shorter), the chunks the
        loop runs (`unroll`). Each chunk's gradient is then its own: one (T, B, hidden) leaf
        would hold every chunk's gradient and their concatenation at once at the end of the
        backward pass (twice the probes' gradients)."""
        states = self.cell.init_state(batch_size)
        if chunk is None:
            return tuple(zero_probe((seq_len, *s.shape), s) for s in states)
        return tuple([zero_probe((min(chunk, seq_len - t0), *s.shape), s)
                      for t0 in range(0, seq_len, chunk)] for s in states)

    def make_param_probes(self, seq_len: int, modules: tuple[str, ...] = MODULES) -> ParamProbes:
        """Zero parameter probes q_t: a (T, *shape) tensor per parameter of ``modules``.

        Memory: T times the modules' parameter count (the probes, their gradients and the
        per-step parameters W + q_t in the graph); the monitor probes only the encoder and
        decoder this way and streams the cell's (`cell_contributions`).
        """
        return {module: {name: torch.zeros(seq_len, *p.shape, dtype=p.dtype, device=p.device,
                                           requires_grad=True)
                         for name, p in getattr(self, module).named_parameters()}
                for module in modules}

    def contribution_chunk_steps(self, rows: int = 1) -> int:
        """Steps per chunk of `cell_contributions` over ``rows`` sequences: at most
        `CONTRIBUTION_CHUNK_VALUES` // the cell's parameter count and
        `CONTRIBUTION_ACTIVATION_VALUES` // (rows × the state's width), at least 1."""
        count = sum(p.numel() for p in self.cell.parameters()) or 1
        width = rows * sum(s[0].numel() for s in self.cell.init_state(1))
        return max(1, min(CONTRIBUTION_CHUNK_VALUES // count,
                          CONTRIBUTION_ACTIVATION_VALUES // width))

    def cell_contributions(self, u: Tensor, dt: Tensor | None, previous: list[State],
                           probes: Probes) -> Iterator[list[Tensor]]:
        """dL/dW⁽ᵗ⁾ of the cell's parameters after a probed pass's backward, in chunks of steps:
        per chunk of C steps one (C, *shape) gradient per parameter, in `named_parameters` order.

        Step t's contribution is the vector–Jacobian product of that step alone with the total
        gradient of its output, dL/dW⁽ᵗ⁾ = (∂step(u_t, z_{t−1}; W)/∂W)ᵀ · ∂L/∂z_t, where ∂L/∂z_t
        is the state probe's gradient (z_t = step(…) + p_t) and z_{t−1}, u_t are the pass's own
        (``previous``, ``u`` detached). Each chunk runs its C steps again from those states with
        parameters W + q_t (`per_step_parameters`) and takes the gradients of the zero q_t: the
        same numbers as probing W⁽ᵗ⁾ during the pass (`tests/test_instruments.py`), in memory of
        C, not T, copies of the parameters and steps' activations (`contribution_chunk_steps`). A
        cell that writes out its per-step parameter gradients (`Cell.step_parameter_grads`: the
        Elman RNN, GRU, LSTM, minGRU, LRU, IndRNN, AntisymmetricRNN) gives a chunk's at once;
        for the others the C steps of a chunk are one `vmap` of the step's vector–Jacobian product
        (`per_step_parameter_grads`: the same numbers, 2–5× faster); a cell whose step vmap
        cannot batch (an adaptive ODE solver) is stepped one step at a time from then on, which
        the log says once. The cell's counters (the ODE's NFE) are left as the training step
        made them.
        """
        T = u.shape[1]
        chunk = self.contribution_chunk_steps(u.shape[0])
        inputs = u.detach().unbind(1)
        dts = dt.unbind(1) if dt is not None else (None,) * T
        cotangents = [torch.cat([c.grad if c.grad is not None else torch.zeros_like(c)
                                 for c in ([p] if isinstance(p, Tensor) else p)]) for p in probes]
        counters = integer_attributes(self.cell)
        try:
            for t0 in range(0, T, chunk):
                t1 = min(t0 + chunk, T)
                grads = None
                # the chunk's steps, time-major: u_t, z_{t−1} and ∂L/∂z_t per state, dt
                steps = (u.detach()[:, t0:t1].transpose(0, 1),
                         tuple(torch.stack(s) for s in zip(*previous[t0:t1])),
                         tuple(g[t0:t1] for g in cotangents),
                         dt[:, t0:t1].transpose(0, 1) if dt is not None else None)
                if self.cell.step_parameter_grads is not None:
                    grads = self.cell.step_parameter_grads(*steps)
                elif self.batched_contributions:
                    try:
                        grads = per_step_parameter_grads(self.cell, *steps)
                    except Exception as error:  # noqa: BLE001 - the loop below is the reference
                        self.batched_contributions = False
                        log.info("%s: per-step parameter contributions step by step (vmap: "
                                 "%s: %s)", type(self.cell).__name__, type(error).__name__,
                                 error)
                        for k, v in counters.items():
                            setattr(self.cell, k, v)
                if grads is None:
                    grads = self.stepped_contributions(inputs, previous, dts, cotangents, t0, t1)
                yield grads
        finally:
            for k, v in counters.items():
                setattr(self.cell, k, v)

    def stepped_contributions(self, inputs: tuple[Tensor, ...], previous: list[State],
                              dts: tuple, cotangents: list[Tensor], t0: int,
                              t1: int) -> list[Tensor]:
        """`cell_contributions`' steps t0 … t1−1 one at a time, with parameters W + q_t."""
        q = {name: torch.zeros(t1 - t0, *p.shape, dtype=p.dtype, device=p.device,
                               requires_grad=True) for name, p in self.cell.named_parameters()}
        step = per_step_parameters(self.cell, q)
        outputs, grad_outputs = [], []
        with torch.enable_grad():
            for t in range(t0, t1):
                outputs += step(inputs[t], previous[t], dts[t], t - t0)
                grad_outputs += [g[t] for g in cotangents]
            grads = torch.autograd.grad(outputs, list(q.values()), grad_outputs,
                                        allow_unused=True)
        return [g if g is not None else torch.zeros_like(q_) for g, q_ in zip(grads, q.values())]

    def unroll(self, u: Tensor, dt: Tensor | None = None, probes: Probes | None = None,
               cell_probes: dict[str, Tensor] | None = None,
               previous_states: list[State] | None = None,
               initial_state: State | None = None,
               last_state: list[State] | None = None) -> Tensor:
        """Run the cell over u: (B, T, encoder_size); return z[0] on the last n_out steps.

        ``probes``: per state, (T, B, hidden) or its chunks (`make_probes`), added as
        z_t ← z_t + p_t. ``cell_probes``: per cell parameter, (T, *shape); step t runs the cell
        with W + q_t. ``previous_states``: a list that receives z_{t−1} (detached) before every
        step t, for the transition Jacobians. ``initial_state``: z_{−1} (default: the cell's
        `init_state`) and ``last_state``, a list that receives z_{T−1}: to continue a pass.

        Steps are split once with `unbind` — indexing u[:, t] inside the loop would make the
        backward quadratic in T (docs/architecture.md, "Speed"). A cell with an input projection
        (`Cell.input_projection`) steps from it, made `PROJECTION_STEPS` steps at a time, unless
        step t runs with W + q_t. With ``checkpoint_steps`` = K > 0, a loop that builds a graph
        keeps only every K-th state and recomputes each segment of K steps (and its projection)
        in the backward pass (`torch.utils.checkpoint`): the same gradients, for activation
        memory of T/K states plus one segment's graph instead of all T steps'.
        """
        B, T = u.shape[:2]
        state = self.cell.init_state(B) if initial_state is None else initial_state
        plain = (probes is None and cell_probes is None and previous_states is None
                 and initial_state is None and last_state is None)
        path = self.plain_path(u) if plain and dt is None else "steps"
        if path == "sequence":
            fast = self.cell.sequence(u, state)
            if fast is not None:
                return fast[0][:, T - self.n_out:]
            if self.hparams.fast_path == "auto":  # no sequence path here: the loop steps
                path = self.stepping_path()
        dts = dt.unbind(1) if dt is not None else (None,) * T
        compiled = plain and self.hparams.compile
        cell_step = self.compiled_step() if compiled else self.cell.step
        step = (per_step_parameters(self.cell, cell_probes) if cell_probes is not None
                else lambda u_t, state, dt_t, t: cell_step(u_t, state, dt_t))
        K = self.hparams.checkpoint_steps if torch.is_grad_enabled() else 0
        # With the cell's input projection the loop reads g = input_projection(u) a chunk of
        # steps at a time (a checkpointed segment's chunk is recomputed with it), and a probed
        # chunk runs as one node where the cell offers `probed_sequence`. u and the probes are
        # split once, as the steps are (the backward of one split, not of T slices).
        project = cell_probes is None and not compiled and self.cell.input_projection is not None
        chunked = (project and (probes is not None or path == "chunks")
                   and self.cell.probed_sequence is not None and not torch.is_autocast_enabled())
        span = K or PROJECTION_STEPS
        # time-major chunks (C, B, ·): each step's g_t is contiguous, and so is a chunk's g
        inputs = u.transpose(0, 1).split(span, 0) if project else u.unbind(1)
        # chunk c → its probe of every state; an unprobed pass in chunks: zeros, stored once
        probe_chunks = (list(zip(*(chunks_of(p, span) for p in probes))) if probes is not None
                        else zero_probe_chunks(state, inputs) if chunked else None)
        probe_steps: dict[int, list[tuple[Tensor, ...]]] = {}

        def state_probes(t: int) -> tuple[Tensor, ...]:
            """Step t's probes. A stepped chunk's are split into steps when the loop reaches it,
            so that in the backward pass the split's node runs right after the chunk's steps
            (autograd runs later-made nodes first) and hands the chunk's gradients to its
            leaves, instead of holding every step's until the end of the pass."""
            c = t // span
            if c not in probe_steps:
                probe_steps[c] = list(zip(*(p.unbind(0) for p in probe_chunks[c])))
            return probe_steps[c][t - c * span]

        def advance(t: int, state: State, stepper, x_t: Tensor, outputs: list[Tensor]) -> State:
            """Step t of the loop: z_t = stepper(x_t, z_{t−1}) (+ p_t), read if n_out asks."""
            # (not again when a checkpointed segment is recomputed in the backward pass)
            if previous_states is not None and len(previous_states) < T:
                previous_states.append(tuple(s.detach() for s in state))
            state = stepper(x_t, state, dts[t], t)
            if probe_chunks is not None:
                state = tuple(s + p for s, p in zip(state, state_probes(t)))
            if t >= T - self.n_out:
                outputs.append(state[0])
            return state

        def projected(g_t: Tensor, state: State, dt_t: Tensor | None, t: int) -> State:
            return self.cell.projected_step(g_t, state, dt_t)

        def run(t0: int, t1: int, *state: Tensor) -> tuple[State, list[Tensor]]:
            """Steps t0 … t1−1 from z_{t0−1} = state: the last state and the read outputs."""
            outputs: list[Tensor] = []
            if not project:
                for t in range(t0, t1):
                    state = advance(t, state, step, inputs[t], outputs)
                return state, outputs
            for c in range(t0 // span, (t1 - 1) // span + 1):  # t0 starts a chunk
                c0 = c * span
                g = self.cell.input_projection(inputs[c])
                if chunked:
                    record = (previous_states if previous_states is not None
                              and len(previous_states) < T else None)
                    first, state = self.cell.probed_sequence(g, state, probe_chunks[c], record)
                    if c0 + first.shape[0] > T - self.n_out:
                        outputs += first.unbind(0)[max(0, T - self.n_out - c0):]
                    continue
                for t, g_t in enumerate(g.unbind(0), start=c0):
                    state = advance(t, state, projected, g_t, outputs)
            return state, outputs

        if K:
            outputs = []
            for t0 in range(0, T, K):
                state, read = checkpoint(run, t0, min(t0 + K, T), *state, use_reentrant=False)
                outputs += read
        else:
            state, outputs = run(0, T, *state)
        if last_state is not None:
            last_state.append(state)
        return torch.stack(outputs, dim=1)

    def compiled_step(self) -> CompiledStep:
        """``cell.step`` compiled by `torch.compile` (`CompiledStep`), made on first use.
        Probed passes never use it (the probes are added between steps, outside)."""
        if self._compiled_step is None:
            self._compiled_step = CompiledStep(self.cell)
        return self._compiled_step

    def plain_path(self, inputs: Tensor) -> str:
        """How an unprobed pass over ``inputs`` (B, T, ·) runs (``model.fast_path``):
        ``"sequence"``, ``"chunks"`` or ``"steps"`` (`Cell.plain_path`)."""
        if self.hparams.fast_path == "auto":
            path = self.cell.plain_path(inputs.shape[1], inputs.device)
            require(path in PLAIN_PATHS, f"{type(self.cell).__name__}.plain_path", path,
                    f"one of {', '.join(PLAIN_PATHS)}")
            return self.stepping_path() if path == "steps" else path
        return "sequence" if self.hparams.fast_path else "steps"

    def stepping_path(self) -> str:
        """How an unprobed pass steps under ``model.fast_path=auto``: ``"steps"``, or with
        checkpointed segments (``checkpoint_steps``) the cell's probed chunks with zero probes,
        where it has them. torch.utils.checkpoint hooks every tensor a step saves, forward and
        backward, where a chunk node saves a few per segment. Segments of 100 (B = 64, H = 128,
        CPU, forward + backward + Adam, medians of 3–30 interleaved steps): the tanh RNN's steps
        against its chunks 220 against 177 ms at T = 1000, 2.57 against 1.81 s at T = 10,000
        (ATen's loop: 2.18 s; stepping without segments 1.44 s); IndRNN's 118 against 92 ms at
        T = 1000 (63 without segments)."""
        if (self.hparams.checkpoint_steps and not self.hparams.compile
                and self.cell.probed_sequence is not None
                and self.cell.input_projection is not None):
            return "chunks"
        return "steps"

    def forward(self, x: Tensor, dt: Tensor | None = None, probes: Probes | None = None,
                param_probes: ParamProbes | None = None) -> Tensor:
        """x (B, T, input_size) → y_hat. Inside `probing`, the probes are made here and the pass
        recorded; ``probes`` / ``param_probes`` given directly run the probed path with them."""
        if self._probing is not None and probes is None and param_probes is None:
            request, passes = self._probing
            probed, probes, param_probes = self.probed_pass(x, request)
            passes.append(probed)
            if param_probes is not None:
                return self.streamed_forward(x, dt, probes, param_probes, probed)
        if param_probes is None:
            if probes is None and dt is None and self.plain_path(x) == "sequence":
                state = self.cell.init_state(x.shape[0])
                z = self.cell.sequence_from_inputs(x, self.encoder, state, self.n_out)
                if z is not None:
                    return self.decoder(z)
            return self.decoder(self.unroll(self.encoder(x), dt, probes))
        T = x.shape[1]
        u = map_over_time(self.encoder, param_probes["encoder"], x)
        z = self.unroll(u, dt, probes, param_probes["cell"])
        # Only the read steps pass through the decoder; its other q_t get a zero gradient.
        read = {name: q[T - self.n_out:] for name, q in param_probes["decoder"].items()}
        return map_over_time(self.decoder, read, z)

    def streamed_forward(self, x: Tensor, dt: Tensor | None, probes: Probes,
                         param_probes: ParamProbes, probed: ProbedPass) -> Tensor:
        """The probed forward pass with the encoder's and decoder's parameter probes, keeping what
        `cell_contributions` needs after the backward pass (the states z_{t−1}, the inputs)."""
        T = x.shape[1]
        u = map_over_time(self.encoder, param_probes["encoder"], x)
        previous: list[State] = []
        z = self.unroll(u, dt, probes, previous_states=previous)
        probed.streamed["cell"] = lambda: self.cell_contributions(u, dt, previous, probes)
        read = {name: q[T - self.n_out:] for name, q in param_probes["decoder"].items()}
        return map_over_time(self.decoder, read, z)

    def loss_fn(self, y_hat: Tensor, y: Tensor) -> Tensor:
        """The batch-mean loss: MSE over (B, n_out, out), or cross-entropy over read steps."""
        if self.hparams.loss == "mse":
            return F.mse_loss(y_hat, y)
        return F.cross_entropy(y_hat.reshape(-1, y_hat.shape[-1]), y.reshape(-1), ignore_index=-100)

    # --- Lightning -----------------------------------------------------------------------------
    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        loss = self.loss_fn(self(batch["x"], batch.get("dt")), batch["y"])
        self.train_loss = loss.detach()
        loss = loss + self.flossing_term(batch)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.write_train_loss()

    def write_train_loss(self) -> None:
        """``train/loss`` (the mean over processes) and ``epoch`` to every logger on every
        ``trainer.log_every_n_steps``-th step, at the step Lightning's own logging would give them.

        Not through ``self.log``: Lightning's bookkeeping for one logged value cost 3–5% of a
        tanh-RNN training step at T = 100 (measured step by step beside a raw PyTorch loop).
        The progress bar shows the loss (`rnnlab.progress.StepProgressBar`); it is not in
        ``trainer.callback_metrics`` (``val/*`` are)."""
        trainer, step = self.trainer, self.global_step
        every = trainer.log_every_n_steps
        if not every or (step + 1) % every or self.train_loss is None:
            return
        loss = trainer.strategy.reduce(self.train_loss, reduce_op="mean")  # every process
        if trainer.is_global_zero:
            metrics = {"train/loss": float(loss), "epoch": trainer.current_epoch}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step)
                logger.save()

    def flossing_term(self, batch: dict[str, Tensor]) -> Tensor | float:
        """weight · `flossing_loss` on the steps ``model.flossing`` picks (logged as
        ``train/flossing_loss``, unweighted), 0 on the others."""
        if not self.flossing.due(self.global_step):
            return 0.0
        loss = flossing_loss(self, batch["x"], self.flossing.k, batch.get("dt"))
        self.log("train/flossing_loss", loss, sync_dist=True)
        return self.flossing.weight * loss

    def on_train_start(self) -> None:
        """Preflossing: ``model.flossing.pre_steps`` Adam steps on `flossing_loss` alone, on the
        training batches, before the first training step. A resumed run (global step > 0) has
        its preflossed parameters in the checkpoint and does not run it again."""
        steps = self.flossing.pre_steps
        if steps == 0 or self.global_step > 0:
            return
        batches = ({k: v.to(self.device) for k, v in batch.items()}
                   for batch in cycled(self.trainer.train_dataloader.dataset))
        lr = self.flossing.lr if self.flossing.lr is not None else self.optimizer_cfg["lr"]
        losses = prefloss(self, batches, self.flossing.k, steps, lr)
        if self.trainer.world_size > 1:  # each process flossed on its own rows: keep rank 0's
            self.load_state_dict(self.trainer.strategy.broadcast(self.state_dict()))
        log.info("preflossing: %d steps, flossing loss %.4g → %.4g", steps, losses[0], losses[-1])

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Tensor], batch_idx: int) -> None:
        # After the backward pass, so a cell's counts include it (e.g. the adjoint's NFE).
        for name, value in self.cell.diagnostics().items():
            self.log(f"cell/{name}", float(value), on_step=True, on_epoch=False)
            self.cell_totals[name] = self.cell_totals.get(name, 0.0) + float(value)

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        y_hat = self(batch["x"], batch.get("dt"))
        self.log("val/loss", self.loss_fn(y_hat, batch["y"]), prog_bar=True, sync_dist=True)
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            for name, value in datamodule.metrics(y_hat, batch["y"]).items():
                self.log(f"val/{name}", value, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None:
            self.log("val/baseline", float(datamodule.baseline), sync_dist=True)
        if not self.trainer.sanity_checking:
            self.last_val_step = self.global_step

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["rnnlab"] = {"last_val_step": self.last_val_step}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.last_val_step = checkpoint.get("rnnlab", {}).get("last_val_step", -1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        kwargs = {k: v for k, v in self.optimizer_cfg.items() if k != "name"}
        optimizer = OPTIMIZERS[self.optimizer_cfg["name"]]
        params = list(self.parameters())
        if fusable(optimizer, kwargs, params):
            kwargs["fused"] = True
        return optimizer(params, **kwargs)


FUSED_DEVICES = ("cpu", "cuda")


def fusable(optimizer: type[torch.optim.Optimizer], kwargs: dict[str, Any],
            params: list[Tensor]) -> bool:
    """Whether ``optimizer`` gets ``fused=True``: it has a fused kernel (Adam, AdamW, SGD), the
    configuration chose neither ``fused`` nor ``foreach``, and every parameter is a real float
    tensor on the CPU or a CUDA device. The fused kernel does the same update in one pass over
    each parameter: 70–90 µs against 230–250 for Adam's per-tensor loop on the benchmark's model."""
    return ("fused" in inspect.signature(optimizer).parameters
            and kwargs.get("fused") is None and kwargs.get("foreach") is None
            and not kwargs.get("differentiable", False)
            and all(p.is_floating_point() and p.device.type in FUSED_DEVICES for p in params))


def chunks_of(probe: Tensor | list[Tensor], span: int) -> list[Tensor]:
    """A state's probe as chunks of ``span`` steps: a (T, B, ·) leaf split once, or the leaves of
    `RecurrentModel.make_probes` as they are when they are of that length."""
    if isinstance(probe, Tensor):
        return list(probe.split(span, 0))
    if all(c.shape[0] == span for c in probe[:-1]) and probe[-1].shape[0] <= span:
        return list(probe)
    return list(torch.cat(probe).split(span, 0))


def zero_probe_chunks(state: State, chunks: list[Tensor]) -> list[tuple[Tensor, ...]]:
    """For an unprobed pass through the cell's probed chunks (`Cell.plain_path` "chunks"): per
    chunk of steps, a zero per state, (C, B, ·), one stored zero expanded and asking for no
    gradient."""
    zero = state[0].new_zeros(())
    return [tuple(zero.expand(chunk.shape[0], *s.shape) for s in state) for chunk in chunks]


def check_optimizer_keys(optimizer: dict[str, Any]) -> None:
    """Every key but ``name`` must be an argument of the chosen torch optimizer."""
    name = optimizer["name"]
    accepted = set(inspect.signature(OPTIMIZERS[name]).parameters) - {"self", "params"}
    unknown = sorted(set(optimizer) - accepted - {"name"})
    if unknown:
        key = f"model.optimizer.{unknown[0]}"
        raise ConfigError(f"{key} is not an argument of torch.optim.{OPTIMIZERS[name].__name__} "
                          f"(it takes {', '.join(sorted(accepted))}); remove it (~{key})")


def check_cell_step(cell: Cell, target: str | None) -> None:
    """One `step` on a tiny probe batch: each returned state (B, hidden_size), floating point.

    A user cell whose `step` returns the wrong shape or dtype would otherwise fail deep inside
    the unroll, the probes or the decoder; here the error names the cell and what was wrong.
    """
    batch = 2
    where = f"cell._target_={target}: {type(cell).__name__}.step"
    try:
        state = cell.init_state(batch)
        p = next(cell.parameters(), None)
        u_t = torch.zeros(batch, cell.input_size,
                          dtype=p.dtype if p is not None else torch.get_default_dtype())
        with torch.no_grad():
            out = cell.step(u_t, state, None)
        cell.diagnostics()  # reset counters (the ODE solver's NFE) so the probe does not count
    except ConfigError:
        raise
    except Exception as error:  # a user's cell can fail any way; report it before training
        raise ConfigError(f"{where} failed on a probe batch u_t ({batch}, {cell.input_size}): "
                          f"{type(error).__name__}: {error}; fix the cell's step") from error
    expected = (batch, cell.hidden_size)
    if not isinstance(out, tuple) or len(out) != len(cell.state_names):
        raise ConfigError(f"{where} must return a tuple of {len(cell.state_names)} tensor(s) "
                          f"({', '.join(cell.state_names)}) as `state_names` says, got "
                          f"{type(out).__name__}"
                          + (f" of {len(out)}" if isinstance(out, (tuple, list)) else ""))
    for name, s in zip(cell.state_names, out):
        if not isinstance(s, Tensor) or tuple(s.shape) != expected:
            got = tuple(s.shape) if isinstance(s, Tensor) else type(s).__name__
            raise ConfigError(f"{where} must return state {name} of shape (B, hidden_size) = "
                              f"{expected}, got {got}")
        if not s.is_floating_point():
            raise ConfigError(f"{where} must return state {name} as a floating-point tensor "
                              f"(gradients flow through it), got dtype {s.dtype}")
