"""Resuming a run: find its checkpoint, and carry its history into the new run directory.

A resumed run never writes into the run it resumes. Its own directory starts with that run's
`grad_flow` records and TensorBoard events up to the checkpoint's step, so it holds one
complete history, without duplicated or missing points, equal to an uninterrupted run's.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from rnnlab.config import ConfigError
from rnnlab.rundir import CHECKPOINT

HISTORY_SUFFIX = ".history"  # the event file that holds the carried-over TensorBoard points


@dataclass
class Checkpoint:
    path: Path
    run_dir: Path  # the run that wrote it
    step: int  # optimizer steps taken: steps 0 … step − 1 are in it
    last_val_step: int  # the step of its latest validation (−1: none)


def find_checkpoint(ckpt_path: str, runs_dir: Path) -> Checkpoint:
    """``ckpt_path``: a ``.ckpt`` file, a run directory, or ``last`` (the newest run under
    ``runs_dir`` that has ``checkpoints/last.ckpt``). Reads it once to check it is whole."""
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
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        step = int(state["global_step"])
    except Exception as error:  # truncated, not a checkpoint, written by something else
        raise ConfigError(f"ckpt_path: {path} is not a readable rnnlab checkpoint "
                          f"({type(error).__name__}: {error}); choose another one") from None
    last_val_step = state.get("rnnlab", {}).get("last_val_step", -1)
    return Checkpoint(path.resolve(), path.resolve().parent.parent, step, last_val_step)


def carry_history(checkpoint: Checkpoint, new_run: Path, grad_flow_dir: Path | None,
                  tensorboard_dir: Path | None) -> None:
    """Copy the resumed run's records and TensorBoard points of steps before the checkpoint
    (and its validation at the checkpoint's step, if it ran) into the new run's directories."""
    source = checkpoint.run_dir
    if grad_flow_dir is not None:
        grad_flow_dir.mkdir(parents=True, exist_ok=True)
        for record in sorted(source.glob("**/grad_flow/step_*.npz")):
            if int(np.load(record)["step"]) < checkpoint.step:
                shutil.copy2(record, grad_flow_dir / record.name)
    if tensorboard_dir is not None:
        copy_events(source, tensorboard_dir, checkpoint)


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
