"""The Task contract, for every task in conf/task/ (a new task is tested the moment it exists)."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from rnnlab.tasks import Task

from .conftest import CONF

TASKS = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))


def make_task(name: str, **overrides) -> Task:
    cfg = OmegaConf.load(CONF / "task" / f"{name}.yaml")
    cfg.seed = 3
    cfg.batch_size = 5
    cfg.update(overrides)
    return instantiate(cfg)


def batches(loader, n):
    out = []
    for i, batch in enumerate(loader):
        if i == n:
            break
        out.append(batch)
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", TASKS)
def test_task_batches_follow_the_declared_shapes(name):
    task = make_task(name)
    batch = next(iter(task.train_dataloader()))
    B, T = 5, task.seq_len
    assert batch["x"].shape == (B, T, task.input_size) and batch["x"].dtype == torch.float32
    if task.loss == "mse":
        assert batch["y"].shape == (B, task.n_out, task.output_size)
    else:
        assert batch["y"].shape == (B, task.n_out) and batch["y"].dtype == torch.long
        read = batch["y"][batch["y"] != -100]
        assert ((read >= 0) & (read < task.output_size)).all()
    if "dt" in batch:
        assert batch["dt"].shape == (B, T) and (batch["dt"] > 0).all()
    assert task.baseline > 0


@pytest.mark.parametrize("name", TASKS)
def test_task_data_are_deterministic_from_the_seed(name):
    first = batches(make_task(name).train_dataloader(), 3)
    again = batches(make_task(name).train_dataloader(), 3)
    for a, b in zip(first, again):
        assert_same(a, b)
    assert not torch.equal(first[0]["x"], first[1]["x"])
    other_seed = make_task(name)
    other_seed.seed = 4
    assert not torch.equal(first[0]["x"], next(iter(other_seed.train_dataloader()))["x"])


@pytest.mark.parametrize("name", TASKS)
def test_task_batches_do_not_depend_on_the_number_of_workers(name):
    serial = batches(make_task(name, num_workers=0).train_dataloader(), 4)
    parallel = batches(make_task(name, num_workers=2).train_dataloader(), 4)
    for a, b in zip(serial, parallel):
        assert_same(a, b)


@pytest.mark.parametrize("name", TASKS)
def test_task_draws_fresh_training_data_each_epoch_and_a_fixed_validation_set(name):
    task = make_task(name, train_batches=2, val_batches=2)
    loader = task.train_dataloader()
    epoch0 = batches(loader, 2)
    loader.sampler.set_epoch(1)
    epoch1 = batches(loader, 2)
    assert not torch.equal(epoch0[0]["x"], epoch1[0]["x"])
    val = batches(task.val_dataloader(), 2)
    for a, b in zip(val, batches(make_task(name, train_batches=2, val_batches=2)
                                 .val_dataloader(), 2)):
        assert_same(a, b)
    assert not any(torch.equal(v["x"], t["x"]) for v in val for t in epoch0 + epoch1)
