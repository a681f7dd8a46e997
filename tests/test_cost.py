"""RunCost: seconds per training step, peak memory and a cell's counts per step in metrics.json."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from rnnlab.cost import STATUS, RunCost
from rnnlab.report import load_run
from rnnlab.train import train

ON_LINUX = STATUS.exists()


class Sleeps(pl.Callback):
    """Sleeps a known time at the end of every training step and at the start of every
    validation, counting both."""

    step_seconds, validation_seconds = 0.05, 0.3
    instances: list[Sleeps] = []

    def __init__(self):
        self.steps = self.validations = 0
        Sleeps.instances.append(self)

    def on_train_start(self, trainer, pl_module):
        self.train_start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.train_seconds = time.perf_counter() - self.train_start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.step_seconds)
        self.steps += 1

    def on_validation_start(self, trainer, pl_module):
        time.sleep(self.validation_seconds)
        self.validations += 1


class TouchMemory(pl.Callback):
    """On the second step, fills and frees a 256 MiB tensor; records the RSS at the start."""

    mib = 256
    instances: list[TouchMemory] = []

    def __init__(self):
        TouchMemory.instances.append(self)

    def on_train_start(self, trainer, pl_module):
        self.rss_at_start = next(int(line.split()[1]) / 1024 for line in
                                 STATUS.read_text().splitlines() if line.startswith("VmRSS:"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 1:
            block = torch.ones(self.mib * 2**20 // 4)  # written, so resident
            del block


def metrics_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_seconds_per_step_holds_each_steps_work_and_leaves_out_validation(make_cfg, tmp_path):
    Sleeps.instances.clear()
    metrics = train(make_cfg("trainer.max_steps=4",  # an epoch is 2 steps, validated at its end
                             f"+callbacks.sleeps._target_={__name__}.Sleeps"))
    (sleeps,) = Sleeps.instances
    assert sleeps.steps == 4 and sleeps.validations == 2
    steps_total = 4 * metrics["train/seconds_per_step"]
    assert steps_total >= 4 * Sleeps.step_seconds  # a callback's work is part of its step
    # Steps and validations are disjoint parts of training: had the 0.6 s of validation been
    # counted in the steps, the two would add up to more than training took.
    validation_total = sleeps.validations * Sleeps.validation_seconds
    assert steps_total + validation_total <= sleeps.train_seconds + 0.1
    assert metrics_of(tmp_path / "run")["train/seconds_per_step"] == \
        metrics["train/seconds_per_step"]


@pytest.mark.skipif(not ON_LINUX, reason="reads /proc/self/status")
def test_peak_memory_holds_what_a_step_made_resident(make_cfg, tmp_path):
    TouchMemory.instances.clear()
    metrics = train(make_cfg(f"+callbacks.touch._target_={__name__}.TouchMemory"))
    (touch,) = TouchMemory.instances
    assert metrics["train/peak_memory_mb"] >= touch.rss_at_start + TouchMemory.mib - 1


@pytest.mark.skipif(not ON_LINUX, reason="resets the peak through /proc/self/clear_refs")
def test_peak_memory_of_a_run_is_its_own_not_the_processes_earlier_peak(make_cfg):
    block = torch.ones(512 * 2**20 // 4)  # an earlier peak of this process, 512 MiB above now
    del block
    metrics = train(make_cfg())
    rss_now = next(int(line.split()[1]) / 1024 for line in STATUS.read_text().splitlines()
                   if line.startswith("VmRSS:"))
    assert metrics["train/peak_memory_mb"] < rss_now + 256


@pytest.mark.parametrize("solver, per_interval", [("manual_euler", 1), ("rk4", 4)])
def test_nfe_per_step_is_the_solvers_evaluations_per_interval_times_T(make_cfg, solver,
                                                                      per_interval):
    metrics = train(make_cfg("cell=node", f"cell.solver={solver}", "task.seq_len=6",
                             "monitor.every_n_steps=2"))
    assert metrics["cell/nfe_forward"] == per_interval * 6
    assert metrics["cell/nfe_backward"] == 0


def test_adjoint_reports_evaluations_in_its_backward_pass(make_cfg):
    metrics = train(make_cfg("cell=node", "cell.solver=euler", "cell.adjoint=true",
                             "task.seq_len=6"))
    assert metrics["cell/nfe_forward"] == 6
    assert metrics["cell/nfe_backward"] == 6  # euler's adjoint: one evaluation per interval


def test_cells_without_diagnostics_report_only_time_and_memory(make_cfg):
    metrics = train(make_cfg("cell=gru"))
    assert {"train/seconds_per_step", "train/peak_memory_mb"} <= set(metrics)
    assert not any(key.startswith("cell/") for key in metrics)


def test_report_table_shows_the_runs_cost(make_cfg, tmp_path):
    train(make_cfg("cell=node", "cell.solver=rk4", "task.seq_len=5"))
    row = load_run(tmp_path / "run", "run").final()
    saved = metrics_of(tmp_path / "run")
    assert row["s/step"] == saved["train/seconds_per_step"] > 0
    assert row["peak MB"] == saved["train/peak_memory_mb"] > 0
    assert row["NFE fwd"] == 20 and row["NFE bwd"] == 0


def test_without_steps_there_is_no_cost():
    assert RunCost().metrics({"nfe_forward": 3.0}) == {}
