"""Shared fixtures: compose the real configs with Hydra, shrunk to run in seconds."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
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


def exact_jacobian_norms(model: RecurrentModel, batch: dict) -> np.ndarray:
    """max over the batch of σ_max(∂z_t/∂z_{t−1}), from full Jacobians (the state's tensors
    concatenated) by torch.autograd.functional.jacobian and an SVD, one sequence at a time."""
    u = model.encoder(batch["x"]).detach()
    B, T = u.shape[:2]
    state = model.cell.init_state(B)
    norms = np.zeros(T)
    for t in range(T):
        for b in range(B):
            before = tuple(s[b:b + 1] for s in state)
            blocks = torch.autograd.functional.jacobian(
                lambda *s, t=t, b=b: model.cell.step(u[b:b + 1, t], s, None), before)
            J = torch.cat([torch.cat([blk.reshape(blk.shape[1], blk.shape[3]) for blk in row], 1)
                           for row in blocks], 0)
            norms[t] = max(norms[t], float(torch.linalg.matrix_norm(J, 2)))
        state = tuple(s.detach() for s in model.cell.step(u[:, t], state, None))
    return norms
