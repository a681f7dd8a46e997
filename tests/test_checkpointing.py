"""Checkpoints and run files are written whole or not at all; last.ckpt follows the run."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from rnnlab import checkpointing, rundir
from rnnlab.checkpointing import AtomicCheckpointIO, RunCheckpoint, RunInterrupted
from rnnlab.config import ConfigError
from rnnlab.rundir import DiskFullError, RunDir, atomic_write, finite_json, temp_path
from rnnlab.train import build, train

from .conftest import ROOT


# --- atomic_write ---------------------------------------------------------------------------------
def test_atomic_write_replaces_the_file_whole(tmp_path):
    path = tmp_path / "a" / "file.bin"
    atomic_write(path, lambda f: f.write(b"old"))
    atomic_write(path, lambda f: f.write(b"new"))
    assert path.read_bytes() == b"new"
    assert sorted(p.name for p in path.parent.iterdir()) == ["file.bin"]


def test_a_write_that_fails_midway_keeps_the_previous_file_and_no_temp_file(tmp_path):
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"previous checkpoint")

    def half_then_fail(f):
        f.write(b"half of the new one")
        raise KeyboardInterrupt  # a kill the process sees, at the worst moment

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, half_then_fail)
    assert path.read_bytes() == b"previous checkpoint"
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_a_full_disk_names_the_file_and_keeps_the_previous_one(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("{}")

    def disk_full(f):
        f.write(b"{")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(DiskFullError) as error:
        atomic_write(path, disk_full)
    assert error.value.errno == errno.ENOSPC
    assert str(error.value).startswith(f"disk full: could not write {path} (no space left")
    assert path.read_text() == "{}" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_temp_files_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    path = tmp_path / "last.ckpt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    orphan = tmp_path / f".last.ckpt.{dead}.tmp"  # what SIGKILL mid-write leaves
    orphan.write_bytes(b"half")
    atomic_write(path, lambda f: f.write(b"whole"))
    assert not orphan.exists() and path.read_bytes() == b"whole"


def test_a_directory_is_listed_once_for_its_orphans_however_many_files_are_written(
        tmp_path, monkeypatch):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    orphans = [tmp_path / f".step_{i:07d}.npz.{dead}.tmp" for i in range(3)]
    for orphan in orphans:
        orphan.write_bytes(b"half")
    alive = tmp_path / f".step_0000002.npz.{os.getppid()}.tmp"  # a running writer's: kept
    alive.write_bytes(b"in flight")
    listings = []
    real_scandir = rundir.os.scandir
    monkeypatch.setattr(rundir.os, "scandir", lambda d: listings.append(d) or real_scandir(d))
    for i in range(5):
        atomic_write(tmp_path / f"step_{i:07d}.npz", lambda f: f.write(b"whole"))
        if i == 0:
            assert not orphans[0].exists() and orphans[1].exists()  # each file's, at its write
    assert len(listings) == 1  # not once a write: quadratic in a run's records
    assert not any(o.exists() for o in orphans) and alive.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [
        f"step_{i:07d}.npz" for i in range(5)]


def test_the_temporary_file_lies_beside_the_target_whatever_tmpdir_says(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path / "elsewhere"))
    seen = []
    atomic_write(tmp_path / "run" / "x", lambda f: seen.append(f.name))
    assert os.path.dirname(seen[0]) == str(tmp_path / "run")
    assert seen[0] == str(temp_path(tmp_path / "run" / "x"))


def test_metrics_json_writes_nan_as_null_with_the_value_it_had(tmp_path):
    run = RunDir(tmp_path)
    run.write_metrics({"val/loss": float("nan"), "val/baseline": 1 / 6, "step": 3,
                       "train/seconds_per_step": float("inf")})
    text = run.metrics.read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"val/loss": None, "val/baseline": 1 / 6, "step": 3,
                                "train/seconds_per_step": None,
                                "not_finite": {"val/loss": "nan",
                                               "train/seconds_per_step": "inf"}}
    assert finite_json({"a": 1.0}) == {"a": 1.0}  # nothing to say: no not_finite key


# --- the checkpoints of a run ---------------------------------------------------------------------
def test_default_trainer_writes_checkpoints_atomically(make_cfg):
    cfg = make_cfg()
    trainer = build(cfg.trainer, callbacks=[], logger=False)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_last_ckpt_is_written_after_every_validation_and_at_the_last_step(make_cfg, tmp_path,
                                                                          monkeypatch):
    saved = []
    real = AtomicCheckpointIO.save_checkpoint

    def save(self, checkpoint, path, storage_options=None):
        saved.append((os.path.basename(path), checkpoint["global_step"],
                      checkpoint["rnnlab"]["last_val_step"]))
        real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", save)
    train(make_cfg("trainer.max_steps=5", "task.train_batches=2", "monitor.every_n_steps=5"))
    # Validations after epochs at steps 2 and 4; the run ends at step 5, mid-epoch.
    assert saved == [("last.ckpt", 2, 2), ("last.ckpt", 4, 4), ("last.ckpt", 5, 4)]
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["last.ckpt"]


def test_a_full_disk_during_a_checkpoint_names_it_and_keeps_the_previous_one(make_cfg, tmp_path,
                                                                             monkeypatch):
    writes = []
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        writes.append(f)
        if len(writes) == 2:  # the second checkpoint: the disk fills up halfway
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpointing.torch, "save", save)
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    with pytest.raises(DiskFullError, match=f"disk full: could not write {last}"):
        train(make_cfg("trainer.max_steps=5", "task.train_batches=2", "monitor.every_n_steps=5"))
    assert torch.load(last, weights_only=False)["global_step"] == 2  # the previous one, whole
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]
    failure = json.loads((tmp_path / "run" / "failed.json").read_text())
    assert failure["error_type"] == "DiskFullError" and str(last) in failure["message"]


def test_run_checkpoint_arguments_are_checked_naming_the_key():
    with pytest.raises(ConfigError, match=r"callbacks.model_checkpoint.every_n_train_steps must "
                                          r"be null or an integer >= 1, got 0"):
        RunCheckpoint(dirpath="x", every_n_train_steps=0)
    with pytest.raises(ConfigError, match=r"callbacks.model_checkpoint.save_top_k must be an "
                                          r"integer >= -1"):
        RunCheckpoint(dirpath="x", save_top_k=-2)


def test_run_interrupted_exit_status_is_the_shells_convention():
    assert RunInterrupted(signal.SIGTERM, 5, None).exit_code == 143
    assert RunInterrupted(signal.SIGINT, 5, "x").exit_code == 130
    assert "SIGINT received: training stopped after step 5; x resumes it" == str(
        RunInterrupted(signal.SIGINT, 5, "x"))


def test_signal_handlers_are_restored_after_training(make_cfg):
    before = {s: signal.getsignal(s) for s in checkpointing.STOP_SIGNALS}
    train(make_cfg())
    assert {s: signal.getsignal(s) for s in checkpointing.STOP_SIGNALS} == before


def test_a_refused_run_leaves_no_directory(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "cell.gain=0",
                             f"paths.log_dir={tmp_path / 'outputs'}"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Config error: cell.gain" in result.stderr
    assert list((tmp_path / "outputs" / "adding" / "rnn").iterdir()) == []


def test_a_run_stopped_by_a_non_finite_loss_is_recorded_as_failed(make_cfg, tmp_path):
    with pytest.raises(FloatingPointError):
        train(make_cfg("cell.nonlinearity=identity", "cell.init=orthogonal", "cell.gain=50",
                       "task.seq_len=30"))
    run = RunDir(tmp_path / "run")
    assert run.outcome().status == "failed"
    assert run.outcome().failure["error_type"] == "FloatingPointError"


def test_outcome_files_that_cannot_be_read_are_named(tmp_path):
    run = RunDir(tmp_path)
    run.metrics.write_text('{"val/loss": 0.1')  # cut short
    with pytest.raises(rundir.RunFileError, match=rf"{run.metrics} cannot be read .*cut short"):
        run.outcome()
    run.metrics.unlink()
    run.failed.write_text("")
    with pytest.raises(rundir.RunFileError, match=rf"{run.failed} cannot be read"):
        run.outcome()
