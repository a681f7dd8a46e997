"""Resuming a run: find its checkpoint, check the new settings against it, carry its history.

A resumed run never writes into the run it resumes. Its own directory starts with that run's
`grad_flow` records and TensorBoard events up to the checkpoint's step, so it holds one
complete history, without duplicated or missing points, equal to an uninterrupted run's.

Settings that decide what is trained (the cell, the task and its data, the model and its
optimizer, the seed, gradient clipping) must be those the checkpoint was trained with: a change
is refused before anything is built, naming the keys. Others (``trainer.max_steps``, logging,
the monitor) may change; the changes are logged and written into the new run's
``resumed.json``.

The one exception to "a fresh directory": a SLURM job requeued by Lightning (`requeued_checkpoint`)
continues in its own directory, from the newest checkpoint there.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from rnnlab.config import ConfigError
from rnnlab.records import load_records, record_files, save_records
from rnnlab.rundir import CHECKPOINT, RunDir, slurm_requeued, write_json

log = logging.getLogger(__name__)

HISTORY_SUFFIX = ".history"  # the event file that holds the carried-over TensorBoard points
HPC_CHECKPOINT = re.compile(r"hpc_ckpt_(\d+)\.ckpt")  # Lightning's SLURM requeue checkpoints

# Keys (and whole groups) that decide what is trained: a resumed run must keep them.
FIXED = ("seed", "cell", "task", "model", "trainer.gradient_clip_val",
         "trainer.gradient_clip_algorithm", "trainer.accumulate_grad_batches",
         "trainer.precision")
# … except these, which change how the same model and data are computed, not what they are.
SAME_MODEL = ("model.fast_path", "model.compile", "model.checkpoint_steps", "task.num_workers")
# Never compared: where the run writes, and which checkpoint it resumes.
UNCOMPARED = ("hydra", "paths", "ckpt_path")


@dataclass
class Checkpoint:
    path: Path
    run_dir: Path  # the run that wrote it
    step: int  # optimizer steps taken: steps 0 … step − 1 are in it
    last_val_step: int  # the step of its latest validation (−1: none)
    hparams: dict = field(default_factory=dict)  # the model's hyperparameters
    config: DictConfig | None = None  # the composed config of the run that wrote it
    changes: dict = field(default_factory=dict)  # allowed changes of settings: key → (was, now)


def load_checkpoint(path: Path) -> Checkpoint:
    """Read ``path`` once, to check it is whole, and the config of the run that wrote it."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        step = int(state["global_step"])
    except Exception as error:  # truncated, not a checkpoint, written by something else
        raise ConfigError(f"ckpt_path: {path} is not a readable rnnlab checkpoint "
                          f"({type(error).__name__}: {error}); choose another one") from None
    last_val_step = state.get("rnnlab", {}).get("last_val_step", -1)
    run_dir = path.resolve().parent.parent
    return Checkpoint(path.resolve(), run_dir, step, last_val_step,
                      dict(state.get("hyper_parameters", {})), read_run_config(RunDir(run_dir)))


def read_run_config(run: RunDir) -> DictConfig | None:
    """The run's ``.hydra/config.yaml`` (None if absent); unreadable: a ConfigError naming it."""
    if not run.config.is_file():
        return None
    try:
        config = OmegaConf.load(run.config)
    except Exception as error:  # YAML errors, cut-short files, binary junk
        raise ConfigError(f"ckpt_path: the resumed run's config {run.config} cannot be read "
                          f"({type(error).__name__}: {str(error).splitlines()[0]}); it is what "
                          "the new settings are checked against: restore it, or delete it to "
                          "check the model's settings only") from None
    if not isinstance(config, DictConfig):
        raise ConfigError(f"ckpt_path: the resumed run's config {run.config} is not a mapping; "
                          "restore it, or delete it to check the model's settings only")
    return config


def find_checkpoint(ckpt_path: str, runs_dir: Path) -> Checkpoint:
    """``ckpt_path``: a ``.ckpt`` file, a run directory, or ``last`` (the newest run under
    ``runs_dir`` that has ``checkpoints/last.ckpt``)."""
    if ckpt_path == "last":
        candidates = sorted(runs_dir.glob(f"*/{CHECKPOINT}"), key=lambda p: p.stat().st_mtime)
        if not candidates:
            raise ConfigError(f"ckpt_path=last: no run under {runs_dir} has a {CHECKPOINT} "
                              "(give a checkpoint file or a run directory: ckpt_path=...)")
        path = candidates[-1]
    else:
        path = Path(ckpt_path)
        if path.is_dir():
            path = path / CHECKPOINT
        if not path.is_file():
            raise ConfigError(f"ckpt_path: no checkpoint at {path} (give a .ckpt file, a run "
                              "directory with checkpoints/last.ckpt, or ckpt_path=last)")
    return load_checkpoint(path)


def requeued_checkpoint(run: RunDir) -> Checkpoint | None:
    """On a SLURM job that was requeued (``SLURM_RESTART_COUNT`` > 0), the newest checkpoint in
    its own directory: ``last.ckpt`` (written when SLURM's SIGTERM stopped it) or Lightning's
    ``hpc_ckpt_<n>.ckpt`` (written on the requeue signal). None elsewhere."""
    if not slurm_requeued():
        return None
    paths = [run.checkpoint, *(p for p in run.path.glob("hpc_ckpt_*.ckpt")
                               if HPC_CHECKPOINT.fullmatch(p.name))]
    found = [load_checkpoint(p) for p in paths if p.is_file()]
    return max(found, key=lambda c: c.step) if found else None


# --- what may change -----------------------------------------------------------------------------
def flatten(value: Any, prefix: str) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` → ``{"<prefix>.a.b": 1}``; lists and scalars are leaves."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat if flat or not prefix else {prefix: {}}
    return {prefix: value}


UNRESOLVED = object()  # a value whose interpolation does not resolve here (``${hydra:…}``)
ABSENT = "(absent)"


def settings(cfg: DictConfig) -> dict[str, tuple[Any, Any]]:
    """Every setting as ``{dotted key: (as written, resolved)}`` without the keys that are never
    compared; the resolved value is `UNRESOLVED` where the interpolation does not resolve here
    (a saved config's ``${hydra:…}`` outside its run)."""
    written = OmegaConf.to_container(cfg, resolve=False)
    flat = flatten({k: v for k, v in written.items() if k not in UNCOMPARED}, "")
    out = {}
    for key, value in flat.items():
        try:
            resolved = OmegaConf.select(cfg, key, throw_on_resolution_failure=True)
            if OmegaConf.is_config(resolved):
                resolved = OmegaConf.to_container(resolved, resolve=True)
        except Exception:
            resolved = UNRESOLVED
        out[key] = (value, resolved)
    return out


def same_setting(a: tuple[Any, Any], b: tuple[Any, Any]) -> bool:
    """Equal resolved values; as written where either does not resolve."""
    if UNRESOLVED in (a[1], b[1]):
        return a[0] == b[0]
    return a[1] == b[1]


def shown(setting: tuple[Any, Any] | None) -> Any:
    return ABSENT if setting is None else setting[0] if setting[1] is UNRESOLVED else setting[1]


def is_fixed(key: str) -> bool:
    def under(prefixes: tuple[str, ...]) -> bool:
        return any(key == p or key.startswith(p + ".") for p in prefixes)

    return under(FIXED) and not under(SAME_MODEL)


def model_settings(hparams: dict) -> dict[str, tuple[Any, Any]]:
    """The config keys a model's hyperparameters record (``cell.*``, ``model.*``)."""
    flat = flatten({"cell": hparams.get("cell", {})}, "")
    for key in ("encoder_size", "optimizer", "fast_path", "compile", "checkpoint_steps"):
        if key in hparams:
            flat.update(flatten(hparams[key], f"model.{key}"))
    return {key: (value, value) for key, value in flat.items()}


def changed_settings(checkpoint: Checkpoint, cfg: DictConfig) -> dict[str, tuple[Any, Any]]:
    """Check the new ``cfg`` against the checkpoint's run before anything is built.

    Raises a ConfigError naming every changed key that decides what is trained; returns the
    other changes, ``{key: (checkpoint's value, new value)}``.
    """
    new = settings(cfg)
    if checkpoint.config is not None:
        old = settings(checkpoint.config)
    else:  # a checkpoint moved away from its run: the model's hyperparameters are all we have
        log.warning("ckpt_path: the run of %s has no .hydra/config.yaml: only the cell's and "
                    "the model's settings are checked against it", checkpoint.path)
        old = model_settings(checkpoint.hparams)
        new = {k: v for k, v in new.items() if k in old or k.startswith("cell.")}
    changes = {key: (shown(old.get(key)), shown(new.get(key)))
               for key in sorted(set(old) | set(new))
               if key not in old or key not in new or not same_setting(old[key], new[key])}
    fixed = [key for key in changes if is_fixed(key)]
    if fixed:
        listed = ", ".join(f"{key}: {changes[key][0]!r} → {changes[key][1]!r}" for key in fixed)
        raise ConfigError(
            f"ckpt_path: resuming {checkpoint.path} with other settings than it was trained "
            f"with would mix two runs in one: {listed}. Set them back (e.g. "
            f"{fixed[0]}={changes[fixed[0]][0]!r}), or train a new run without ckpt_path")
    max_steps = cfg.trainer.get("max_steps", -1)
    if max_steps != -1 and max_steps <= checkpoint.step:
        raise ConfigError(f"trainer.max_steps must be more than the checkpoint's {checkpoint.step}"
                          f" steps to train on from it, got {max_steps} "
                          f"(set trainer.max_steps=...)")
    return changes


def record_resume(run: RunDir, checkpoint: Checkpoint, changes: dict[str, tuple[Any, Any]]
                  ) -> None:
    """Log the allowed changes and write them, with the checkpoint, into ``resumed.json``."""
    for key, (old, new) in changes.items():
        log.info("resumed with %s changed: %r → %r", key, old, new)
    write_json(run.resumed, {"checkpoint": str(checkpoint.path), "from_run": str(
        checkpoint.run_dir), "step": checkpoint.step, "changed": {
        key: {"was": old, "now": new} for key, (old, new) in changes.items()}})


# --- the history ---------------------------------------------------------------------------------
def carry_history(checkpoint: Checkpoint, new_run: Path, grad_flow_dir: Path | None,
                  tensorboard_dir: Path | None) -> None:
    """Copy the resumed run's records and TensorBoard points of steps before the checkpoint
    (and its validation at the checkpoint's step, if it ran) into the new run's directories.
    A record that cannot be read (cut short by a kill or a full disk) is skipped with a
    warning naming it."""
    source = RunDir(checkpoint.run_dir).grad_flow
    if grad_flow_dir is not None:
        grad_flow_dir.mkdir(parents=True, exist_ok=True)
        for path in record_files(source, below=True):
            try:
                records = load_records(path)
            except Exception as error:
                log.warning("resume: skipped the record %s, which cannot be read (%s: %s)",
                            path, type(error).__name__, error)
                continue
            before = [record for record in records if record.step < checkpoint.step]
            target = grad_flow_dir / path.relative_to(source)
            if len(before) == len(records):
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
            elif before:  # a pack across the checkpoint: the records before it
                save_records(before, target.parent)
    if tensorboard_dir is not None:
        copy_events(checkpoint.run_dir, tensorboard_dir, checkpoint)


def copy_events(source: Path, target: Path, checkpoint: Checkpoint) -> None:
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event
    from torch.utils.tensorboard.writer import FileWriter

    def keep(event) -> bool:
        if not event.HasField("summary"):
            return False  # file headers and session logs: the new file writes its own
        if any(v.metadata.plugin_data.plugin_name == "hparams" for v in event.summary.value):
            return False  # written at the end of the run, by the run itself
        if event.step < checkpoint.step:
            return True
        validated = checkpoint.last_val_step == checkpoint.step == event.step
        return validated and all(v.tag.startswith("val/") for v in event.summary.value)

    target.mkdir(parents=True, exist_ok=True)
    writer = FileWriter(str(target), filename_suffix=HISTORY_SUFFIX)
    for events_file in sorted(source.glob("**/events.out.tfevents.*")):
        # raw records: the events exactly as written (the plain loader migrates scalar summaries)
        for raw in RawEventFileLoader(str(events_file)).Load():
            event = Event.FromString(raw)
            if keep(event):
                writer.add_event(event)
    writer.close()
