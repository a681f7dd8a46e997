"""Shared fixtures: compose the real configs with Hydra, shrunk to run in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from rnnlab.config import register_resolvers

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

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

register_resolvers()


def compose_config(overrides: list[str], output_dir: Path, config_name: str = "train"
                   ) -> DictConfig:
    """Compose ``conf/<config_name>.yaml`` as `scripts/train.py` would, writing into output_dir."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name, overrides=overrides, return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    """``make_cfg(*overrides, fast=True)`` → a composed config writing under tmp_path."""

    def make(*overrides: str, fast: bool = True, output_dir: Path | None = None) -> DictConfig:
        return compose_config([*(FAST if fast else []), *overrides], output_dir or tmp_path / "run")

    yield make
    GlobalHydra.instance().clear()
