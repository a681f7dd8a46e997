"""GradFlowCallback: the exact per-timestep gradient profile of any recurrent model, as it trains.

    trainer = pl.Trainer(callbacks=[rnnlab.GradFlowCallback("grad_flow", every_n_steps=50)])

It watches every recurrent module of the LightningModule (`rnnlab.watching`: torch.nn's RNN, GRU,
LSTM and their cells, rnnlab cells, rnnlab's own model) or the ``modules`` named. On monitored
steps — step 0 and every ``every_n_steps``-th — that step's forward pass runs the watched modules'
probed path (the same function on the same parameters, step by step, a zero probe on every state),
and after its backward pass the callback turns the probes' gradients into a `rnnlab.records.Record`
per watched module: ‖∂L/∂h_t‖ for every timestep, layer and direction (‖∂L/∂c_t‖ for LSTMs). Other
steps run the model untouched. For rnnlab's `RecurrentModel` the record also holds the per-step
parameter contributions ‖dL/dW⁽ᵗ⁾‖, the transition Jacobians and the recurrent matrix's spectrum;
for it and for each layer and direction of a watched torch.nn RNN, GRU or LSTM, the Lyapunov
spectrum of the backward product (`rnnlab.lyapunov`).

Each record is written to ``<dirpath>/step_<step:07d>.npz`` (rnnlab's model) or
``<dirpath>/<module path>/step_<step:07d>.npz`` (a watched module), and logged through every
Lightning logger of the trainer (`rnnlab.loggers`): scalars at chosen timesteps, the summaries,
figures where a logger takes them. Every step it also measures the gradient norm of each
top-level module (``grad_norm/<module>``) and of all parameters before and after Lightning's
clipping (``grad_norm/total``, ``grad_norm/total_clipped``), applies the non-finite policy
(`rnnlab.nonfinite`) and logs the norms of every ``trainer.log_every_n_steps``-th step and every
monitored step (held, and written `SCALAR_STEPS` steps at a time, each at its own step).

The hooks it relies on, in the order Lightning (2.x, automatic optimization) calls them within one
training step; a monitored step is one `MonitoredStep`, opened at (1) and finished at (5):

    hook                              the callback
    --------------------------------  ----------------------------------------------------------
    setup                             finds the watched modules (errors before training)
    on_train_start                    adapters for the loggers; TensorBoard's custom-scalars layout
    (1) on_train_batch_start          monitored step: opens a MonitoredStep, arms the modules
        training_step                 (the forward pass: probed on a monitored step)
    (2) on_before_backward(loss)      keeps the loss
        backward
    (3) on_after_backward             per-module gradient norms; the non-finite policy on them and
                                      the loss (one host read); disarms; probe gradients, the
                                      norms, the Jacobians and the Lyapunov spectra (the same
                                      weights) become the records
    (4) on_before_optimizer_step      the total gradient norm before clipping
        clipping, optimizer.step
    (5) on_train_batch_end            the norm after clipping; the records are written and logged
    on_exception                      disarms the watched modules; writes what is held
    on_train_end                      writes what is held; the last records' figures

With gradient accumulation, the first micro-batch of a monitored optimizer step is probed.
``profile_dtype=float64`` (rnnlab's model) measures the profile on a float64 copy of the model
instead (same weights, same batch, its own forward and backward pass): training stays on its fast
float32 path, and norms down to ~1e-308 are exact where float32 rounds below ~1e-45 to 0.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from rnnlab import gradflow
from rnnlab.config import ConfigError, require, require_choice, require_int
from rnnlab.figures import heatmap_figure, lyapunov_figure, plt, profile_figure
from rnnlab.loggers import LoggerAdapter, adapters
from rnnlab.lyapunov import lyapunov, mean_over_processes, watched_lyapunov
from rnnlab.model import RecurrentModel
from rnnlab.nonfinite import NonFinitePolicy
from rnnlab.probing import ProbeRequest
from rnnlab.records import Record, load_records, record_files, save_records, watched_modules
from rnnlab.rundir import BackgroundWriter, RunFileError
from rnnlab.watching import Watch

log = logging.getLogger(__name__)

# Values per parameter per timestep on a monitored step with param_contributions: the probe, its
# gradient and the per-step weights in the graph, with allocator slack (measured ≈ 5.2 for an LSTM).
PARAM_PROBE_COPIES = 6
# With profile_dtype=float64, where each field of a record comes from (`Record.sources`).
FLOAT64_SOURCES = {"profiles": "float64_copy", "contributions": "float64_copy",
                   "loss": "float64_copy", "grad_norms": "training_step",
                   "jacobians": "training_step"}
# The Jacobians and the Lyapunov spectrum, by default (``auto``), about every this many training
# steps: on the monitored steps that are multiples of the least multiple of every_n_steps ≥ it.
INSTRUMENT_STEPS = 500
# Records, by default (``auto``), one file per this many training steps at least: packs of
# RECORD_FILE_STEPS // every_n_steps records where every_n_steps ≤ 25 (a file of its own per
# record cost LRU and IndRNN runs monitored every step at T = 100 about a fifth of their speed,
# in the kernel's work of creating the files, not in writing the bytes).
RECORD_FILE_STEPS = 50
# The grad_norm/* scalars of this many logged steps are held and written to the loggers together
# (each at its own step; and at every checkpoint, the end of training and an exception): one
# event each step, made on the step, cost an LRU step at T = 100 4–5% (beside a raw loop).
SCALAR_STEPS = 25
TOTAL_TAGS, CLIPPED_TAGS = ["grad_norm/total"], ["grad_norm/total_clipped"]
MODEL = ""  # the pass name of rnnlab's own model: its records go straight into dirpath


def param_probe_bytes(model: nn.Module, seq_len: int) -> int:
    """Estimated memory of the per-step parameter probes of one monitored step: T copies of the
    encoder's and decoder's parameters, and of the cell's as many as one chunk of its streamed
    contributions holds (`RecurrentModel.cell_contributions`); T copies of all for other models."""
    def nbytes(module: nn.Module) -> int:
        return sum(p.numel() * p.element_size() for p in module.parameters())

    if not isinstance(model, RecurrentModel):
        return PARAM_PROBE_COPIES * seq_len * nbytes(model)
    cell = model.cell
    steps = min(seq_len, model.contribution_chunk_steps())
    return PARAM_PROBE_COPIES * (seq_len * (nbytes(model) - nbytes(cell)) + steps * nbytes(cell))


def memory_bytes(device: torch.device) -> int:
    """The memory of ``device``: the GPU's, or the machine's physical memory."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def size(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


def chosen_timesteps(T: int, timesteps: list[int] | None, count: int) -> list[int]:
    """Explicit ``timesteps`` (negative: from the end), or ``count`` evenly spaced in [0, T)."""
    if timesteps:
        return sorted({t % T for t in timesteps if -T <= t < T})
    if count <= 0:
        return []
    return sorted({int(round(t)) for t in np.linspace(0, T - 1, min(count, T))})


@dataclass
class MonitoredStep:
    """One monitored training step, from its batch's start (1) to its end (5)."""

    step: int
    batch: Any
    loss: Tensor | None = None
    records: dict[str, Record] = field(default_factory=dict)  # pass name → record


@dataclass
class History:
    """The main profile of every record of one watched pass, for the heatmap (log10, float64)."""

    steps: list[int] = field(default_factory=list)
    log10: list[np.ndarray] = field(default_factory=list)


class GradFlowCallback(pl.Callback):
    """Args:
        dirpath: where the records go (a run's ``grad_flow/``).
        every_n_steps: monitor step 0 and every n-th training step.
        modules: the modules to watch (paths in ``named_modules()``, or the modules); default:
            every recurrent module (`rnnlab.watch.find_targets`).
        timesteps: timesteps whose per-timestep values are also logged as scalars
            (``dL_dz/t_<t>``, …; negative = from the end); default none: the whole profiles are
            in the records and TensorBoard's Gradient flow tab.
        num_timesteps: instead of ``timesteps``, this many evenly spaced ones (0: none).
        figure_every_n_records: draw the profile and heatmap figures (images) every n-th
            monitored step, and at the last one; 0 (default): none, the Gradient flow tab draws
            them from the records (the two cost about 0.5 s, measured: more than the probed step
            at T = 100).
        param_contributions: also measure ``dL_dW_<module>`` (T,) on monitored steps (rnnlab's
            model); costs T times the parameter count in memory on those steps.
        jacobian_every_n_steps: measure the transition Jacobians (rnnlab's model) on monitored
            steps that are a multiple of this (0: never); a multiple of ``every_n_steps``.
            ``auto``: the least multiple of ``every_n_steps`` ≥ `INSTRUMENT_STEPS` (500): one
            Jacobian measurement costs about 15 training steps at T = 100, H = 128, and
            amortised over fewer steps it would dominate the run.
        jacobian_iterations: Lanczos steps per Jacobian norm (each one jvp and one vjp of the
            cell over batches of (timestep, sequence) rows, `gradflow.JACOBIAN_ROWS` at most);
            the default 30 is accurate to 1e-4 relative (tested at H = 48 and 128; measured
            1.1e-9 for the GRU at H = 128, where 20 steps give 1.6e-4).
        on_nonfinite: a non-finite loss or gradient ``stop``s training with a FloatingPointError,
            or ``skip``s that optimizer step (`rnnlab.nonfinite`).
        max_skipped_steps: with ``skip``, stop after this many steps in a row were skipped
            (``auto``: 10% of the run's steps, at least 10; None: never).
        lyapunov_every_n_steps: measure the Lyapunov spectrum of the backward product
            (`rnnlab.lyapunov`: rnnlab's model, and each layer and direction of a watched
            torch.nn RNN, GRU or LSTM on the input it was called with) on monitored steps that
            are a multiple of this (0: never); a multiple of ``every_n_steps``; ``auto`` as for
            the Jacobians.
        lyapunov_k: how many exponents (at most the state's size).
        lyapunov_ons_every: re-orthonormalise the k vectors by QR every this many steps.
        lyapunov_sequences: how many of the batch's sequences to measure; null: B // k, at least
            1, so that the k vectors of all of them cost about one training step.
        records_per_file: how many monitored steps' records go into one file: 1, each its own
            ``step_<step>.npz``; n > 1, packs of n (``steps_<first>-<last>.npz``, read as
            records are: `rnnlab.records.load`), held until a pack is full, a checkpoint is
            written, training ends or raises (a SIGKILL loses those held: at most the records
            of steps after the last checkpoint, which a resumed run measures again); ``auto``:
            ``RECORD_FILE_STEPS // every_n_steps`` (50: every step; 1 for every 50 steps).
        profile_dtype: ``float32`` reads the probes of the training step itself (as trained);
            ``float64`` (rnnlab's model) measures the profile (and ``dL_dW``) on a float64 copy
            of the model with the same batch: one more forward and backward, in float64, on
            monitored steps only; the update is unchanged.
        run_info: what configures the run (e.g. ``["cell.gain=0.9"]``), written once at step 0
            for the Gradient flow tab, which names runs by what differs between them; default:
            the Hydra job's overrides when the run is a Hydra job, else nothing.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int = 50,
                 modules: Iterable[str | nn.Module] | None = None,
                 timesteps: list[int] | None = None, num_timesteps: int = 0,
                 figure_every_n_records: int = 0, param_contributions: bool = True,
                 jacobian_every_n_steps: int | str = "auto", jacobian_iterations: int = 30,
                 on_nonfinite: str = "stop", max_skipped_steps: int | str | None = "auto",
                 profile_dtype: str = "float32", run_info: Iterable[str] | None = None,
                 lyapunov_every_n_steps: int | str = "auto", lyapunov_k: int = 32,
                 lyapunov_ons_every: int = 5, lyapunov_sequences: int | None = None,
                 records_per_file: int | str = "auto"):
        self.dirpath = Path(dirpath)
        self.every_n_steps = require_int("monitor.every_n_steps", every_n_steps)
        self.records_per_file = (max(1, RECORD_FILE_STEPS // self.every_n_steps)
                                 if records_per_file == "auto" else
                                 require_int("monitor.records_per_file", records_per_file))
        self.modules = list(modules) if modules is not None else None
        require(timesteps is None or all(isinstance(t, int) for t in timesteps),
                "monitor.timesteps", timesteps, "null or a list of integers")
        self.timesteps = list(timesteps) if timesteps else None
        self.num_timesteps = require_int("monitor.num_timesteps", num_timesteps, minimum=0)
        self.figure_every = require_int("monitor.figure_every_n_records", figure_every_n_records,
                                        minimum=0)
        require(isinstance(param_contributions, bool), "monitor.param_contributions",
                param_contributions, "true or false")
        self.param_contributions = param_contributions

        def monitored_multiple(key: str, value: int | str) -> int:
            """Steps of an instrument that runs on monitored steps: 0 (off) or a multiple;
            ``auto``: the least multiple of every_n_steps ≥ `INSTRUMENT_STEPS`."""
            if value == "auto":
                return -(-INSTRUMENT_STEPS // self.every_n_steps) * self.every_n_steps
            n = require_int(key, value, minimum=0)
            require(n % self.every_n_steps == 0, key, value,
                    f"0 (off) or a multiple of monitor.every_n_steps = {self.every_n_steps}")
            return n

        self.jacobian_every = monitored_multiple("monitor.jacobian_every_n_steps",
                                                 jacobian_every_n_steps)
        self.jacobian_iterations = require_int("monitor.jacobian_iterations", jacobian_iterations)
        self.lyapunov_every = monitored_multiple("monitor.lyapunov_every_n_steps",
                                                 lyapunov_every_n_steps)
        self.lyapunov_k = require_int("monitor.lyapunov_k", lyapunov_k)
        self.lyapunov_ons_every = require_int("monitor.lyapunov_ons_every", lyapunov_ons_every)
        require(lyapunov_sequences is None or (isinstance(lyapunov_sequences, int)
                                               and lyapunov_sequences >= 1),
                "monitor.lyapunov_sequences", lyapunov_sequences, "null or an integer >= 1")
        self.lyapunov_sequences = lyapunov_sequences
        self.policy = NonFinitePolicy(on_nonfinite, max_skipped_steps)
        self.profile_dtype = require_choice("monitor.profile_dtype", profile_dtype,
                                            ("float32", "float64"))
        self.watch: Watch | None = None  # made in setup, from the module
        self.adapters: list[LoggerAdapter] = []
        # the step in progress and its grad_norm/* scalars: (tags, tensor) parts, a later
        # part's tag overriding an earlier one's
        self.step, self.grad_scalars = 0, []
        self.total: Tensor | None = None  # the step's grad_norm/total, before the optimizer
        self.held_scalars: list[tuple[int, list[str], list[Tensor]]] = []  # not yet written
        self.norms_of: tuple[pl.LightningModule, gradflow.GradNorms, list[str]] | None = None
        self.loss: Tensor | None = None  # the step's, from before its backward pass
        self.current: MonitoredStep | None = None  # the monitored step under way, (1) to (5)
        self.last_monitored = -1  # its optimizer step (the first micro-batch is probed)
        self.twin: RecurrentModel | None = None  # the float64 copy, made once
        self.last_records: dict[str, Record] = {}  # the latest, by pass name
        # The latest value of each grad_flow/* summary of rnnlab's model: the Jacobians' and the
        # spectrum's come from fewer steps than the profile's, so the last record may lack them.
        self.summaries: dict[str, float] = {}
        # the latest record with a finite profile (pass name, record), for the non-finite
        # policy's messages (`last_finite`)
        self.last_finite_record: tuple[str, Record] | None = None
        self.histories: dict[str, History] = {}
        self.records_written = 0
        # Records go to disk on a thread of their own (each fsyncs), records_per_file to a file:
        # those not yet in one are held here, by pass name; every checkpoint, the end of
        # training and an exception write them and wait for the writes.
        self.writer = BackgroundWriter("rnnlab-records")
        self.unwritten: dict[str, list[Record]] = {}
        self.packed_warned: set[str] = set()  # passes whose spectrum a PackedSequence prevents
        self.run_info = [str(o) for o in run_info] if run_info is not None else None

    # --- settings that need the model -----------------------------------------------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.watch is not None:
            return
        try:
            self.watch = Watch(pl_module, self.modules, contributions=self.param_contributions)
        except ValueError as error:
            raise ConfigError(f"GradFlowCallback: {error}") from None
        if self.profile_dtype == "float64" and not isinstance(pl_module, RecurrentModel):
            raise ConfigError("monitor.profile_dtype=float64 needs rnnlab's RecurrentModel (it "
                              "rebuilds the model in float64); got "
                              f"{type(pl_module).__name__} (set monitor.profile_dtype=float32)")
        if self.profile_dtype == "float64" and getattr(pl_module.cell, "adjoint", False):
            log.warning(
                "monitor.profile_dtype=float64 with cell.adjoint=true: a record's dL_dz, dL_dW "
                "and loss come from the float64 copy stepping the adjoint interval by interval, "
                "its grad_norm_* from the training step (float32, the whole-sequence adjoint in "
                "segments): they differ up to the solver's tolerance (cell.rtol, cell.atol); each "
                "record names the sources (source_profiles, source_grad_norms). For one "
                "computation, set monitor.profile_dtype=float32")

    def check_memory(self, model: nn.Module, seq_len: int, device: torch.device) -> None:
        """Refuse, before training, per-step parameter probes that cannot fit in memory.

        ``param_contributions`` gives the encoder's and decoder's parameters a (T, *shape) probe
        on monitored steps, and the cell's a chunk of steps at a time: with their gradients and
        the per-step weights W + q_t, about `PARAM_PROBE_COPIES` values per probe entry
        (`param_probe_bytes`; measured: LSTM, H = 128, T = 1000, all parameters probed).
        """
        if not self.param_contributions:
            return
        need = param_probe_bytes(model, seq_len)
        have = memory_bytes(device)
        if need > have / 2:
            count = sum(p.numel() for p in model.parameters())
            raise ConfigError(
                f"monitor.param_contributions=true needs about {size(need)} on monitored "
                f"steps at T = {seq_len} ({count:,} parameters, each with a per-step probe), more "
                f"than half of the {size(have)} on {device.type}; set "
                f"monitor.param_contributions=false (dL_dz and the Jacobians stay exact) or "
                f"shorten task.seq_len")

    # --- checkpointed state: the latest record, of a fixed size ---------------------------------
    # Tensors only, so that checkpoints load with torch.load(weights_only=True). The heatmaps'
    # history is not in it (it would grow with every monitored step): it is on disk, in the
    # records, and read back from there when a run resumes (`restore_histories`).
    def state_dict(self) -> dict:
        self.write_scalars()
        self.write_records()
        self.writer.wait()  # a checkpoint counts only records that are on disk
        record = self.last_record.arrays() if self.last_record is not None else {}  # the model's
        record = {k: v for k, v in record.items() if v.dtype.kind != "U"}  # rows, sources
        return {"last_record": {k: torch.as_tensor(v) for k, v in record.items()},
                "records_written": self.records_written, "summaries": dict(self.summaries)}

    def load_state_dict(self, state: dict) -> None:
        arrays = {k: v.numpy() for k, v in state.get("last_record", {}).items()}
        self.last_records = {MODEL: Record.from_arrays(arrays)} if arrays else {}
        self.records_written = state.get("records_written", 0)
        self.summaries = dict(state.get("summaries", {}))

    def restore_histories(self, step: int) -> None:
        """The heatmaps' history of a run resumed at ``step``: the main profile of every record
        of an earlier step in ``dirpath`` (a resumed run's own copies of them). A record that
        cannot be read is left out with a warning naming it."""
        self.histories = {}
        for name in [MODEL, *watched_modules(self.dirpath)]:
            directory = self.record_dir(name)
            earlier: list[Record] = []
            for path in record_files(directory):
                try:
                    earlier += [r for r in load_records(path) if r.step < step]
                except RunFileError as error:
                    log.warning("heatmap: %s", error)
            earlier.sort(key=lambda record: record.step)  # packs and single files by name
            if earlier:
                with np.errstate(divide="ignore"):
                    self.histories[name] = History([r.step for r in earlier],
                                                   [np.log10(r.main_profile) for r in earlier])

    def grad_norms(self, pl_module: pl.LightningModule) -> gradflow.GradNorms:
        """The model's per-step gradient norms (`gradflow.GradNorms`), made on the first step of
        a fit: its parameters are those the optimizer holds from then on."""
        if self.norms_of is None or self.norms_of[0] is not pl_module:
            norms = gradflow.GradNorms(pl_module)
            tags = [f"grad_norm/{k.removeprefix('grad_norm_')}" for k in norms.keys]
            self.norms_of = (pl_module, norms, tags + TOTAL_TAGS)
        return self.norms_of[1]

    # --- (hooks in the order of the table above) ------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.norms_of = None  # a new fit walks the model's parameters again
        self.adapters = adapters(trainer)
        self.policy.set_run_steps(trainer.estimated_stepping_batches)
        if not trainer.is_global_zero:
            return
        if trainer.global_step > 0:  # resumed
            self.restore_histories(trainer.global_step)
        # A resumed run carries the layout over with its history: a second one at step 0, after
        # later steps, would make TensorBoard drop those steps as orphaned.
        if trainer.global_step == 0:
            layout = custom_scalars_layout(self.watch.targets, bool(self.timesteps
                                                                    or self.num_timesteps))
            overrides = run_overrides(self.run_info)
            for adapter in self.adapters:
                adapter.layout(layout)
                if overrides is not None:
                    adapter.run_info(overrides)
        without = [a.name for a in self.adapters if not a.takes_figures]
        if not self.figure_every:
            log.info("gradient-flow figures are off (monitor.figure_every_n_records=0): "
                     "TensorBoard's Gradient flow tab draws them; every number is in the records "
                     "under %s", self.dirpath)
        elif without:
            where = ", ".join(f"{a.name} ({a.logger.log_dir})" for a in self.adapters
                              if a.takes_figures) or f"PNG files in {self.figure_dir}"
            log.info("%s takes no figures: the gradient-flow figures go to %s; every number they "
                     "show is in the records under %s", ", ".join(without), where, self.dirpath)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        self.step, self.grad_scalars, self.total = step, [], None
        self.current, self.loss = None, None
        if step % self.every_n_steps or step == self.last_monitored:
            return
        self.last_monitored = step
        self.current = MonitoredStep(step, batch)
        if self.profile_dtype == "float32":
            self.watch.start()

    def on_before_backward(self, trainer, pl_module, loss: Tensor) -> None:
        self.loss = loss  # checked with the gradients, after the backward pass
        if self.current is not None:
            self.current.loss = loss.detach()

    def on_after_backward(self, trainer, pl_module) -> None:
        # Tensors, not floats: no host sync until they are written, at the end of the step.
        grad_norms = self.grad_norms(pl_module)
        norms = grad_norms.take()  # each module's, then the total
        self.grad_scalars.append((self.norms_of[2], norms))  # the tags of `take`'s vector
        loss, self.loss = self.loss, None
        loss_finite, gradients_finite = self.policy.finite(trainer, loss, norms)
        current = self.current
        if current is not None:
            self.watch.stop()
            if not loss_finite:  # the forward pass overflowed: no profile to record
                self.current = current = None
            else:
                current.records = self.measure(
                    trainer, pl_module, current, dict(zip(grad_norms.keys, norms.tolist())))
        if not (loss_finite and gradients_finite):
            first = next(iter(current.records.values()), None) if current is not None else None
            self.policy.nonfinite(trainer, pl_module, loss, loss_finite, grad_norms.named(norms),
                                  first.main_profile if first is not None else None,
                                  self.last_finite)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Lightning (2.x, Precision._after_closure) calls this hook, then clips the gradients.
        self.total = total = self.grad_norms(pl_module).total()
        self.grad_scalars.append((TOTAL_TAGS, total))
        if self.current is not None:
            for record in self.current.records.values():
                record.grad_norms["grad_norm_total"] = float(total)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # p.grad still holds the clipped gradient the optimizer used: Lightning zeroes it only
        # in the next step, and torch's optimizers do not write to it.
        if trainer.gradient_clip_val or self.total is None:
            clipped = self.grad_norms(pl_module).total()
        else:  # nothing clipped them: the same gradients as before the optimizer step
            clipped = self.total
        self.grad_scalars.append((CLIPPED_TAGS, clipped))
        self.write_grad_norms(trainer)
        current, self.current = self.current, None
        if current is None or not current.records:
            return
        for record in current.records.values():
            record.grad_norms["grad_norm_total_clipped"] = float(clipped)
        self.last_records = current.records
        scalars = {name: record.scalars() for name, record in current.records.items()}
        if MODEL in scalars:
            self.summaries.update({tag: value for tag, value in scalars[MODEL].items()
                                   if tag.startswith("grad_flow/")})
        name, first = next(iter(current.records.items()))
        if np.isfinite(first.main_profile).all():
            self.last_finite_record = name, first
        if trainer.is_global_zero:
            for name, record in current.records.items():
                held = self.unwritten.setdefault(name, [])
                held.append(record)
                if len(held) >= self.records_per_file:
                    self.write_records(name)
            self.log_records(current.step, current.records, scalars)

    def write_records(self, *names: str) -> None:
        """Write the records held of these passes (default: all), to a file each
        (`save_records`: a pack of several, or one record's own file)."""
        for name in names or list(self.unwritten):
            held = self.unwritten.pop(name, [])
            if held:
                save_records(held, self.record_dir(name), self.writer)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if self.watch is not None:
            self.watch.stop()
        self.current = None
        try:  # the records of the steps before it, on disk; the exception is what is raised
            self.write_scalars()
            self.write_records()
            self.writer.close()
        except Exception as error:
            log.error("could not write a gradient-flow record: %s", error)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.watch is not None:
            self.watch.stop()
        self.write_scalars()
        self.write_records()
        self.writer.close()
        if (trainer.is_global_zero and self.last_records and self.figure_every
                and not self.figures_due()):  # the last records' were not drawn
            self.draw_figures(self.last_records)

    # --- measuring -------------------------------------------------------------------------------
    def measure(self, trainer, pl_module, current: MonitoredStep,
                grad_norms: dict[str, float]) -> dict[str, Record]:
        """The step's records from the probes' gradients (before the optimizer step: the same
        weights), one per watched pass, each with the modules' ``grad_norms``."""
        world = trainer.world_size
        reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if world > 1 else None
        if self.profile_dtype == "float64":
            passes, loss = self.probe_in_float64(pl_module, current.batch)
        else:
            passes, loss = self.watch.passes(), current.loss
        loss_value = None
        if loss is not None:
            loss = loss.double()
            loss_value = float(reduce(loss) / world if reduce else loss)
        records = {}
        for name, probed in passes.items():
            record = Record.from_pass(current.step, probed, reduce, world)
            record.loss, record.grad_norms = loss_value, dict(grad_norms)
            if self.profile_dtype == "float64":
                record.sources = dict(FLOAT64_SOURCES)
            records[name] = record
        del passes
        self.watch.release()  # before the Jacobians and the spectrum, which need the memory
        model = records.get(MODEL)
        if model is not None and isinstance(pl_module, RecurrentModel) and self.jacobian_every \
                and current.step % self.jacobian_every == 0:
            model.jacobians = gradflow.jacobians(pl_module, current.batch,
                                                 self.jacobian_iterations)
            if reduce:  # the largest over the global batch
                largest = trainer.strategy.reduce(torch.from_numpy(model.jacobians.jacobian_norm),
                                                  reduce_op="max")
                model.jacobians = gradflow.jacobian_summary(largest.numpy())
            model.spectrum = gradflow.recurrent_spectrum(pl_module.cell)
        if self.lyapunov_every and current.step % self.lyapunov_every == 0:
            self.measure_lyapunov(trainer, pl_module, current, records)
        self.watch.release(calls=True)
        return records

    def measure_lyapunov(self, trainer, pl_module, current: MonitoredStep,
                         records: dict[str, Record]) -> None:
        """The Lyapunov spectrum of rnnlab's model and of every watched torch.nn RNN, GRU and
        LSTM, on the trajectory of this step's batch (the module's own input, as called); under
        data parallelism, of the global batch (`rnnlab.lyapunov.mean_over_processes`)."""
        sections = {}
        model = records.get(MODEL)
        if model is not None and isinstance(pl_module, RecurrentModel):
            sequences = self.sequences(current.batch["x"].shape[0])
            sections[MODEL] = lyapunov(pl_module, current.batch, self.lyapunov_k,
                                       self.lyapunov_ons_every, sequences,
                                       last_norm=float(model.main_profile[-1]))
        for name, call in self.watch.module_calls().items():
            if isinstance(call.input, PackedSequence):
                if name not in self.packed_warned:
                    self.packed_warned.add(name)
                    log.warning("%s is called with a PackedSequence: its Lyapunov spectrum is "
                                "not measured (its profiles are); pass a padded batch to "
                                "measure it, or set monitor.lyapunov_every_n_steps=0", name)
                continue
            x = call.input
            batch_size = 1 if x.dim() == 2 else x.shape[0 if call.module.batch_first else 1]
            sections[name] = watched_lyapunov(call.module, x, call.hx,
                                              records[name].main_profile, self.lyapunov_k,
                                              self.lyapunov_ons_every, self.sequences(batch_size))

        def reduce(values: np.ndarray, op: str) -> np.ndarray:
            # a copy: the all-reduce is in place, and as_tensor would share the array's memory
            tensor = torch.tensor(values, dtype=torch.float64, device=pl_module.device)
            return trainer.strategy.reduce(tensor, reduce_op=op).cpu().numpy()

        world = trainer.world_size
        for name, section in sections.items():
            records[name].lyapunov = (mean_over_processes(section, reduce, world) if world > 1
                                      else section)

    def sequences(self, batch_size: int) -> int:
        """How many of a batch's sequences the spectrum measures: monitor.lyapunov_sequences,
        or batch_size // lyapunov_k (at least 1), about the work of one training step."""
        return self.lyapunov_sequences or max(1, batch_size // self.lyapunov_k)

    def probe_in_float64(self, pl_module: RecurrentModel, batch: dict):
        """The probed pass of a float64 copy of ``pl_module`` (same weights, same batch), and its
        loss. The copy is built once from the model's hyperparameters (under a forked RNG, so its
        init draws nothing from the training stream) and refreshed from the state dict each call.
        """
        if self.twin is None:
            with torch.random.fork_rng(devices=[]):
                self.twin = type(pl_module)(**pl_module.hparams)
            self.twin.to(device=pl_module.device, dtype=torch.float64)
        twin = self.twin
        twin.load_state_dict(pl_module.state_dict())
        twin.train(pl_module.training)
        batch = {k: v.double() if torch.is_floating_point(v) else v for k, v in batch.items()}
        request = ProbeRequest(contributions=self.param_contributions)
        with torch.enable_grad(), twin.probing(request) as passes:
            loss = twin.loss_fn(twin(batch["x"], batch.get("dt")), batch["y"])
        loss.backward(inputs=passes[0].leaves())  # the probes only: the copy's .grad untouched
        twin.cell.diagnostics()  # the copy's solver work is not the training step's
        return {MODEL: passes[0]}, loss.detach()

    @property
    def last_record(self) -> Record | None:
        """rnnlab's model's latest record (its summaries are the run's final metrics)."""
        return self.last_records.get(MODEL)

    def record_dir(self, name: str) -> Path:
        return self.dirpath / name if name else self.dirpath

    @property
    def figure_dir(self) -> Path:
        return self.dirpath / "figures"

    # --- logging ---------------------------------------------------------------------------------
    def write_grad_norms(self, trainer: pl.Trainer) -> None:
        """The step's ``grad_norm/*`` to the loggers, at the step the records carry, on every
        ``trainer.log_every_n_steps``-th step and every monitored one: held as tensors (no host
        sync) and written `SCALAR_STEPS` steps at a time (`write_scalars`). Not through
        ``self.log``: Lightning's per-call bookkeeping cost about 0.25 ms per scalar (five a
        step), measured, and these feed no checkpoint, early stopping or progress bar."""
        step = self.step
        every = trainer.log_every_n_steps
        if not trainer.is_global_zero or not every or not self.grad_scalars or not (
                (step + 1) % every == 0 or self.current is not None):
            return
        self.held_scalars.append((step, [tag for tags, _ in self.grad_scalars for tag in tags],
                                  [values for _, values in self.grad_scalars]))
        if len(self.held_scalars) >= SCALAR_STEPS:
            self.write_scalars()

    def write_scalars(self) -> None:
        """Write the held ``grad_norm/*`` scalars, each step's at its step (one host read)."""
        held, self.held_scalars = self.held_scalars, []
        if not held:
            return
        values = torch.cat([v.reshape(-1) for _, _, parts in held for v in parts]).tolist()
        start = 0
        for step, tags, _ in held:
            metrics = dict(zip(tags, values[start:start + len(tags)]))
            start += len(tags)
            for adapter in self.adapters:
                adapter.scalars(metrics, step)

    @property
    def last_finite(self) -> str:
        """The latest finite profile, for the non-finite policy's messages: its step, summary and
        record's directory."""
        if self.last_finite_record is None:
            return "none yet (no monitored step finished)"
        name, record = self.last_finite_record
        summary = record.summary
        return (f"step {record.step}, decay_rate {np.ravel(summary.decay_rate)[0]:.4g}, "
                f"log10_first_last {np.ravel(summary.log10_first_last)[0]:.4g}, its record in "
                f"{self.record_dir(name)}")

    def log_records(self, step: int, records: dict[str, Record],
                    scalars: dict[str, dict[str, float]]) -> None:
        """``scalars``: each record's own (`Record.scalars`), made once for the summaries too."""
        metrics: dict[str, float] = {}
        for name, record in records.items():
            metrics.update(record_scalars(name, record, self.timesteps, self.num_timesteps,
                                          scalars[name]))
            history = self.histories.setdefault(name, History())
            history.steps.append(step)
            with np.errstate(divide="ignore"):
                history.log10.append(np.log10(record.main_profile))
        for adapter in self.adapters:
            adapter.scalars(metrics, step)
            for name, record in records.items():
                adapter.record(name, record)
        self.records_written += 1
        if self.figures_due():
            self.draw_figures(records)

    def figures_due(self) -> bool:
        """Whether the latest record is one whose figures are drawn (every n-th, from the first)."""
        return bool(self.figure_every) and (self.records_written - 1) % self.figure_every == 0

    def draw_figures(self, records: dict[str, Record]) -> None:
        """The profile and heatmap of each watched pass, to every logger that takes figures (PNG
        files in ``figure_dir`` if none does). One that cannot be drawn is a warning, not the end
        of the run: the record on disk holds every number it shows."""
        takers = [a for a in self.adapters if a.takes_figures]
        for name, record in records.items():
            prefix = f"grad_flow/{name}/" if name else "grad_flow/"
            history = self.histories.get(name, History())
            open_before = set(plt.get_fignums())
            try:
                figures = {f"{prefix}profile": profile_figure(record, record.step),
                           f"{prefix}heatmap": heatmap_figure(history.steps, history.log10,
                                                              record.rows)}
                if record.lyapunov is not None:
                    figures[f"{prefix}lyapunov"] = lyapunov_figure(record)
                for tag, figure in figures.items():
                    for adapter in takers:
                        adapter.figure(tag, figure, record.step)
                    if not takers:
                        path = self.figure_dir / f"{tag.replace('/', '_')}_{record.step:07d}.png"
                        path.parent.mkdir(parents=True, exist_ok=True)
                        figure.savefig(path)
            except Exception as error:  # matplotlib on data it cannot lay out
                log.warning("grad_flow figures of step %d not drawn (%s: %s); its record in %s "
                            "holds their values", record.step, type(error).__name__, error,
                            self.record_dir(name))
            finally:
                for number in set(plt.get_fignums()) - open_before:
                    plt.close(number)


def record_scalars(name: str, record: Record, timesteps: list[int] | None,
                   count: int, scalars: dict[str, float] | None = None) -> dict[str, float]:
    """A record's scalars for the loggers: its summaries and sections (``scalars``, its
    `Record.scalars` where already made), and its per-timestep arrays at the chosen timesteps
    (``<key>/t_<t>``; a watched module's under its path and row)."""
    if not name:
        metrics = dict(record.scalars() if scalars is None else scalars)
        for key, values in record.per_timestep().items():
            for t in chosen_timesteps(len(values), timesteps, count):
                metrics[f"{key}/t_{t:04d}"] = float(values[t])
        return metrics
    metrics = {}
    summary = record.summary
    for i, row in enumerate(record.rows or ("",)):
        where = f"{name}/{row}" if row else name
        for key in ("log10_first_last", "decay_rate", "horizon"):
            metrics[f"grad_flow/{where}/{key}"] = float(np.ravel(getattr(summary, key))[i])
        if record.lyapunov is not None:
            metrics.update(record.lyapunov.row_scalars(i, where))
        for key, values in record.profiles.items():
            row_values = np.atleast_2d(values)[i]
            tag = f"{name}/{key}/{row}" if row else f"{name}/{key}"
            for t in chosen_timesteps(len(row_values), timesteps, count):
                metrics[f"{tag}/t_{t:04d}"] = float(row_values[t])
    return metrics


def run_overrides(given: list[str] | None) -> list[str] | None:
    """What configures the run: ``given``, else the Hydra job's overrides, else None."""
    from hydra.core.hydra_config import HydraConfig

    if given is not None:
        return given
    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    return None


def custom_scalars_layout(targets, per_timestep: bool = True) -> dict:
    """TensorBoard custom-scalars layout: the summaries over training, and each instrument's
    chosen timesteps on one chart (``per_timestep``: when timesteps are chosen)."""
    from rnnlab.cells.base import state_keys

    charts: dict[str, list] = {}
    gradient_norms = {
        "all parameters, before and after clipping":
            ["Multiline", [r"^grad_norm/total$", r"^grad_norm/total_clipped$"]],
    }
    for target in targets:
        module = target.module
        if isinstance(module, RecurrentModel):
            names = module.cell.state_names
            for key in state_keys(names) if per_timestep else ():
                charts[f"||dL/d{key.removeprefix('dL_d')}_t|| at the chosen t"] = [
                    "Multiline", [rf"^{key}/t_\d+$"]]
            for m, _ in module.named_children() if per_timestep else ():
                charts[f"||dL/dW(t)|| of the {m} at the chosen t"] = [
                    "Multiline", [rf"^dL_dW_{m}/t_\d+$"]]
            if per_timestep:
                charts["||dz_t/dz_(t-1)|| at the chosen t"] = [
                    "Multiline", [r"^jacobian_norm/t_\d+$"]]
            charts["decay rate per step: measured, predicted by the Lyapunov spectrum, and "
                   "allowed by the Jacobians"] = [
                "Multiline", [r"^grad_flow/decay_rate$", r"^grad_flow/predicted_decay_rate$",
                              r"^grad_flow/jacobian_rate$"]]
            charts["Lyapunov exponents of the backward product (log10 per step)"] = [
                "Multiline", [r"^lyapunov/lambda_\d+$"]]
            charts["log10 ||dL/dz_0|| / ||dL/dz_(T-1)||"] = [
                "Multiline", [r"^grad_flow/log10_first_last$"]]
            charts["horizon: steps back within 1e-3 of the largest norm"] = [
                "Multiline", [r"^grad_flow/horizon$"]]
            if hasattr(module.cell, "recurrent_weight"):
                charts["recurrent matrix W"] = ["Multiline", [r"^recurrent/"]]
            gradient_norms["per module"] = [
                "Multiline", [rf"^grad_norm/({'|'.join(n for n, _ in module.named_children())})$"]]
        else:
            path = target.path.replace(".", r"\.")
            charts[f"{target.path}: decay rate per step, measured and predicted by the "
                   "Lyapunov spectrum, each layer and direction"] = [
                "Multiline", [rf"^grad_flow/{path}/[^/]+/decay_rate$",
                              rf"^grad_flow/{path}/[^/]+/predicted_decay_rate$"]]
            charts[f"{target.path}: Lyapunov exponents (log10 per step), each layer and "
                   "direction"] = ["Multiline", [rf"^lyapunov/{path}/[^/]+/lambda_\d+$"]]
            charts[f"{target.path}: log10 first/last, each layer and direction"] = [
                "Multiline", [rf"^grad_flow/{path}/[^/]+/log10_first_last$"]]
            charts[f"{target.path}: horizon, each layer and direction"] = [
                "Multiline", [rf"^grad_flow/{path}/[^/]+/horizon$"]]
    return {"gradient flow": charts, "gradient norms": gradient_norms}

