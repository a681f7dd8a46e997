"""Every YAML in conf/ composes, and every cell × task pair trains a few steps."""

from __future__ import annotations

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rnnlab import gradflow
from rnnlab.train import train

from .conftest import CONF

GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")
OPTIONS = [(g, p.stem) for g in GROUPS for p in sorted((CONF / g).glob("*.yaml"))]
CELLS = sorted(p.stem for p in (CONF / "cell").glob("*.yaml"))
TASKS = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_config_option_composes(make_cfg, group, option):
    cfg = make_cfg(f"{group}={option}", fast=False)
    assert cfg.seed is not None and cfg.cell._target_ and cfg.task._target_


def test_every_yaml_starts_with_a_comment_saying_what_it_is():
    for path in CONF.rglob("*.yaml"):
        first = path.read_text().lstrip().splitlines()[0]
        assert first.startswith("#"), f"{path.relative_to(CONF)} has no header comment"


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("cell", CELLS)
def test_every_cell_trains_on_every_task(make_cfg, tmp_path, cell, task):
    metrics = train(make_cfg(f"cell={cell}", f"task={task}", "trainer.max_steps=2"))
    assert metrics["step"] == 2 and "val/loss" in metrics and "val/baseline" in metrics
    record = gradflow.load(tmp_path / "run")
    assert record["step"].tolist() == [0, 1]
    assert (record["dL_dz"] > 0).all()
    events = EventAccumulator(str(tmp_path / "run"))
    events.Reload()
    assert "grad_flow/decay_rate" in events.Tags()["scalars"]
