"""`train(cfg)`: build everything from a composed config, fit, and return the final metrics."""

from __future__ import annotations

import logging
import math
import signal
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
from pytorch_lightning.utilities.exceptions import SIGTERMException

from rnnlab.callbacks import GradFlowCallback
from rnnlab.checkpointing import RunInterrupted
from rnnlab.config import ConfigError, check_writable, validate, validate_timesteps
from rnnlab.cost import RunCost
from rnnlab.loggers import adapters
from rnnlab.malloc import tune_malloc
from rnnlab.model import RecurrentModel
from rnnlab.resume import (
    Checkpoint,
    carry_history,
    changed_settings,
    find_checkpoint,
    record_resume,
    requeued_checkpoint,
)
from rnnlab.rundir import CONFIG_FILE, SKIPPED, TRAINED, RunDir, atomic_write

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
    ``flush_denormal`` holds for the run only (PyTorch's default, off, is restored after);
    ``malloc`` sets glibc's malloc for the rest of the process (`tune_malloc`).
    How a run ends is written into its directory (`rnnlab.rundir`): ``metrics.json``,
    ``failed.json`` (an error during training; its traceback) or ``interrupted.json`` (a
    signal; the checkpoint that resumes it). A ConfigError is raised before anything is built.
    """
    validate(cfg)
    run = RunDir(cfg.paths.output_dir)
    checkpoint = checkpoint_to_resume(cfg, run)
    tune_malloc(cfg.get("malloc", "tuned"))
    torch.set_flush_denormal(cfg.get("flush_denormal", False))
    try:
        return fit(cfg, checkpoint)
    except RunInterrupted as stop:
        if rank_zero_only.rank == 0:
            run.write_interruption(stop.signal_name, stop.step, stop.checkpoint)
        raise
    except ConfigError:
        raise  # refused before training
    except Exception as error:
        if rank_zero_only.rank == 0:
            record_failure(run, error)
        raise
    finally:
        torch.set_flush_denormal(False)


def checkpoint_to_resume(cfg: DictConfig, run: RunDir) -> Checkpoint | None:
    """The checkpoint this run continues from, its settings checked against the new ones; the
    run directory must not hold another run (a resumed run writes into a fresh one)."""
    requeued = requeued_checkpoint(run)
    if requeued is not None:  # a SLURM job requeued by Lightning continues in its directory
        return requeued
    held = [name for name in run.run_files() if name != str(CONFIG_FILE)]
    if held and rank_zero_only.rank == 0:  # other processes of a DDP run find rank 0's files
        raise ConfigError(f"paths.output_dir: {run.path} holds another run ({', '.join(held)}); "
                          "a run never writes into another's directory: choose a new one "
                          "(omit hydra.run.dir, or set hydra.run.dir=...), or resume that run "
                          f"into a new directory with ckpt_path={run.path}")
    if not cfg.get("ckpt_path"):
        return None
    checkpoint = find_checkpoint(str(cfg.ckpt_path), run.path.parent)
    if checkpoint.run_dir == run.path.resolve():
        raise ConfigError(f"ckpt_path: {checkpoint.path} is in this run's own directory; a "
                          "resumed run writes into a new one (set hydra.run.dir=... or omit it)")
    checkpoint.changes = changed_settings(checkpoint, cfg)  # refuses a change of what is trained
    return checkpoint


def record_failure(run: RunDir, error: BaseException) -> None:
    """``failed.json``, unless the disk that made the run fail cannot take it either."""
    try:
        run.write_failure(error)
    except OSError as write_error:
        log.error("could not write %s (%s) after the run failed", run.failed, write_error)


def fit(cfg: DictConfig, checkpoint: Checkpoint | None = None) -> dict[str, float]:
    """`train` after validation: build, check what only the built objects can tell, train."""
    run = RunDir(cfg.paths.output_dir)
    output_dir = run.path
    check_writable(output_dir)
    check_optimizer(OmegaConf.to_container(cfg.model.optimizer, resolve=True))
    pl.seed_everything(cfg.seed, workers=True)

    task = build(cfg.task)
    if cfg.get("monitor"):
        validate_timesteps(cfg.monitor.get("timesteps"), task.seq_len)
    model = build_model(cfg, task)
    check_cell_output(model, cfg.cell.get("_target_"))
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
    if trainer.is_global_zero:
        save_run_config(cfg, run)
    resumed_elsewhere = checkpoint is not None and checkpoint.run_dir != output_dir.resolve()
    if resumed_elsewhere and trainer.is_global_zero:
        record_resume(run, checkpoint, checkpoint.changes)
        board = next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
        carry_history(checkpoint, output_dir, monitor.dirpath if monitor else None,
                      Path(board.log_dir) if board else None)
    if checkpoint is not None:
        log.info("resuming %s at step %d", checkpoint.path, checkpoint.step)
        if trainer.is_global_zero and run.interrupted.is_file():  # running again (requeued)
            run.interrupted.unlink()
    try:
        trainer.fit(model, datamodule=task, ckpt_path=checkpoint.path if checkpoint else None)
    except SIGTERMException:  # Lightning's own handler: a SIGTERM before training started
        raise RunInterrupted(signal.SIGTERM, trainer.global_step,
                             str(run.checkpoint) if run.checkpoint.is_file() else None) from None
    if trainer.interrupted:
        log.warning("training was interrupted at step %d", trainer.global_step)
    if model.last_val_step != trainer.global_step:  # validate the final weights once
        trainer.validate(model, datamodule=task, verbose=False)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    metrics["val/baseline"] = float(task.baseline)  # exact, not the float32 that was logged
    metrics["step"] = trainer.global_step
    if monitor is not None:  # a run whose every step was skipped never moved its parameters
        trained = trainer.global_step - (checkpoint.step if checkpoint is not None else 0)
        metrics[SKIPPED] = float(monitor.policy.skipped_steps)
        metrics[TRAINED] = float(trained)
        if trained and monitor.policy.skipped_steps >= trained:
            log.warning("the parameters never moved: every one of the %d steps trained had "
                        "non-finite values and was dropped (monitor.on_nonfinite=skip)", trained)
    cost = next((c for c in callbacks if isinstance(c, RunCost)), None)
    if cost is not None:
        metrics.update(cost.metrics(model.cell_totals))
    if trainer.is_global_zero:  # only rank 0 writes
        run.write_metrics(metrics)
        log_hparams(trainer, cfg, metrics, monitor)
    return metrics


def save_run_config(cfg: DictConfig, run: RunDir) -> None:
    """``.hydra/config.yaml`` as Hydra writes it, for a run composed without Hydra's runner
    (`compose_config`): a resumed run's settings are checked against it."""
    if run.config.is_file():
        return
    config = cfg.copy()
    with open_dict(config):
        config.pop("hydra", None)
    text = OmegaConf.to_yaml(config)
    atomic_write(run.config, lambda f: f.write(text.encode()))


def check_optimizer(optimizer: dict[str, Any]) -> None:
    """Build the torch optimizer on one parameter and take a step, so that a value it rejects
    (``betas=[0.9]``, a negative momentum) is a ConfigError naming the key before training."""
    from rnnlab.model import OPTIMIZERS, check_optimizer_keys

    name = optimizer.get("name")
    if name not in OPTIMIZERS:
        return  # the model names the choices
    check_optimizer_keys(optimizer)
    kwargs = {k: v for k, v in optimizer.items() if k != "name"}

    def step(**arguments: Any) -> None:
        parameter = torch.zeros(2, requires_grad=True)
        parameter.grad = torch.ones(2)
        OPTIMIZERS[name]([parameter], **arguments).step()

    try:
        step(**kwargs)
    except Exception as error:
        culprit = next((k for k in kwargs if k != "lr" and fails(step, lr=kwargs["lr"],
                                                                 **{k: kwargs[k]})), "lr")
        raise ConfigError(f"model.optimizer.{culprit} cannot be {kwargs[culprit]!r} for "
                          f"torch.optim.{OPTIMIZERS[name].__name__} ({type(error).__name__}: "
                          f"{error}) (set model.optimizer.{culprit}=...)") from None


def fails(function, **kwargs: Any) -> bool:
    try:
        function(**kwargs)
    except Exception:
        return True
    return False


def check_cell_output(model: RecurrentModel, target: str | None) -> None:
    """The cell's step on a probe batch of zeros, from its initial state, must be finite: a
    cell that returns NaN there would fail the first training step with a non-finite loss."""
    cell = model.cell
    parameter = next(cell.parameters(), None)
    u_t = torch.zeros(2, cell.input_size,
                      dtype=parameter.dtype if parameter is not None else torch.get_default_dtype())
    with torch.no_grad():
        state = cell.step(u_t, cell.init_state(2), None)
    cell.diagnostics()  # the probe's solver work is not a training step's
    for name, value in zip(cell.state_names, state):
        if not bool(torch.isfinite(value).all()):
            raise ConfigError(f"cell._target_={target}: {type(cell).__name__}.step returned "
                              f"non-finite values (nan or inf) in state {name} on a probe batch "
                              "of zeros from the initial state; fix the cell's step or its "
                              "settings")


def log_hparams(trainer: pl.Trainer, cfg: DictConfig, metrics: dict[str, float],
                monitor: GradFlowCallback | None) -> None:
    """The flattened config next to the final metrics, through every logger (TensorBoard's
    HPARAMS tab shows them side by side).

    The metrics are logged as ``final/<name>`` at the last step: ``final/val_loss`` … from
    ``metrics``, and the latest value of each summary scalar of the gradient-flow records.
    """
    final = {f"final/{k.replace('/', '_')}": v for k, v in metrics.items()
             if k not in ("step", SKIPPED, TRAINED)}  # counts of this process's steps
    if monitor is not None:
        final.update({f"final/{tag.removeprefix('grad_flow/')}": value
                      for tag, value in monitor.summaries.items()})
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
    print(f"TensorBoard:   rnnlab tensorboard {output_dir}")
