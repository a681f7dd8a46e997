"""The whole path: config → training → metrics.json, grad_flow records and TensorBoard events."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytorch_lightning as pl
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rnnlab import gradflow
from rnnlab.callbacks import chosen_timesteps
from rnnlab.config import claim_unique_dir
from rnnlab.train import train

from .conftest import ROOT


def test_train_writes_metrics_grad_flow_and_events(make_cfg, tmp_path):
    metrics = train(make_cfg())
    run = tmp_path / "run"
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["val/baseline"] == metrics["val/baseline"] == 1 / 6
    assert np.isfinite(saved["val/loss"]) and saved["step"] == 3
    assert gradflow.load(run)["step"].tolist() == [0, 1, 2]  # in packs: every step monitored
    assert list(run.glob("events.out.tfevents.*"))


class BatchLosses(pl.Callback):
    """Before each training step: the loss of its batch under the parameters the step starts
    from, by a forward pass of its own."""

    losses: dict[int, float] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        with torch.no_grad():
            y_hat = pl_module(batch["x"], batch.get("dt"))
            BatchLosses.losses[trainer.global_step] = float(pl_module.loss_fn(y_hat, batch["y"]))


def test_train_loss_is_logged_every_log_every_n_steps_with_its_batch_loss(make_cfg, tmp_path):
    """``train/loss`` goes to the loggers without ``self.log``: on the steps Lightning's logging
    would pick (step + 1 a multiple of trainer.log_every_n_steps), each the loss of that step's
    batch recomputed before the update, and ``epoch`` beside it."""
    BatchLosses.losses = {}
    train(make_cfg("trainer.max_steps=7", "trainer.log_every_n_steps=2",
                   "task.train_batches=100", f"+callbacks.losses._target_={__name__}.BatchLosses"))
    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0})
    events.Reload()
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == [1, 3, 5]
    np.testing.assert_allclose([e.value for e in logged],
                               [BatchLosses.losses[s] for s in (1, 3, 5)], rtol=1e-6)
    assert len(set(BatchLosses.losses.values())) == 7  # seven batches, seven losses
    assert {1, 3, 5} <= {e.step for e in events.Scalars("epoch")}


def test_the_progress_bar_shows_the_training_loss(make_cfg):
    from hydra.utils import instantiate

    from rnnlab.progress import StepProgressBar
    from rnnlab.train import build_model

    cfg = make_cfg()
    model = build_model(cfg, instantiate(cfg.task))
    trainer = pl.Trainer(logger=False, enable_checkpointing=False)
    assert "train/loss" not in StepProgressBar().get_metrics(trainer, model)
    model.train_loss = torch.tensor(0.25)
    assert StepProgressBar().get_metrics(trainer, model)["train/loss"] == 0.25


def test_monitor_runs_on_step_zero_and_every_n_steps(make_cfg, tmp_path):
    train(make_cfg("trainer.max_steps=7", "monitor.every_n_steps=3"))
    record = gradflow.load(tmp_path / "run")
    assert record["step"].tolist() == [0, 3, 6]
    assert record["dL_dz"].shape == (3, 50) and record["dL_dz"].dtype == np.float64


def test_tensorboard_scalars_equal_grad_flow_records(make_cfg, tmp_path):
    train(make_cfg("task.seq_len=12", "trainer.max_steps=4", "monitor.every_n_steps=2",
                   "monitor.timesteps=[0,3,-1]", "monitor.figure_every_n_records=2"))
    record = gradflow.load(tmp_path / "run")
    events = EventAccumulator(str(tmp_path / "run"),
                              size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    times = chosen_timesteps(12, [0, 3, -1], 0)
    assert times == [0, 3, 11]
    assert sorted(t for t in tags["scalars"] if t.startswith("dL_dz/t_")) == [
        "dL_dz/t_0000", "dL_dz/t_0003", "dL_dz/t_0011"]  # the timesteps asked for, no others
    for t in times:
        logged = events.Scalars(f"dL_dz/t_{t:04d}")
        assert [e.step for e in logged] == record["step"].tolist()
        np.testing.assert_allclose([e.value for e in logged], record["dL_dz"][:, t], rtol=1e-6)
    for key in ("log10_first_last", "decay_rate", "horizon"):
        logged = events.Scalars(f"grad_flow/{key}")
        np.testing.assert_allclose([e.value for e in logged], record[key], rtol=1e-6)
    for module in ("encoder", "cell", "decoder"):
        logged = events.Scalars(f"grad_norm/{module}")
        by_step = {e.step: e.value for e in logged}
        np.testing.assert_allclose([by_step[s] for s in record["step"]],
                                   record[f"grad_norm_{module}"], rtol=1e-6)
    assert {"train/loss", "val/loss", "val/baseline", "val/accuracy"} <= set(tags["scalars"])
    assert {"grad_flow/profile", "grad_flow/heatmap"} <= set(tags["images"])
    assert "hp_metric" not in tags["scalars"]


def test_by_default_no_per_timestep_scalars_and_no_figures(make_cfg, tmp_path):
    """The whole profiles are in the records and the Gradient flow tab: by default no
    ``<key>/t_<t>`` scalar tags and no images; the summaries stay scalars."""
    train(make_cfg("task.seq_len=12", "trainer.max_steps=2"))
    events = EventAccumulator(str(tmp_path / "run"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert not [t for t in tags["scalars"] if "/t_" in t]
    assert not tags["images"]
    assert {"grad_flow/decay_rate", "grad_flow/log10_first_last", "grad_flow/horizon",
            "grad_flow/jacobian_rate"} <= set(tags["scalars"])
    assert not (tmp_path / "run" / "grad_flow" / "figures").exists()


def test_claimed_run_directories_are_never_reused(tmp_path):
    candidate = str(tmp_path / "outputs" / "adding" / "rnn" / "2026-01-01_00-00-00")
    claimed = [claim_unique_dir(candidate) for _ in range(3)]
    assert claimed == [candidate, candidate + "_1", candidate + "_2"]


def run_script(*overrides: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *overrides],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_train_script_runs_and_prints_run_directory(tmp_path):
    result = run_script("trainer.max_steps=2", "task.seq_len=8", "task.train_batches=2",
                        "task.val_batches=1", "trainer.enable_progress_bar=false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run,) = (tmp_path / "outputs" / "adding" / "rnn").iterdir()
    assert (run / "metrics.json").is_file() and (run / "grad_flow").is_dir()
    assert f"Run directory: {run}" in result.stdout
    assert f"rnnlab tensorboard {run}" in result.stdout


def test_train_script_never_reuses_a_run_directory(tmp_path):
    """Two runs resolving the same directory name (as in the same second) get two directories."""
    same = "hydra.run.dir=${unique_dir:outputs/same}"
    for _ in range(2):
        result = run_script(same, "trainer.max_steps=1", "task.seq_len=4", "task.train_batches=1",
                            "task.val_batches=1", "trainer.enable_progress_bar=false", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    runs = sorted(p.name for p in (tmp_path / "outputs").iterdir())
    assert runs == ["same", "same_1"]
    for run in runs:
        assert (tmp_path / "outputs" / run / "metrics.json").is_file()
