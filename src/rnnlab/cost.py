"""RunCost: what a run cost — seconds per training step, peak memory, a cell's counts per step.

Written into ``metrics.json`` next to the final validation metrics (and so into the report's
table and TensorBoard's HPARAMS tab), so that runs of a sweep compare on cost as well as accuracy:

- ``train/seconds_per_step``: mean wall time of a training step, from the start of its batch to
  the start of the next (forward, backward, optimizer step, every callback's work — the
  monitor's on monitored steps — data and checkpoints; validation excluded);
- ``train/peak_memory_mb``: the peak resident memory of the process during training (MiB; torch
  and everything the process holds count), or on a GPU the peak memory torch allocated there;
- ``cell/<name>``: the mean per training step of each count the cell reports in `diagnostics`
  (the ODE's ``nfe_forward``, ``nfe_backward``).
"""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

STATUS, CLEAR_REFS = Path("/proc/self/status"), Path("/proc/self/clear_refs")


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set (VmHWM) to its current size, where Linux lets us
    (a process of a sweep's worker pool runs several jobs; each should see its own peak)."""
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mib(reset_worked: bool) -> float:
    """The peak resident set since `reset_peak_rss`, or the process's lifetime peak."""
    if reset_worked:
        for line in STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class RunCost(pl.Callback):
    """Times the training steps and tracks peak memory; `metrics` gives the run's cost.

    A step lasts from the start of its batch to the start of the next (or the end of training):
    every callback's work, the next batch's data and checkpointing count, validation does not.
    """

    def __init__(self) -> None:
        self.seconds = 0.0  # summed over the finished steps
        self.steps = 0
        self.step_start: float | None = None
        self.validation = 0.0  # validation time inside the current step
        self.validation_start = 0.0
        self.reset_worked = False
        self.device = torch.device("cpu")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds, self.steps, self.step_start = 0.0, 0, None
        self.device = pl_module.device
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.reset_worked = reset_peak_rss()

    def end_step(self) -> float:
        now = time.perf_counter()
        if self.step_start is not None:
            self.seconds += now - self.step_start - self.validation
            self.steps += 1
        self.validation = 0.0
        return now

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.step_start = self.end_step()

    def on_train_end(self, trainer, pl_module) -> None:
        self.end_step()
        self.step_start = None

    def on_validation_start(self, trainer, pl_module) -> None:
        self.validation_start = time.perf_counter()

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.step_start is not None:  # not the sanity check before training
            self.validation += time.perf_counter() - self.validation_start

    def peak_memory_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        return peak_rss_mib(self.reset_worked)

    def metrics(self, cell_totals: dict[str, float]) -> dict[str, float]:
        """The run's cost; ``cell_totals``: the sums of the cell's diagnostics over its steps."""
        if self.steps == 0:
            return {}
        return {"train/seconds_per_step": self.seconds / self.steps,
                "train/peak_memory_mb": self.peak_memory_mib(),
                **{f"cell/{name}": total / self.steps for name, total in cell_totals.items()}}
