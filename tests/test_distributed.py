"""Data-parallel training (2 CPU processes, gloo) logs the profile of the global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import torch

from rnnlab import gradflow
from rnnlab.records import read_records, record_files
from rnnlab.tasks import Adding
from rnnlab.train import train

from .conftest import ROOT

SETTINGS = ["trainer.max_steps=3", "task.seq_len=10", "task.batch_size=8", "cell.hidden_size=8",
            "model.encoder_size=4", "monitor.every_n_steps=1", "task.train_batches=5",
            "task.val_batches=2", "trainer.enable_progress_bar=false",
            "monitor.param_contributions=true"]


def test_ddp_profile_equals_the_single_process_profile_on_the_same_global_batch(
        make_cfg, tmp_path):
    ddp_dir = tmp_path / "ddp"
    # The spectrum of every sequence (each process measures its 4, the single process all 8):
    # the global batch's mean exponents and predicted profile from the processes' own.
    spectrum = ["monitor.lyapunov_k=2", "monitor.lyapunov_sequences=8"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "trainer=ddp", *SETTINGS,
         *spectrum, f"hydra.run.dir={ddp_dir}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "train_ddp_process_1.log" in os.listdir(ddp_dir)  # really two processes

    train(make_cfg(*SETTINGS, *spectrum, fast=False, output_dir=tmp_path / "single"))
    ddp, single = gradflow.load(ddp_dir), gradflow.load(tmp_path / "single")
    assert ddp["step"].tolist() == single["step"].tolist() == [0, 1, 2]
    for key in ("dL_dz", "dL_dW_encoder", "dL_dW_cell", "dL_dW_decoder", "grad_norm_cell",
                "loss"):
        np.testing.assert_allclose(ddp[key], single[key], rtol=2e-5, err_msg=key)
    # Power iteration (10 steps from a random start that depends on the batch shape) is a lower
    # bound within a fraction of a percent here; the max over processes must land as close.
    np.testing.assert_allclose(ddp["jacobian_norm"], single["jacobian_norm"], rtol=1e-2)
    for key in ("lyapunov", "lyapunov_prediction", "predicted_decay_rate"):
        assert np.isfinite(single[key][0]).all(), key  # measured at step 0
        np.testing.assert_allclose(ddp[key], single[key], rtol=1e-4, atol=1e-7, err_msg=key)
    # only rank 0 wrote: one record per step, one metrics file, one event directory
    assert sum(len(read_records(path)) for path in record_files(ddp_dir / "grad_flow")) == 3
    assert (ddp_dir / "metrics.json").is_file() and list(ddp_dir.glob("events.out.tfevents.*"))


class PoisonedAdding(Adding):
    """The adding task with a nan input in the last sequence of about 30% of the batches: with
    two processes, only process 1 (the second half of the rows) sees it."""

    def generate(self, batch_size: int, generator: torch.Generator) -> dict:
        batch = super().generate(batch_size, generator)
        if poisoned(generator):
            batch["x"][-1, 0, 0] = float("nan")
        return batch


def poisoned(generator: torch.Generator) -> bool:
    return bool(torch.rand((), generator=generator) < 0.3)


def test_a_nonfinite_loss_on_one_process_skips_the_step_on_every_process(tmp_path):
    from rnnlab.tasks.base import batch_generator

    def poisoned_batch(index: int) -> bool:
        generator = batch_generator(0, "train", index)
        Adding(seq_len=10, batch_size=8).generate(8, generator)  # what the task draws first
        return poisoned(generator)

    assert any(poisoned_batch(i) for i in range(4))  # some of the first batches are poisoned
    run = tmp_path / "ddp"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train.py"), "trainer=ddp", *SETTINGS,
         f"task._target_={__name__}.PoisonedAdding", "monitor.on_nonfinite=skip",
         "trainer.max_steps=4", f"hydra.run.dir={run}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr[-3000:]  # no process waited forever
    logs = result.stdout + result.stderr + "".join(p.read_text() for p in run.glob("*.log"))
    assert "non-finite training loss on another process" in logs  # process 0 skipped too
    assert "non-finite training loss nan" in logs  # process 1, which saw it
    assert json.loads((run / "metrics.json").read_text())["step"] == 4
