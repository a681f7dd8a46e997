"""`train(cfg)`: build everything from a composed config, fit, and return the final metrics."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import ProgressBar
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

from rnnlab.callbacks import GradFlowCallback
from rnnlab.config import ConfigError, check_writable, validate, validate_timesteps
from rnnlab.cost import RunCost
from rnnlab.loggers import adapters
from rnnlab.model import RecurrentModel
from rnnlab.resume import carry_history, find_checkpoint
from rnnlab.rundir import RunDir

log = logging.getLogger(__name__)


def build(node: DictConfig, **kwargs: Any) -> Any:
    """`instantiate`, surfacing a component's `ConfigError` instead of Hydra's wrapper."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        while isinstance(cause, InstantiationException):  # nested targets (the model's cell)
            cause = cause.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise


def build_model(cfg: DictConfig, task) -> RecurrentModel:
    cell = OmegaConf.to_container(cfg.cell, resolve=True)
    return build(cfg.model, cell=cell, **task.describe(), _convert_="all", _recursive_=False)


def train(cfg: DictConfig) -> dict[str, float]:
    """Validate, seed, build task → model → callbacks → trainer, fit, write ``metrics.json``.

    Returns the final validation metrics (``val/loss``, ``val/baseline``, the task's metrics).
    ``flush_denormal`` holds for the run only (PyTorch's default, off, is restored after).
    """
    validate(cfg)
    torch.set_flush_denormal(cfg.get("flush_denormal", False))
    try:
        return fit(cfg)
    finally:
        torch.set_flush_denormal(False)


def fit(cfg: DictConfig) -> dict[str, float]:
    """`train` after validation."""
    output_dir = Path(cfg.paths.output_dir)
    check_writable(output_dir)
    checkpoint = (find_checkpoint(str(cfg.ckpt_path), output_dir.parent)
                  if cfg.get("ckpt_path") else None)
    pl.seed_everything(cfg.seed, workers=True)

    task = build(cfg.task)
    if cfg.get("monitor"):
        validate_timesteps(cfg.monitor.get("timesteps"), task.seq_len)
    model = build_model(cfg, task)
    callbacks = [build(node) for node in (cfg.get("callbacks") or {}).values() if node]
    if not cfg.trainer.get("enable_progress_bar", True):  # the flag wins over a bar callback
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if cfg.get("monitor"):
        callbacks.append(build(cfg.monitor))
    loggers = [build(node) for node in (cfg.get("logger") or {}).values() if node]
    trainer: pl.Trainer = build(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    monitor = next((c for c in callbacks if isinstance(c, GradFlowCallback)), None)
    if monitor is not None:
        monitor.check_memory(model, task.seq_len, trainer.strategy.root_device)
    if checkpoint is not None and trainer.is_global_zero:
        board = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        carry_history(checkpoint, output_dir, monitor.dirpath if monitor else None,
                      Path(board.log_dir) if board else None)
        log.info("resuming %s at step %d", checkpoint.path, checkpoint.step)
    trainer.fit(model, datamodule=task, ckpt_path=checkpoint.path if checkpoint else None)
    if trainer.interrupted:
        log.warning("training was interrupted at step %d", trainer.global_step)
    if model.last_val_step != trainer.global_step:  # validate the final weights once
        trainer.validate(model, datamodule=task, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    metrics["val/baseline"] = float(task.baseline)  # exact, not the float32 that was logged
    metrics["step"] = trainer.global_step
    cost = next((c for c in callbacks if isinstance(c, RunCost)), None)
    if cost is not None:
        metrics.update(cost.metrics(model.cell_totals))
    if trainer.is_global_zero:  # only rank 0 writes
        output_dir.mkdir(parents=True, exist_ok=True)
        RunDir(output_dir).metrics.write_text(json.dumps(metrics, indent=2, allow_nan=True)
                                              + "\n")
        log_hparams(trainer, cfg, metrics, monitor)
    return metrics


def log_hparams(trainer: pl.Trainer, cfg: DictConfig, metrics: dict[str, float],
                monitor: GradFlowCallback | None) -> None:
    """The flattened config next to the final metrics, through every logger (TensorBoard's
    HPARAMS tab shows them side by side).

    The metrics are logged as ``final/<name>`` at the last step: ``final/val_loss`` … from
    ``metrics``, and the summary scalars of the latest gradient-flow record.
    """
    final = {f"final/{k.replace('/', '_')}": v for k, v in metrics.items() if k != "step"}
    record = monitor.last_record if monitor is not None else None
    if record is not None:
        final.update({f"final/{tag.removeprefix('grad_flow/')}": value
                      for tag, value in record.scalars().items() if tag.startswith("grad_flow/")})
    config = cfg.copy()
    with open_dict(config):
        config.pop("hydra", None)  # resolving it would claim new run directories
    params = OmegaConf.to_container(config, resolve=True)
    for adapter in adapters(trainer):
        adapter.hparams(params, final, trainer.global_step)
        adapter.finish()


@rank_zero_only
def report_finish(cfg: DictConfig, metrics: dict[str, float]) -> None:
    """Tell the user where the run is and how to look at it."""
    output_dir = Path(cfg.paths.output_dir)
    loss, baseline = metrics.get("val/loss", math.nan), metrics.get("val/baseline", math.nan)
    print(f"\nval/loss {loss:.4g} (memoryless baseline {baseline:.4g}) after "
          f"{metrics.get('step', 0)} steps")
    print(f"Run directory: {output_dir}")
    print(f"TensorBoard:   tensorboard --logdir {output_dir}")
