"""The baselines experiment: tanh RNN and LSTM × adding (T = 100) and copy (delay 100)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from .conftest import ROOT


def test_baselines_experiment_sweeps_both_cells_over_both_tasks(make_cfg):
    cfg = make_cfg("experiment=baselines", fast=False)
    params = cfg.hydra.sweeper.params
    assert params.cell.split(",") == ["rnn", "lstm"]
    assert params["experiment/long_range_task@_global_"].split(",") == ["adding", "copy"]


def test_baselines_tasks_are_adding_at_t_100_and_copy_at_delay_100(make_cfg):
    job = "experiment/long_range_task@_global_"
    adding = make_cfg("experiment=baselines", f"{job}=adding", fast=False).task
    copy = make_cfg("experiment=baselines", f"{job}=copy", fast=False).task
    assert adding._target_.endswith("Adding") and adding.seq_len == 100
    assert copy._target_.endswith("Copy") and copy.delay == 100


def test_baselines_multirun_writes_loss_and_baseline_for_each_job(tmp_path):
    overrides = ["hydra.sweeper.params.cell=rnn", "trainer.max_steps=2", "task.batch_size=4",
                 "task.val_batches=1", "cell.hidden_size=8", "monitor.every_n_steps=1",
                 "callbacks.progress_bar=null", "trainer.enable_model_summary=false",
                 f"hydra.sweep.dir={tmp_path}"]
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "-m",
                             "experiment=baselines", *overrides], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    jobs = sorted((p for p in tmp_path.iterdir() if p.is_dir()), key=lambda p: p.name)
    baselines = [json.loads((job / "metrics.json").read_text())["val/baseline"] for job in jobs]
    assert baselines == [1 / 6, 10 * math.log(8) / 120]
