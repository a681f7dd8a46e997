"""Shared fixtures: compose the real configs with Hydra, shrunk to run in seconds."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from rnnlab.config import CONF_DIR, compose_config
from rnnlab.model import RecurrentModel

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
assert CONF == CONF_DIR, (f"rnnlab's configs are {CONF_DIR}, not this checkout's {CONF}: "
                         "install this checkout (pip install -e .)")

# Small and quick: a few steps, tiny batches, no progress bar.
FAST = [
    "trainer.max_steps=3",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.num_sanity_val_steps=0",
    "callbacks.progress_bar=null",
    "task.batch_size=4",
    "task.train_batches=2",
    "task.val_batches=1",
    "cell.hidden_size=8",
    "model.encoder_size=4",
    "monitor.every_n_steps=1",
]

@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg(*overrides, fast=True)`` → a composed config writing under tmp_path."""

    def make(*overrides: str, fast: bool = True, output_dir: Path | None = None) -> DictConfig:
        return compose_config([*(FAST if fast else []), *overrides], output_dir or tmp_path / "run")

    yield make
    GlobalHydra.instance().clear()


@contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules in ``dtype`` (an orthogonal W made in float32 and cast is orthogonal only to
    1e-7; made in float64 it is orthogonal to 1e-16)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def float64_model(cell: dict, encoder_size: int = 4, seed: int | None = 0) -> RecurrentModel:
    """A float64 model for the adding task's sizes around the cell config ``cell``."""
    if seed is not None:
        torch.manual_seed(seed)
    with default_dtype(torch.float64):
        return RecurrentModel(cell=cell, input_size=2, output_size=1, n_out=1, loss="mse",
                              encoder_size=encoder_size)
