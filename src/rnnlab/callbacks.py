"""GradFlowMonitor: records the exact per-timestep gradient profile during training, and its causes.

Every ``every_n_steps`` training steps (and at step 0) the model runs its probed path for that one
step; after the backward pass the monitor reads the probes' gradients, writes the lossless
``grad_flow/step_<step:07d>.npz`` record, and logs to TensorBoard (tags in the README):

- ``dL_dz/t_<t>`` (and ``dL_dc/t_<t>`` for the LSTM): scalars at a few chosen timesteps;
- ``dL_dW_<module>/t_<t>``: the per-step parameter contributions ||dL/dW⁽ᵗ⁾|| of encoder, cell
  and decoder at the same timesteps (``param_contributions``);
- ``jacobian_norm/t_<t>``, ``grad_flow/jacobian_rate`` and, for a cell with a recurrent matrix,
  ``recurrent/spectral_norm`` and ``recurrent/spectral_radius`` (every ``jacobian_every_n_steps``);
- ``grad_flow/log10_first_last``, ``grad_flow/decay_rate``, ``grad_flow/horizon``;
- images ``grad_flow/profile`` (log scale, with the Jacobian bound) and ``grad_flow/heatmap``.

Every step: the parameter-gradient norm per module (``grad_norm/encoder|cell|decoder``) and of
all parameters before and after Lightning's gradient clipping (``grad_norm/total``,
``grad_norm/total_clipped``). A custom-scalars layout groups each instrument's timesteps on one
chart.

``profile_dtype=float64`` measures the profile on a float64 copy of the model instead (same
weights, same batch, its own forward and backward pass): training stays on its fast float32 path,
and norms down to ~1e-308 are exact where float32 rounds everything below ~1e-45 to 0.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import TensorBoardLogger

from rnnlab import gradflow
from rnnlab.config import ConfigError, require, require_choice, require_int
from rnnlab.figures import heatmap_figure, plt, profile_figure
from rnnlab.model import MODULES, offending_timesteps

log = logging.getLogger(__name__)

# Values per parameter per timestep on a monitored step with param_contributions: the probe, its
# gradient and the per-step weights in the graph, with allocator slack (measured ≈ 5.2 for an LSTM).
PARAM_PROBE_COPIES = 6


def param_probe_bytes(model: torch.nn.Module, seq_len: int) -> int:
    """Estimated memory of the per-step parameter probes of one monitored step."""
    return PARAM_PROBE_COPIES * seq_len * sum(p.numel() * p.element_size()
                                              for p in model.parameters())


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
    return sorted({int(round(t)) for t in np.linspace(0, T - 1, min(count, T))})


def tensorboard_writer(trainer):
    return next((lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)),
                None)


class GradFlowMonitor(pl.Callback):
    """Args:
        dirpath: where the ``step_*.npz`` records go (the run's ``grad_flow/``).
        every_n_steps: monitor step 0 and every n-th training step.
        timesteps: timesteps logged as TensorBoard scalars (negative = from the end); default
            ``num_timesteps`` evenly spaced.
        num_timesteps: how many evenly spaced timesteps when ``timesteps`` is not given.
        figure_every_n_records: draw the profile and heatmap images every n-th monitored step,
            and at the last one (the two cost about 0.5 s, measured: more than the probed step at
            T = 100; the records and scalars are always written).
        param_contributions: also measure ``dL_dW_<module>`` (T,) on monitored steps; costs T
            times the parameter count in memory on those steps.
        jacobian_every_n_steps: measure the transition Jacobians on monitored steps that are a
            multiple of this (0: never); a multiple of ``every_n_steps``.
        jacobian_iterations: power iterations per Jacobian (each one jvp and one vjp of the cell
            over batches of (timestep, sequence) rows, `gradflow.JACOBIAN_ROWS` at most).
        on_nonfinite: a non-finite loss or gradient ``stop``s training with a FloatingPointError,
            or ``skip``s that optimizer step (counted as ``train/skipped_steps``); either way the
            message names the step, the last finite profile and the offending timesteps.
        profile_dtype: ``float32`` reads the probes of the training step itself (as trained);
            ``float64`` trains the monitored step on the fast path too and measures the profile
            (and ``dL_dW``) on a float64 copy of the model with the same batch: one more forward
            and backward, in float64, on monitored steps only; the update is unchanged.
    """

    def __init__(self, dirpath: str, every_n_steps: int = 50, timesteps: list[int] | None = None,
                 num_timesteps: int = 5, figure_every_n_records: int = 10,
                 param_contributions: bool = True, jacobian_every_n_steps: int = 50,
                 jacobian_iterations: int = 10, on_nonfinite: str = "stop",
                 profile_dtype: str = "float32"):
        self.dirpath = Path(dirpath)
        self.every_n_steps = require_int("monitor.every_n_steps", every_n_steps)
        require(timesteps is None or all(isinstance(t, int) for t in timesteps),
                "monitor.timesteps", timesteps, "null or a list of integers")
        self.timesteps = list(timesteps) if timesteps else None
        self.num_timesteps = require_int("monitor.num_timesteps", num_timesteps)
        self.figure_every = require_int("monitor.figure_every_n_records", figure_every_n_records)
        require(isinstance(param_contributions, bool), "monitor.param_contributions",
                param_contributions, "true or false")
        self.param_contributions = param_contributions
        self.jacobian_every = require_int("monitor.jacobian_every_n_steps",
                                          jacobian_every_n_steps, minimum=0)
        require(self.jacobian_every % self.every_n_steps == 0, "monitor.jacobian_every_n_steps",
                jacobian_every_n_steps,
                f"0 (off) or a multiple of monitor.every_n_steps = {self.every_n_steps}")
        self.jacobian_iterations = require_int("monitor.jacobian_iterations", jacobian_iterations)
        self.on_nonfinite = require_choice("monitor.on_nonfinite", on_nonfinite, ("stop", "skip"))
        self.profile_dtype = require_choice("monitor.profile_dtype", profile_dtype,
                                            ("float32", "float64"))
        self.twin = None  # the float64 copy of the model (profile_dtype=float64), made once
        self.profile_batch: dict | None = None  # the batch of a monitored step, for the copy
        self.jacobian_batch: dict | None = None  # the batch of a step that measures Jacobians
        self.pending: tuple[int, dict] | None = None  # a record waiting for the clipped norm
        self.pre_clip_norm = math.nan
        self.last_record: dict | None = None  # the latest record, for the run's final metrics
        self.history_steps: list[int] = []
        self.history_log10: list[np.ndarray] = []

    def check_memory(self, model: torch.nn.Module, seq_len: int, device: torch.device) -> None:
        """Refuse, before training, per-step parameter probes that cannot fit in memory.

        ``param_contributions`` gives every parameter a (T, *shape) probe on monitored steps: with
        its gradient and the per-step weights W + q_t the graph keeps, about
        `PARAM_PROBE_COPIES` × T × (parameter count) values (measured: LSTM, H = 128, T = 1000).
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

    # --- checkpointed state: the heatmap's history and the latest record ----------------------
    # Tensors only, so that checkpoints load with torch.load(weights_only=True).
    def state_dict(self) -> dict:
        record = self.last_record or {}
        return {"history_steps": list(self.history_steps),
                "history_log10": [torch.from_numpy(np.asarray(r)) for r in self.history_log10],
                "last_record": {k: torch.as_tensor(np.asarray(v)) for k, v in record.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.history_steps = list(state["history_steps"])
        self.history_log10 = [r.numpy() for r in state["history_log10"]]
        record = {k: v.numpy() if v.dim() else v.item() for k, v in state["last_record"].items()}
        self.last_record = record or None

    # --- hooks ---------------------------------------------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.on_nonfinite = self.on_nonfinite
        writer = tensorboard_writer(trainer)
        # A resumed run carries the layout over with its history: a second one at step 0, after
        # later steps, would make TensorBoard drop those steps as orphaned.
        if writer is not None and trainer.is_global_zero and trainer.global_step == 0:
            writer.add_custom_scalars(custom_scalars_layout(pl_module.cell.state_names))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        monitored = step % self.every_n_steps == 0
        in_float64 = self.profile_dtype == "float64"
        pl_module.probe_next_step = monitored and not in_float64
        pl_module.probe_parameters = pl_module.probe_next_step and self.param_contributions
        self.profile_batch = batch if monitored and in_float64 else None
        jacobian = monitored and self.jacobian_every > 0 and step % self.jacobian_every == 0
        self.jacobian_batch = batch if jacobian else None
        self.pre_clip_norm = math.nan

    def on_after_backward(self, trainer, pl_module) -> None:
        # Tensors, not floats: logging them costs no host sync; Lightning reads them when it writes.
        norms = gradflow.module_grad_norm_tensors(pl_module)
        pl_module.log_dict({f"grad_norm/{k.removeprefix('grad_norm_')}": v
                            for k, v in norms.items()}, on_step=True, on_epoch=False)
        if self.profile_batch is not None:
            self.probe_in_float64(pl_module, self.profile_batch)
            self.profile_batch = None
        record = self.probed_record(trainer, pl_module, norms)
        # One host read per step: the non-finite policy has to decide before the optimizer runs.
        if not bool(torch.isfinite(torch.stack(list(norms.values()))).all()):
            # The loss was finite (training_step checks it), so the backward pass overflowed.
            named = ", ".join(f"{k.removeprefix('grad_norm_')} {float(v):.3g}"
                              for k, v in norms.items())
            pl_module.nonfinite(f"non-finite gradients (norms: {named}) with a finite loss",
                                offending_timesteps(record["dL_dz"] if record else None))
            for p in pl_module.parameters():  # the optimizer leaves a parameter without grad
                p.grad = None
        if record is not None:
            self.pending = (trainer.global_step, record)

    def probed_record(self, trainer, pl_module, norms: dict) -> dict | None:
        """This step's gradient-flow record from the probes' gradients; None if not monitored."""
        if pl_module.probes is None:
            return None
        # Parameter gradients are already averaged over processes by DDP; probes are not.
        world = trainer.world_size
        total = (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if world > 1 else None
        record = gradflow.probe_profile(pl_module.cell.state_names,
                                        tuple(p.grad for p in pl_module.probes), total, world)
        if pl_module.param_probes is not None:
            grads = {m: {n: q.grad for n, q in qs.items()}
                     for m, qs in pl_module.param_probes.items()}
            record.update(gradflow.param_contribution_norms(grads, total, world))
        record.update({k: float(v) for k, v in norms.items()})
        loss = pl_module.probed_loss.double()
        record["loss"] = float(total(loss) / world if total else loss)
        pl_module.probes = pl_module.param_probes = pl_module.probed_loss = None
        record.update(gradflow.summarize(record["dL_dz"]))
        if self.jacobian_batch is not None:  # before the optimizer step: the same weights
            jacobian = gradflow.jacobians(pl_module, self.jacobian_batch,
                                          self.jacobian_iterations)
            if total:  # the largest over the global batch
                largest = trainer.strategy.reduce(torch.from_numpy(jacobian["jacobian_norm"]),
                                                  reduce_op="max")
                jacobian.update(gradflow.jacobian_summary(largest.numpy()))
            record.update(jacobian)
            self.jacobian_batch = None
        return record

    def probe_in_float64(self, pl_module, batch: dict) -> None:
        """Run the probed path on a float64 copy of ``pl_module`` (same weights, same batch) and
        leave its probes, and loss, where the training step's probes would be.

        The copy is built once from the model's hyperparameters (under a forked RNG, so its init
        draws nothing from the training stream) and refreshed from the state dict on each call.
        """
        if self.twin is None:
            with torch.random.fork_rng(devices=[]):
                self.twin = type(pl_module)(**pl_module.hparams)
            self.twin.to(device=pl_module.device, dtype=torch.float64)
        twin = self.twin
        twin.load_state_dict(pl_module.state_dict())
        twin.train(pl_module.training)
        batch = {k: v.double() if torch.is_floating_point(v) else v for k, v in batch.items()}
        x = batch["x"]
        probes = twin.make_probes(x.shape[0], x.shape[1])
        param_probes = twin.make_param_probes(x.shape[1]) if self.param_contributions else None
        with torch.enable_grad():
            loss = twin.loss_fn(twin(x, batch.get("dt"), probes, param_probes), batch["y"])
            leaves = [*probes, *(q for qs in (param_probes or {}).values() for q in qs.values())]
            loss.backward(inputs=leaves)  # the probes only: the copy's .grad stay untouched
        twin.cell.diagnostics()  # the copy's solver work is not the training step's
        pl_module.probes, pl_module.param_probes = probes, param_probes
        pl_module.probed_loss = loss.detach()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Lightning (2.x, Precision._after_closure) calls this hook, then clips the gradients.
        self.pre_clip_norm = gradflow.total_grad_norm(pl_module)
        pl_module.log("grad_norm/total", self.pre_clip_norm, on_step=True, on_epoch=False)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        # p.grad still holds the clipped gradient the optimizer used: Lightning zeroes it only
        # in the next step, and torch's optimizers do not write to it.
        clipped = gradflow.total_grad_norm(pl_module)
        pl_module.log("grad_norm/total_clipped", clipped, on_step=True, on_epoch=False)
        if self.pending is None:
            return
        step, record = self.pending
        self.pending = None
        record["grad_norm_total"] = float(self.pre_clip_norm)
        record["grad_norm_total_clipped"] = float(clipped)
        self.last_record = record
        if np.isfinite(record["dL_dz"]).all():
            pl_module.last_finite_profile = (
                f"step {step}, decay_rate {record['decay_rate']:.4g}, log10_first_last "
                f"{record['log10_first_last']:.4g}, record "
                f"{gradflow.record_path(self.dirpath, step)}")
        if trainer.is_global_zero:
            gradflow.save(self.dirpath, step, record)
            self.log_tensorboard(trainer, step, record)

    def on_train_end(self, trainer, pl_module) -> None:
        pl_module.probe_next_step = pl_module.probe_parameters = False
        writer = tensorboard_writer(trainer)
        if (writer is not None and trainer.is_global_zero and self.last_record
                and not self.figures_due()):  # the last record's were not drawn
            self.draw_figures(writer, self.history_steps[-1], self.last_record)

    # --- TensorBoard ---------------------------------------------------------------------------
    def log_tensorboard(self, trainer, step: int, record: dict) -> None:
        writer = tensorboard_writer(trainer)
        self.history_steps.append(step)
        with np.errstate(divide="ignore"):
            self.history_log10.append(np.log10(record["dL_dz"]))
        if writer is None:
            return
        T = len(record["dL_dz"])
        per_step = [k for k in record if k.startswith("dL_d") or k == "jacobian_norm"]
        for key in per_step:
            for t in chosen_timesteps(T, self.timesteps, self.num_timesteps):
                writer.add_scalar(f"{key}/t_{t:04d}", record[key][t], step)
        for key in ("log10_first_last", "decay_rate", "horizon", "jacobian_rate"):
            if key in record:
                writer.add_scalar(f"grad_flow/{key}", record[key], step)
        for key in ("spectral_norm", "spectral_radius"):
            if f"recurrent_{key}" in record:
                writer.add_scalar(f"recurrent/{key}", record[f"recurrent_{key}"], step)
        if self.figures_due():
            self.draw_figures(writer, step, record)

    def figures_due(self) -> bool:
        """Whether the latest record is one whose figures are drawn (every n-th, from the first)."""
        return (len(self.history_steps) - 1) % self.figure_every == 0

    def draw_figures(self, writer, step: int, record: dict) -> None:
        """The two images. One that cannot be drawn is a warning, not the end of the run: the
        record on disk holds every number the images show."""
        open_before = set(plt.get_fignums())
        try:
            writer.add_figure("grad_flow/profile", profile_figure(record, step), step)
            writer.add_figure("grad_flow/heatmap",
                              heatmap_figure(self.history_steps, self.history_log10), step)
        except Exception as error:  # matplotlib on data it cannot lay out
            for number in set(plt.get_fignums()) - open_before:
                plt.close(number)
            log.warning("grad_flow figures of step %d not drawn (%s: %s); the record %s holds "
                        "their values", step, type(error).__name__, error,
                        gradflow.record_path(self.dirpath, step))


def custom_scalars_layout(state_names: tuple[str, ...]) -> dict:
    """TensorBoard custom-scalars layout: each instrument's chosen timesteps on one chart."""
    profiles = {f"||dL/d{key.removeprefix('dL_d')}_t|| at the chosen t":
                ["Multiline", [rf"^{key}/t_\d+$"]] for key in gradflow.state_keys(state_names)}
    contributions = {f"||dL/dW(t)|| of the {m} at the chosen t":
                     ["Multiline", [rf"^dL_dW_{m}/t_\d+$"]] for m in MODULES}
    return {
        "gradient flow": {
            **profiles,
            **contributions,
            "||dz_t/dz_(t-1)|| at the chosen t": ["Multiline", [r"^jacobian_norm/t_\d+$"]],
            "decay rate per step: measured, and allowed by the Jacobians":
                ["Multiline", [r"^grad_flow/decay_rate$", r"^grad_flow/jacobian_rate$"]],
            "recurrent matrix W": ["Multiline", [r"^recurrent/"]],
        },
        "gradient norms": {
            "per module": ["Multiline", [r"^grad_norm/(encoder|cell|decoder)$"]],
            "all parameters, before and after clipping":
                ["Multiline", [r"^grad_norm/total$", r"^grad_norm/total_clipped$"]],
        },
    }
