"""What the gradient-flow monitor writes, through whichever Lightning loggers the run has.

Scalars go to every logger through its own ``log_metrics``. Figures, the hyperparameters with the
final metrics, TensorBoard's custom-scalars layout and the records' arrays (for TensorBoard's
Gradient-flow tab) differ per logger kind, so each kind has a small adapter:

| logger | scalars | figures | hparams | layout, record arrays |
|---|---|---|---|---|
| TensorBoardLogger | ✓ | ✓ images | ✓ with the final metrics (HPARAMS tab) | ✓ |
| CSVLogger | ✓ | — | ✓ (hparams.yaml), final metrics as scalars | — |
| WandbLogger | ✓ | ✓ images | ✓ config, final metrics as scalars | — |
| MLFlowLogger | ✓ | ✓ artifacts | ✓ params, final metrics as scalars | — |
| any other | ✓ | — | ✓ | — |

A logger that cannot take an image does not lose the figures silently: the monitor says, once,
where they are (another logger, or PNG files next to the records); every number they show is in
the lossless records.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning import loggers
from pytorch_lightning.loggers import Logger
from pytorch_lightning.utilities import rank_zero_only
from tensorboard.compat.proto.summary_pb2 import Summary
from torch import Tensor

from rnnlab.records import Record
from rnnlab.tensorboard_plugin import summary


class TensorBoardLogger(loggers.TensorBoardLogger):
    """Lightning's TensorBoard logger (``logger=tensorboard``), whose `save` runs at most every
    ``save_every_s`` seconds, and always at the end (`finalize`).

    Lightning calls `save` after every logged step: a flush of the event file and a look for
    hparams.yaml on disk, about 0.5–1 ms, which at ``trainer.log_every_n_steps=1`` is a few
    percent of a short-sequence step. Every scalar is still written; TensorBoard sees it at
    most ``save_every_s`` later, and a killed run loses at most that much of the event file's
    tail (the records are written by the monitor, whole, on every monitored step). The scalars
    of `log_metrics` wait for that flush too: their events are made at `save` (each with its
    step and the wall time of its call), a batch at a time, not on every training step, and
    at every checkpoint, flushed with it (`after_save_checkpoint`), so that a run killed after
    a checkpoint has every event up to it on disk for its resume to carry.
    """

    def __init__(self, *args: Any, save_every_s: float = 1.0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.save_every_s = save_every_s
        self._saved_at = -math.inf
        self._held: list[tuple[int | None, float, list[tuple[str, float]]]] = []

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Lightning's, with the call's scalars written as one event of several values: its
        ``add_scalar`` per scalar is one event each (seven or more a step at
        ``trainer.log_every_n_steps=1``: ~270 µs here against ~65 µs for one event of seven). A
        dict value, or a logger with a ``prefix``, goes through Lightning's as before."""
        if self._prefix:
            super().log_metrics(metrics, step)
            return
        scalars, grouped = [], {}
        for tag, value in metrics.items():
            value = value.item() if isinstance(value, Tensor) else value
            if isinstance(value, dict):
                grouped[tag] = value
                continue
            try:
                scalars.append((tag, float(value)))
            except (TypeError, ValueError) as error:
                raise ValueError(f"{tag}: {value!r} is not a number; log a scalar, a 0-d tensor "
                                 "or a dict of them") from error
        if grouped:
            super().log_metrics(grouped, step)
        if scalars:
            self._held.append((step, time.time(), scalars))

    def write_held(self) -> None:
        """The held scalars into the event file, an event per call (as add_scalar writes each:
        float32 simple_value), at its step and wall time."""
        held, self._held = self._held, []
        for step, walltime, scalars in held:
            values = [Summary.Value(tag=tag, simple_value=value) for tag, value in scalars]
            summary.write(self.experiment, step, Summary(value=values), walltime)

    def save(self) -> None:
        now = time.monotonic()
        if now - self._saved_at >= self.save_every_s:
            self._saved_at = now
            self.write_held()
            super().save()

    def after_save_checkpoint(self, checkpoint_callback) -> None:
        """After every checkpoint, the scalars held so far into the event file, flushed: a run
        resumed from it carries the events up to its step (`rnnlab.resume.copy_events`)."""
        self.write_held()
        if self._experiment is not None:
            self.experiment.flush()
        super().after_save_checkpoint(checkpoint_callback)

    def finalize(self, status: str) -> None:
        self.write_held()  # before Lightning's closes the event file
        self._saved_at = -math.inf  # the last save is never skipped
        super().finalize(status)


class LoggerAdapter:
    """The plain adapter: scalars and hyperparameters through Lightning's own Logger API."""

    takes_figures = False

    def __init__(self, logger: Logger):
        self.logger = logger

    @property
    def name(self) -> str:
        return type(self.logger).__name__

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        finite = {k: float(v) for k, v in metrics.items() if v is not None}
        if finite:
            self.logger.log_metrics(finite, step)

    def figure(self, tag: str, figure, step: int) -> None:
        raise NotImplementedError(f"{self.name} takes no figures")

    def layout(self, layout: dict) -> None:
        """A custom-scalars layout (TensorBoard's); other loggers have none."""

    def record(self, name: str, record: Record) -> None:
        """A record's arrays, for loggers that can show them (TensorBoard's Gradient-flow tab);
        ``name``: the watched module's path, "" for rnnlab's own model."""

    def run_info(self, overrides: list[str]) -> None:
        """What configures the run (Hydra overrides), for loggers that name runs by it."""

    def hparams(self, params: dict[str, Any], final: dict[str, float], step: int) -> None:
        """The run's configuration next to its final metrics."""
        self.logger.log_hyperparams(params)
        self.scalars(final, step)

    def finish(self) -> None:
        self.logger.finalize("success")


class TensorBoardAdapter(LoggerAdapter):
    takes_figures = True

    def figure(self, tag: str, figure, step: int) -> None:
        self.logger.experiment.add_figure(tag, figure, step)

    def layout(self, layout: dict) -> None:
        self.logger.experiment.add_custom_scalars(layout)

    def record(self, name: str, record: Record) -> None:
        # Tensor summaries in the event file: TensorBoard's data provider serves them to the tab.
        summary.write_record(self.logger.experiment, record.step, record.arrays(),
                             prefix=f"{name}/" if name else "")

    def run_info(self, overrides: list[str]) -> None:
        summary.write(self.logger.experiment, 0, summary.run_info_summary(overrides))

    def hparams(self, params: dict[str, Any], final: dict[str, float], step: int) -> None:
        self.logger.log_hyperparams(params, final, step=step)


class WandbAdapter(LoggerAdapter):
    takes_figures = True

    def figure(self, tag: str, figure, step: int) -> None:
        # Through the logger, which puts the step beside the image (W&B's own step only grows).
        self.logger.log_image(tag, [figure_image(figure)], step=step)


class MLflowAdapter(LoggerAdapter):
    takes_figures = True

    def figure(self, tag: str, figure, step: int) -> None:
        self.logger.experiment.log_figure(self.logger.run_id, figure,
                                          f"{tag}/step_{step:07d}.png")


def adapter_for(logger: Logger) -> LoggerAdapter:
    """The adapter of ``logger``'s kind (by class name for loggers whose package is optional)."""
    if isinstance(logger, loggers.TensorBoardLogger):
        return TensorBoardAdapter(logger)
    kind = type(logger).__name__
    if kind == "WandbLogger":
        return WandbAdapter(logger)
    if kind == "MLFlowLogger":
        return MLflowAdapter(logger)
    return LoggerAdapter(logger)


def adapters(trainer: pl.Trainer) -> list[LoggerAdapter]:
    return [adapter_for(logger) for logger in trainer.loggers]


def figure_image(figure) -> np.ndarray:
    """A matplotlib figure as an (H, W, 4) uint8 RGBA array."""
    import matplotlib.image

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    buffer.seek(0)
    return (matplotlib.image.imread(buffer, format="png") * 255).astype(np.uint8)

