"""A run directory: where a run's files live, how they are written, and how the run ended.

One run of `rnnlab.train.train` (one job of a sweep) owns one directory::

    <run dir>/
        grad_flow/step_<step:07d>.npz       the gradient-flow records (rnnlab.records), or
        grad_flow/steps_<first>-<last>.npz   packs of several steps' (monitor.records_per_file)
        grad_flow/<module path>/step_*.npz   records of watched torch.nn modules
        events.out.tfevents.*                TensorBoard's event files (it names the run by
                                             this directory: 0_cell.gain=0.9 in a sweep)
        checkpoints/last.ckpt                the latest checkpoint
        metrics.json                         final metrics: written when training ends
        failed.json                          the error of a run that raised
        interrupted.json                     the signal that stopped a run, and its checkpoint
        resumed.json                         the checkpoint a resumed run started from
        .hydra/config.yaml, overrides.yaml   the composed config and the overrides

Training, resuming, the sweep's summary and the report all read these paths from here. Files are
written with `atomic_write`: a reader, a kill or a full disk sees the old file or the new one,
never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import sys
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

GRAD_FLOW = "grad_flow"
EVENT_FILES = "events.out.tfevents.*"  # TensorBoard's, directly in the run directory
CHECKPOINT = Path("checkpoints") / "last.ckpt"
METRICS_FILE = "metrics.json"
FAILED_FILE = "failed.json"
INTERRUPTED_FILE = "interrupted.json"
RESUMED_FILE = "resumed.json"
CONFIG_FILE = Path(".hydra") / "config.yaml"
OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"
# What Hydra writes into a run directory before the run's own code starts.
HYDRA_FILES = (".hydra", "train.log")
OUTCOMES = ("completed", "failed", "interrupted", "incomplete")
NOT_FINITE_KEY = "not_finite"  # metrics.json: {key: "nan" | "inf" | "-inf"} for each null value
TEMP_SUFFIX = ".tmp"
# metrics.json: optimizer steps this run trained, and how many of them were skipped (non-finite)
TRAINED, SKIPPED = "train/steps_trained", "train/skipped_steps"


class RunFileError(ValueError):
    """A file of a run directory cannot be read; the message names it and what to do."""


class DiskFullError(OSError):
    """The disk filled up while a file was written; the previous version of it is kept."""

    def __init__(self, path: Path):
        super().__init__(errno.ENOSPC, f"disk full: could not write {path} (no space left on "
                         f"the device; the previous {path.name}, if any, is unchanged). Free "
                         "space there, or write runs elsewhere (paths.log_dir=...)")
        self.path = path

    def __str__(self) -> str:
        return self.strerror


def temp_path(path: Path) -> Path:
    """The temporary file `atomic_write` fills before renaming it to ``path``."""
    return path.with_name(f".{path.name}.{os.getpid()}{TEMP_SUFFIX}")


def remove_orphans(path: Path) -> None:
    """Remove temporary files of ``path`` left by writers that no longer run (killed by SIGKILL
    mid-write: nothing else can leave one).

    A process lists each directory it writes into once (`temp_files`), on its first write there,
    and each later write of a file removes that file's dead writers' temporary files from the
    list: listing a records directory on every write made a run's writes quadratic in its
    records (1.2 ms a write with 2,200 records, on the writer's thread, holding the GIL). A
    writer killed after that first listing leaves its file to the next process that writes
    there (a resumed run)."""
    key = (os.getpid(), str(path.parent))
    if key not in _TEMP_FILES:
        _TEMP_FILES[key] = temp_files(path.parent)
    for orphan in _TEMP_FILES[key].pop(path.name, ()):
        pid = int(orphan.name[len(path.name) + 2:-len(TEMP_SUFFIX)])
        if pid != os.getpid() and not process_alive(pid):
            with contextlib.suppress(OSError):
                orphan.unlink()


# (process, directory) → target name → the temporary files of it found in the directory
_TEMP_FILES: dict[tuple[int, str], dict[str, list[Path]]] = {}


def temp_files(directory: Path) -> dict[str, list[Path]]:
    """The temporary files in ``directory`` (`temp_path`'s ``.<name>.<pid>.tmp``), by name."""
    found: dict[str, list[Path]] = {}
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX):
                name, _, pid = entry.name[1:-len(TEMP_SUFFIX)].rpartition(".")
                if name and pid.isdigit():
                    found.setdefault(name, []).append(Path(entry.path))
    return found


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Write ``path`` whole or not at all: ``write(f)`` fills a temporary file in the same
    directory, which is flushed to disk (fsync) and then renamed over ``path``.

    Until the rename the previous ``path`` is untouched, so a kill, an exception or a full disk
    leaves the old file readable; the temporary file is removed on any error (a SIGKILL can
    still leave one, named ``.<name>.<pid>.tmp``: the next process to write ``path`` removes it,
    `remove_orphans`). A full disk raises `DiskFullError` naming ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(path)
    temp = temp_path(path)
    try:
        with open(temp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            temp.unlink()
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise DiskFullError(path) from error
        raise
    sync_directory(path.parent)


class BackgroundWriter:
    """File writes run one at a time, in the order given, on a thread of their own, so that the
    caller does not wait for the disk (each `atomic_write` fsyncs: milliseconds, as long as a
    short training step).

    `wait` returns once every write submitted so far is on disk, and raises the first one's
    error (a `DiskFullError`, say) if any failed; a failed write's error also surfaces at the
    next `submit`. The thread is made on the first write.
    """

    def __init__(self, name: str):
        self.name = name
        self._executor: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []

    def submit(self, write: Callable[..., Any], *args: Any) -> None:
        while self._pending and self._pending[0].done():  # finished: raise a failure now
            self._pending.pop(0).result()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix=self.name)
        self._pending.append(self._executor.submit(write, *args))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        errors = [future.exception() for future in pending]  # waits for each
        first = next((error for error in errors if error is not None), None)
        if first is not None:
            raise first

    def close(self) -> None:
        """`wait`, then end the thread."""
        try:
            self.wait()
        finally:
            if self._executor is not None:
                self._executor.shutdown()
                self._executor = None

    def __getstate__(self) -> dict:  # a copy of its owner (pickled, deep-copied) writes anew
        return {"name": self.name, "_executor": None, "_pending": []}


def sync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable (where the filesystem allows it)."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_json(path: str | Path, data: dict) -> None:
    """``data`` as indented JSON, atomically; NaN and infinities are refused (not JSON)."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))


def read_json(path: Path) -> dict:
    """A JSON object from ``path``, or `RunFileError` naming it."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise RunFileError(f"{path} cannot be read ({type(error).__name__}: {error}): it was "
                           "cut short (the run was killed or the disk filled up while writing "
                           "it) or edited; delete it, or rerun the run") from None
    if not isinstance(data, dict):
        raise RunFileError(f"{path} holds {type(data).__name__}, not a JSON object; delete it, "
                           "or rerun the run")
    return data


def finite_json(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` with each NaN or infinity replaced by null, and the value it had listed under
    ``not_finite`` (JSON has no NaN): ``{"val/loss": null, "not_finite": {"val/loss": "nan"}}``."""
    out: dict[str, Any] = {}
    not_finite: dict[str, str] = {}
    for key, value in metrics.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[key] = None
            not_finite[key] = str(value)
        else:
            out[key] = value
    if not_finite:
        out[NOT_FINITE_KEY] = not_finite
    return out


@dataclass(frozen=True)
class Outcome:
    """How a run ended: ``failed`` (failed.json; it wins), ``interrupted`` (interrupted.json: a
    signal stopped it, its checkpoint resumes it), ``completed`` (metrics.json) or
    ``incomplete`` (still running, or killed from outside), with the files' contents."""

    status: str
    failure: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    interruption: dict = field(default_factory=dict)

    @property
    def every_step_skipped(self) -> bool:
        """A completed run whose every step was skipped for non-finite values (its parameters
        never moved): reported as such by the report and the sweep's summary."""
        trained = self.metrics.get(TRAINED) or 0
        return self.status == "completed" and trained > 0 and (
            self.metrics.get(SKIPPED) or 0) >= trained

    @property
    def label(self) -> str:
        """The status as the report and the summary show it."""
        return "completed, every step skipped" if self.every_step_skipped else self.status


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
        """Where TensorBoard's event files are: the run directory itself."""
        return self.path

    def event_files(self) -> list[Path]:
        return sorted(self.tensorboard.glob(EVENT_FILES))

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
    def interrupted(self) -> Path:
        return self.path / INTERRUPTED_FILE

    @property
    def resumed(self) -> Path:
        return self.path / RESUMED_FILE

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def overrides(self) -> Path:
        return self.path / OVERRIDES_FILE

    def is_run(self) -> bool:
        """Whether the directory holds gradient-flow records (what the report compares)."""
        return self.grad_flow.is_dir()

    def run_files(self) -> list[str]:
        """The files and folders of a run found here (empty for a fresh directory)."""
        names = (GRAD_FLOW, CHECKPOINT.parts[0], METRICS_FILE, FAILED_FILE,
                 INTERRUPTED_FILE, RESUMED_FILE, str(CONFIG_FILE))
        found = [name for name in names if (self.path / name).exists()]
        return found + ([EVENT_FILES] if self.event_files() else [])

    # --- how the run ended ---------------------------------------------------------------------
    def outcome(self) -> Outcome:
        """Read the outcome files; one that cannot be read is a `RunFileError` naming it."""
        failure = read_json(self.failed) if self.failed.is_file() else {}
        interruption = read_json(self.interrupted) if self.interrupted.is_file() else {}
        metrics = read_json(self.metrics) if self.metrics.is_file() else {}
        status = ("failed" if self.failed.is_file() else
                  "interrupted" if self.interrupted.is_file() else
                  "completed" if self.metrics.is_file() else "incomplete")
        return Outcome(status, failure, metrics, interruption)

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        """``metrics.json``: the final metrics, a non-finite value as null (`finite_json`)."""
        write_json(self.metrics, finite_json(metrics))

    def write_failure(self, error: BaseException) -> dict[str, str]:
        """``failed.json``: the error's type, message and traceback."""
        record = {"error_type": type(error).__name__, "message": str(error),
                  "traceback": "".join(traceback.format_exception(error))}
        write_json(self.failed, record)
        return record

    def write_interruption(self, signal_name: str, step: int, checkpoint: str | None) -> None:
        """``interrupted.json``: the signal, the step reached and the checkpoint to resume."""
        record = {"signal": signal_name, "step": step, "checkpoint": checkpoint,
                  "resume": f"rnnlab train ckpt_path={self.path}" if checkpoint
                  else None, "slurm_job_id": os.environ.get("SLURM_JOB_ID")}
        write_json(self.interrupted, record)

    def discard_if_fresh(self) -> bool:
        """Remove the directory if it holds nothing but what Hydra wrote before the run started
        (a run refused for a config error); return whether it was removed."""
        if not self.path.is_dir() or any(p.name not in HYDRA_FILES for p in self.path.iterdir()):
            return False
        hydra = self.path / ".hydra"
        if hydra.is_dir() and any(p.suffix != ".yaml" or p.is_dir() for p in hydra.iterdir()):
            return False
        for p in sorted(self.path.rglob("*"), reverse=True):  # files before their folders
            p.rmdir() if p.is_dir() else p.unlink()
        self.path.rmdir()
        return True


# --- claiming a directory ---------------------------------------------------------------------
def slurm_requeued() -> bool:
    """Whether this is a SLURM job started again by a requeue (it continues in its directory)."""
    return os.environ.get("SLURM_RESTART_COUNT", "0") not in ("", "0")


class RunDirGuard(Callback):
    """Hydra callback: refuse an explicit ``hydra.run.dir`` (or ``hydra.sweep.dir``) that holds
    another run, before Hydra writes its config and log there. (The default directories are
    claimed fresh by ``${unique_dir:...}``; a requeued SLURM job and the other processes of a
    data-parallel run come back to their own directory and pass.)"""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.explicit(config, "run"):
            self.refuse_if_taken("hydra.run.dir", Path(config.hydra.run.dir),
                                 RunDir(config.hydra.run.dir).run_files())

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.explicit(config, "sweep"):
            sweep = Path(config.hydra.sweep.dir)
            taken = [str(job.relative_to(sweep)) for job in sorted(sweep.glob("*"))
                     if job.is_dir() and RunDir(job).run_files()] if sweep.is_dir() else []
            self.refuse_if_taken("hydra.sweep.dir", sweep, taken)

    @staticmethod
    def explicit(config: DictConfig, mode: str) -> bool:
        written = OmegaConf.to_container(config.hydra[mode], resolve=False)["dir"]
        return "unique_dir" not in str(written)

    @staticmethod
    def refuse_if_taken(key: str, path: Path, taken: list[str]) -> None:
        from pytorch_lightning.utilities import rank_zero_only

        if not taken or slurm_requeued() or rank_zero_only.rank != 0:
            return
        print(f"Config error: {key}: {path} holds another run ({', '.join(taken)}); a run "
              f"never writes into another's directory: omit {key} (a fresh directory is made), "
              f"choose a new one ({key}=...), or resume that run into a new directory with "
              f"ckpt_path=<its run directory>", file=sys.stderr)
        sys.exit(2)
