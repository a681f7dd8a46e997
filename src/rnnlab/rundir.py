"""A run directory: where a run's files live, and how the run ended.

One run of `rnnlab.train.train` (one job of a sweep) owns one directory::

    <run dir>/
        grad_flow/step_<step:07d>.npz       the gradient-flow records (rnnlab.records)
        grad_flow/<module path>/step_*.npz   records of watched torch.nn modules
        tensorboard/                         event files
        checkpoints/last.ckpt                the latest checkpoint
        metrics.json                         final metrics: written when training ends
        failed.json                          the error of a job that raised (sweeps)
        .hydra/config.yaml, overrides.yaml   the composed config and the overrides

Training, resuming, the sweep's summary and the report all read these paths from here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

GRAD_FLOW = "grad_flow"
TENSORBOARD = "tensorboard"
CHECKPOINT = Path("checkpoints") / "last.ckpt"
METRICS_FILE = "metrics.json"
FAILED_FILE = "failed.json"
CONFIG_FILE = Path(".hydra") / "config.yaml"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
OUTCOMES = ("completed", "failed", "incomplete")


@dataclass(frozen=True)
class Outcome:
    """How a run ended: ``failed`` (failed.json; it wins), ``completed`` (metrics.json) or
    ``incomplete`` (still running, or killed from outside), with the two files' contents."""

    status: str
    failure: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RunDir:
    """The files of one run directory (none of them need exist)."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def grad_flow(self) -> Path:
        return self.path / GRAD_FLOW

    @property
    def tensorboard(self) -> Path:
        return self.path / TENSORBOARD

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def failed(self) -> Path:
        return self.path / FAILED_FILE

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def overrides(self) -> Path:
        return self.path / OVERRIDES_FILE

    def is_run(self) -> bool:
        """Whether the directory holds gradient-flow records (what the report compares)."""
        return self.grad_flow.is_dir()

    def outcome(self) -> Outcome:
        failure = json.loads(self.failed.read_text()) if self.failed.is_file() else {}
        metrics = json.loads(self.metrics.read_text()) if self.metrics.is_file() else {}
        status = ("failed" if self.failed.is_file() else
                  "completed" if self.metrics.is_file() else "incomplete")
        return Outcome(status, failure, metrics)
