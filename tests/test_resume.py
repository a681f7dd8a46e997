"""A run killed between checkpoints and resumed ends exactly where the uninterrupted run ends."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rnnlab import gradflow
from rnnlab.config import ConfigError
from rnnlab.model import RecurrentModel
from rnnlab.resume import find_checkpoint
from rnnlab.train import train

from .conftest import ROOT

SETTINGS = ["trainer.max_steps=9", "task.seq_len=8", "task.batch_size=4", "cell.hidden_size=6",
            "model.encoder_size=3", "task.train_batches=4", "task.val_batches=1",
            "monitor.every_n_steps=2", "trainer.enable_progress_bar=false",
            "callbacks.model_checkpoint.every_n_train_steps=3", "trainer.num_sanity_val_steps=0"]

KILLER = '''
import os, signal
import pytorch_lightning as pl

class KillAt(pl.Callback):
    """SIGKILL this process once `step` optimizer steps are done (no clean shutdown)."""
    def __init__(self, step):
        self.step = step
    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)
'''


def run_script(tmp_path: Path, run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT / "src")])}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *SETTINGS,
                           f"hydra.run.dir={run_dir}", *overrides],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)


def digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    (tmp / "killer.py").write_text(KILLER)
    whole, killed, resumed = tmp / "whole", tmp / "killed", tmp / "resumed"
    assert run_script(tmp, whole).returncode == 0
    killing = run_script(tmp, killed, "+callbacks.killer._target_=killer.KillAt",
                         "+callbacks.killer.step=5")
    assert killing.returncode == -9, killing.stderr[-2000:]  # killed between checkpoints 3 and 6
    before = digest(killed)
    result = run_script(tmp, resumed, f"ckpt_path={killed}")
    assert result.returncode == 0, result.stderr[-3000:]
    return whole, killed, resumed, before


def test_resumed_run_ends_with_the_uninterrupted_runs_parameters(runs):
    whole, _, resumed, _ = runs
    a = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 9
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name


def test_resumed_run_holds_the_same_grad_flow_records(runs):
    whole, _, resumed, _ = runs
    a, b = gradflow.load(whole), gradflow.load(resumed)
    assert a["step"].tolist() == b["step"].tolist() == [0, 2, 4, 6, 8]
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_resumed_run_has_the_same_tensorboard_points_without_duplicates(runs):
    whole, _, resumed, _ = runs
    a, b = scalars(whole), scalars(resumed)
    assert a.keys() == b.keys()
    for tag in a:
        assert [s for s, _ in b[tag]] == [s for s, _ in a[tag]], tag  # no step twice or missing
        if tag in ("final/train_seconds_per_step", "final/train_peak_memory_mb"):
            continue  # what the machine took, not what the model computed
        np.testing.assert_allclose([v for _, v in b[tag]], [v for _, v in a[tag]], rtol=1e-6,
                                   err_msg=tag)


def test_resuming_leaves_the_killed_runs_files_untouched(runs):
    _, killed, resumed, before = runs
    assert digest(killed) == before
    assert not (killed / "metrics.json").exists()  # it never finished, and still says so


def test_load_from_checkpoint_alone_rebuilds_the_model(runs):
    whole, *_ = runs
    model = RecurrentModel.load_from_checkpoint(whole / "checkpoints" / "last.ckpt")
    state = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name])
    assert model(torch.zeros(2, 8, 2)).shape == (2, 1, 1)


def test_missing_checkpoint_names_the_key_and_the_fix(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"ckpt_path: no checkpoint at .*nowhere"):
        train(make_cfg(f"ckpt_path={tmp_path / 'nowhere'}"))


def test_corrupt_checkpoint_is_refused_before_training(make_cfg, tmp_path):
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="is not a readable rnnlab checkpoint"):
        train(make_cfg(f"ckpt_path={bad}"))
    assert not (tmp_path / "run" / "grad_flow").exists()


def test_last_finds_the_newest_run_with_a_checkpoint(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        torch.save({"global_step": 3}, tmp_path / name / "checkpoints" / "last.ckpt")
    os.utime(tmp_path / "a" / "checkpoints" / "last.ckpt", (1, 1))
    assert find_checkpoint("last", tmp_path).run_dir == (tmp_path / "b").resolve()
    with pytest.raises(ConfigError, match="ckpt_path=last: no run under"):
        find_checkpoint("last", tmp_path / "empty")
