"""Experiment presets and the debug group: every preset composes and every job of its sweep builds.

A preset that names a cell or task whose YAML does not exist yet is skipped with the reason, so
its tests run the moment that cell or task lands.
"""

from __future__ import annotations

import itertools
import subprocess
import sys

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml
from omegaconf import OmegaConf

from rnnlab import gradflow
from rnnlab.config import validate
from rnnlab.tasks.base import batch_generator
from rnnlab.train import build, build_model, train

from .conftest import CONF, ROOT

PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def sweep_params(preset: str) -> dict[str, str]:
    params = OmegaConf.load(CONF / "experiment" / f"{preset}.yaml").get("hydra", {})
    return dict((params.get("sweeper") or {}).get("params") or {})


def referenced_options(group: str, option: str, sweep: bool = True) -> set[tuple[str, str]]:
    """(group, option) pairs a config chooses in its defaults (and its sweep), recursively."""
    path = CONF / group / f"{option}.yaml"
    if not path.is_file():
        return set()
    config = yaml.safe_load(path.read_text()) or {}
    chosen: set[tuple[str, str]] = set()
    for entry in config.get("defaults", []):
        if not isinstance(entry, dict):
            continue
        ((key, value),) = entry.items()
        key = key.removeprefix("override ").split("@")[0]
        chosen.add((key[1:] if key.startswith("/") else f"{group}/{key}", str(value)))
    params = sweep_params(option) if sweep and group == "experiment" else {}
    for key, values in params.items():
        key = key.split("@")[0]
        if (CONF / key).is_dir():
            chosen |= {(key, value.strip()) for value in str(values).split(",")}
    nested = set()
    for sub_group, sub_option in chosen:
        if sub_group.startswith("experiment/"):
            nested |= referenced_options(sub_group, sub_option, sweep)
    return chosen | nested


def skip_unless_available(preset: str, sweep: bool = True) -> None:
    missing = sorted(f"{g}/{o}.yaml" for g, o in referenced_options("experiment", preset, sweep)
                     if not (CONF / g / f"{o}.yaml").is_file())
    if missing:
        pytest.skip(f"experiment={preset} needs conf/{', conf/'.join(missing)}, not here yet")


def sweep_jobs(preset: str) -> list[list[str]]:
    """The override lists of the preset's multirun: the product of its comma-separated params."""
    axes = [[f"{key}={value.strip()}" for value in str(values).split(",")]
            for key, values in sweep_params(preset).items()]
    return [list(job) for job in itertools.product(*axes)]


def test_there_are_presets():
    assert {"gain_sweep", "cells_long_range", "ode_solvers", "urnn_figure"} <= set(PRESETS)


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_header_says_what_it_shows_how_long_and_how_to_run_it(preset):
    lines = (CONF / "experiment" / f"{preset}.yaml").read_text().splitlines()
    assert lines[0] == "# @package _global_"
    header = "\n".join(line for line in itertools.takewhile(lambda x: x.startswith("#"), lines))
    assert "2 CPU cores" in header
    assert f"python scripts/train.py -m experiment={preset}" in header


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_composes_with_cfg_job(preset, tmp_path):
    skip_unless_available(preset, sweep=False)
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"),
                             f"experiment={preset}", "--cfg", "job"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    composed = yaml.safe_load(result.stdout)
    expected = OmegaConf.load(CONF / "experiment" / f"{preset}.yaml")
    assert composed["trainer"]["max_steps"] == expected.trainer.max_steps
    assert composed["monitor"]["every_n_steps"] == expected.monitor.every_n_steps


@pytest.mark.parametrize("preset", PRESETS)
def test_every_job_of_a_preset_sweep_builds_its_task_and_model(preset, make_cfg):
    skip_unless_available(preset)
    jobs = sweep_jobs(preset)
    assert len(jobs) >= 2, f"experiment={preset} sweeps nothing"
    for job in jobs:
        cfg = make_cfg(f"experiment={preset}", *job, fast=False)
        validate(cfg)
        task = build(cfg.task)
        model = build_model(cfg, task)
        assert model.cell.hidden_size == cfg.cell.hidden_size, job


def test_gain_sweep_covers_linear_and_tanh_rnn_over_gains_around_one():
    params = sweep_params("gain_sweep")
    assert set(params["cell.nonlinearity"].split(",")) == {"identity", "tanh"}
    gains = [float(g) for g in params["cell.gain"].split(",")]
    assert min(gains) == 0.8 and max(gains) == 1.2 and 1.0 in gains


def test_cells_long_range_reads_T_as_seq_len_for_adding(make_cfg):
    cfg = make_cfg("experiment=cells_long_range", "T=200", fast=False)
    assert cfg.task.seq_len == 200 and cfg.task._target_.endswith("Adding")


def test_urnn_figure_records_the_profile_at_initialisation_and_after_100_updates(make_cfg):
    cfg = make_cfg("experiment=urnn_figure", fast=False)
    monitored = [s for s in range(cfg.trainer.max_steps) if s % cfg.monitor.every_n_steps == 0]
    assert monitored == [0, 100]
    assert cfg.task._target_.endswith("Adding")


# --- the debug group -----------------------------------------------------------------------------
def test_debug_fast_dev_run_trains_one_step_without_tensorboard(make_cfg, tmp_path):
    metrics = train(make_cfg("debug=fast_dev_run"))
    assert metrics["step"] == 1
    assert gradflow.load(tmp_path / "run")["step"].tolist() == [0]
    assert not list((tmp_path / "run").glob("events.out.tfevents.*"))


@pytest.mark.filterwarnings("ignore:You requested to overfit")
def test_debug_overfit_trains_on_the_first_training_batch_every_step(make_cfg, tmp_path):
    # With a negligible learning rate the loss of every step is the loss of batch 0.
    cfg = make_cfg("debug=overfit", "model.optimizer.lr=1e-12", "trainer.max_steps=3")
    train(cfg)
    recorded = gradflow.load(tmp_path / "run")["loss"]

    pl.seed_everything(cfg.seed)  # rebuild the untrained model as train() does
    task = build(cfg.task)
    model = build_model(cfg, task)
    first = task.generate(task.batch_size, batch_generator(task.seed, "train", 0))
    second = task.generate(task.batch_size, batch_generator(task.seed, "train", 1))
    with torch.no_grad():
        expected = model.loss_fn(model(first["x"]), first["y"]).item()
        other = model.loss_fn(model(second["x"]), second["y"]).item()
    assert not np.isclose(expected, other, rtol=1e-3)  # batches differ, so the test can fail
    np.testing.assert_allclose(recorded, [expected] * 3, rtol=1e-5)


def test_debug_anomaly_turns_on_autograd_anomaly_detection_while_training(make_cfg):
    cfg = make_cfg("debug=anomaly", "trainer.max_steps=1")
    seen = []

    class AnomalyProbe(pl.Callback):
        def on_train_batch_start(self, *args) -> None:
            seen.append(torch.is_anomaly_enabled())

    task = build(cfg.task)
    trainer = build(cfg.trainer, callbacks=[AnomalyProbe()], logger=False)
    trainer.fit(build_model(cfg, task), datamodule=task)
    assert seen == [True]
    assert not torch.is_anomaly_enabled()
