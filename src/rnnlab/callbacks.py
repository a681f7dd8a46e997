"""GradFlowMonitor: records the exact per-timestep gradient profile during training.

Every ``every_n_steps`` training steps (and at step 0) the model runs its probed path for that one
step; after the backward pass the monitor reads the probes' gradients, writes the lossless
``grad_flow/step_<step:07d>.npz`` record, and logs to TensorBoard (tags in the README):

- ``dL_dz/t_<t>`` (and ``dL_dc/t_<t>`` for the LSTM): scalars at a few chosen timesteps;
- ``grad_flow/log10_first_last``, ``grad_flow/decay_rate``, ``grad_flow/horizon``;
- images ``grad_flow/profile`` (log scale) and ``grad_flow/heatmap`` (training step × t).

Parameter-gradient norms per module (``grad_norm/encoder|cell|decoder``) are logged every step.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
from pytorch_lightning.loggers import TensorBoardLogger  # noqa: E402

from rnnlab import gradflow  # noqa: E402
from rnnlab.config import require, require_int  # noqa: E402


def chosen_timesteps(T: int, timesteps: list[int] | None, count: int) -> list[int]:
    """Explicit ``timesteps`` (negative: from the end), or ``count`` evenly spaced in [0, T)."""
    if timesteps:
        return sorted({t % T for t in timesteps if -T <= t < T})
    return sorted({int(round(t)) for t in np.linspace(0, T - 1, min(count, T))})


class GradFlowMonitor(pl.Callback):
    """Args:
        dirpath: where the ``step_*.npz`` records go (the run's ``grad_flow/``).
        every_n_steps: monitor step 0 and every n-th training step.
        timesteps: timesteps logged as TensorBoard scalars (negative = from the end); default
            ``num_timesteps`` evenly spaced.
        num_timesteps: how many evenly spaced timesteps when ``timesteps`` is not given.
        figure_every_n_records: draw the profile and heatmap images every n-th monitored step
            (a figure costs tens of ms; the records are always written).
    """

    def __init__(self, dirpath: str, every_n_steps: int = 50, timesteps: list[int] | None = None,
                 num_timesteps: int = 5, figure_every_n_records: int = 1):
        self.dirpath = Path(dirpath)
        self.every_n_steps = require_int("monitor.every_n_steps", every_n_steps)
        require(timesteps is None or all(isinstance(t, int) for t in timesteps),
                "monitor.timesteps", timesteps, "null or a list of integers")
        self.timesteps = list(timesteps) if timesteps else None
        self.num_timesteps = require_int("monitor.num_timesteps", num_timesteps)
        self.figure_every = require_int("monitor.figure_every_n_records", figure_every_n_records)
        self.history_steps: list[int] = []
        self.history_log10: list[np.ndarray] = []

    # --- hooks ---------------------------------------------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        pl_module.probe_next_step = trainer.global_step % self.every_n_steps == 0

    def on_after_backward(self, trainer, pl_module) -> None:
        norms = gradflow.module_grad_norms(pl_module)
        pl_module.log_dict({f"grad_norm/{k.removeprefix('grad_norm_')}": v
                            for k, v in norms.items()}, on_step=True, on_epoch=False)
        if pl_module.probes is None:
            return
        record = gradflow.probe_profile(pl_module.cell.state_names,
                                        tuple(p.grad for p in pl_module.probes))
        record.update(norms)
        record["loss"] = float(pl_module.probed_loss)
        pl_module.probes = pl_module.probed_loss = None
        record.update(gradflow.summarize(record["dL_dz"]))
        if trainer.is_global_zero:
            step = trainer.global_step
            gradflow.save(self.dirpath, step, record)
            self.log_tensorboard(trainer, step, record)

    def on_train_end(self, trainer, pl_module) -> None:
        pl_module.probe_next_step = False

    # --- TensorBoard ---------------------------------------------------------------------------
    def log_tensorboard(self, trainer, step: int, record: dict) -> None:
        writer = next((lg.experiment for lg in trainer.loggers
                       if isinstance(lg, TensorBoardLogger)), None)
        self.history_steps.append(step)
        with np.errstate(divide="ignore"):
            self.history_log10.append(np.log10(record["dL_dz"]))
        if writer is None:
            return
        T = len(record["dL_dz"])
        for key in [k for k in record if k.startswith("dL_d")]:
            for t in chosen_timesteps(T, self.timesteps, self.num_timesteps):
                writer.add_scalar(f"{key}/t_{t:04d}", record[key][t], step)
        for key in ("log10_first_last", "decay_rate", "horizon"):
            writer.add_scalar(f"grad_flow/{key}", record[key], step)
        if (len(self.history_steps) - 1) % self.figure_every == 0:
            writer.add_figure("grad_flow/profile", profile_figure(record, step), step)
            writer.add_figure("grad_flow/heatmap",
                              heatmap_figure(self.history_steps, self.history_log10), step)


def profile_figure(record: dict, step: int) -> plt.Figure:
    """||dL/dz_t|| against t on a log scale (and ||dL/dc_t|| for the LSTM)."""
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    for key in [k for k in record if k.startswith("dL_d")]:
        values = np.asarray(record[key])
        ax.semilogy(np.arange(len(values)), np.where(values > 0, values, np.nan),
                    label=f"||{key.replace('dL_d', 'dL/d')}_t||")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("gradient norm")
    ax.set_title(f"training step {step}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    return fig


def heatmap_figure(steps: list[int], rows: list[np.ndarray]) -> plt.Figure:
    """log10 ||dL/dz_t|| over (training step × t)."""
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    data = np.stack(rows)
    data = np.where(np.isfinite(data), data, np.nan)
    T = data.shape[1]
    top = steps[-1] if len(steps) > 1 else steps[0] + 1
    image = ax.imshow(data, aspect="auto", origin="lower", interpolation="nearest",
                      extent=(-0.5, T - 0.5, steps[0], top), cmap="viridis")
    fig.colorbar(image, ax=ax, label="log10 ||dL/dz_t||")
    ax.set_xlabel("timestep t")
    ax.set_ylabel("training step")
    fig.tight_layout()
    return fig
