"""Checkpoints that survive kills, full disks and schedulers.

- `AtomicCheckpointIO` (a Trainer plugin, conf/trainer/default.yaml) writes every checkpoint with
  `rnnlab.rundir.atomic_write`: a temporary file beside it, fsync, rename. The previous
  ``last.ckpt`` stays whole until the new one is; Lightning's own writer goes through a temporary
  file in $TMPDIR, which is copied (not renamed) when that is another filesystem.
- `RunCheckpoint` (conf/callbacks/default.yaml) keeps ``checkpoints/last.ckpt`` the latest state
  of the run: after every validation, at every epoch's end, every ``every_n_train_steps`` steps,
  at the last step, and at the step a SIGINT (Ctrl-C) or SIGTERM (what SLURM and most schedulers
  send) stopped the run. Such a signal does not end the process mid-step: the step in progress
  finishes, ``last.ckpt`` is written, and training stops with `RunInterrupted`; a second Ctrl-C
  stops at once.

On SLURM, Lightning's own support (`SLURMEnvironment`, on by default) handles the requeue signal
(SIGUSR1 before the time limit, ``#SBATCH --signal=USR1@90``): it saves
``hpc_ckpt_<n>.ckpt`` into the run directory (atomically, through `AtomicCheckpointIO`) and
requeues the job; the requeued job continues in the same directory from its newest checkpoint
(`rnnlab.resume.requeued_checkpoint`).
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO

from rnnlab.config import is_int, require
from rnnlab.rundir import atomic_write

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose writes are atomic, in the checkpoint's own directory."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any = None
                        ) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_write(path, lambda f: torch.save(checkpoint, f))


class RunInterrupted(BaseException):
    """A signal stopped training after ``step`` steps; ``checkpoint`` resumes it.

    A BaseException, as KeyboardInterrupt: the user or the scheduler stopped the process, so a
    sweep stops too instead of recording a failed job and going on.
    """

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        where = f"; {checkpoint} resumes it" if checkpoint else " (no checkpoint is configured)"
        super().__init__(f"{self.signal_name} received: training stopped after step {step}"
                         f"{where}")

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


class RunCheckpoint(ModelCheckpoint):
    """``<dirpath>/last.ckpt`` after every validation, at every epoch's end, every
    ``every_n_train_steps`` steps, at the last step, and where a SIGINT or SIGTERM stopped the run.

    Args:
        dirpath: the run's ``checkpoints/`` directory.
        filename: name of the kept top-k checkpoints (``save_top_k``), e.g. ``step_{step:07d}``.
        every_n_train_steps: also write ``last.ckpt`` every n training steps (null: only at the
            moments above; a kill from outside then loses at most one epoch).
        save_top_k: keep this many other checkpoints too (0: none; -1: every one written), the
            best by ``monitor`` (default: the latest), in ``mode`` min or max.
        every_n_epochs, train_time_interval, save_weights_only, save_on_exception, verbose: as
            for `ModelCheckpoint` (``last.ckpt`` itself is always written as above).
    """

    def __init__(self, dirpath: str, filename: str = "step_{step:07d}",
                 every_n_train_steps: int | None = None, save_top_k: int = 0,
                 monitor: str | None = None, mode: str = "min",
                 every_n_epochs: int | None = None, train_time_interval: Any = None,
                 save_weights_only: bool = False, save_on_exception: bool = False,
                 verbose: bool = False):
        require(every_n_train_steps is None or is_int(every_n_train_steps, 1),
                "callbacks.model_checkpoint.every_n_train_steps", every_n_train_steps,
                "null or an integer >= 1")
        require(is_int(save_top_k, -1), "callbacks.model_checkpoint.save_top_k", save_top_k,
                "an integer >= -1 (-1: keep all, 0: only last.ckpt)")
        require(mode in ("min", "max"), "callbacks.model_checkpoint.mode", mode, "min or max")
        require(isinstance(filename, str) and filename.strip() != "" and "/" not in filename,
                "callbacks.model_checkpoint.filename", filename,
                "a file name without '/' such as step_{step:07d}")
        super().__init__(dirpath=dirpath, filename=filename, monitor=monitor, mode=mode,
                         save_last=True, save_top_k=save_top_k, auto_insert_metric_name=False,
                         every_n_train_steps=every_n_train_steps, every_n_epochs=every_n_epochs,
                         train_time_interval=train_time_interval,
                         save_weights_only=save_weights_only, save_on_exception=save_on_exception,
                         verbose=verbose, enable_version_counter=False,
                         save_on_train_epoch_end=False)
        self.signum: int | None = None  # the stop signal received, if any
        self.saved_state: tuple[int, int | None] | None = None  # what the latest save holds

    # --- when last.ckpt is written ---------------------------------------------------------------
    # Only from states Lightning resumes exactly: the end of a training batch and the end of a
    # validation. (At on_train_end the loops' epoch count is already advanced: a run resumed
    # from there would draw the wrong epoch's batches.)
    @staticmethod
    def state_of(trainer: pl.Trainer) -> tuple[int, int | None]:
        """What a checkpoint written now holds: the step, and the step of the latest validation."""
        return trainer.global_step, getattr(trainer.lightning_module, "last_val_step", None)

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        self.saved_state = self.state_of(trainer)

    def write_last(self, trainer: pl.Trainer) -> None:
        """Write last.ckpt now, unless the latest checkpoint already holds this state."""
        if (trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != "fit"
                or self.saved_state == self.state_of(trainer)):
            return
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self.write_last(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pass  # the last step was written at its batch's end (`is_last_step`)

    @staticmethod
    def is_last_step(trainer: pl.Trainer) -> bool:
        """Whether training stops after this batch: max_steps reached, the last batch of the last
        epoch, or a callback asked to stop."""
        last_epoch = (trainer.max_epochs not in (None, -1)
                      and trainer.current_epoch + 1 >= trainer.max_epochs
                      and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
        return ((trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps)
                or last_epoch or trainer.should_stop)

    # --- SIGINT and SIGTERM ----------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # After Lightning has put its own handlers in place: it restores the ones from before
        # fit() when training ends, however it ends.
        self.signum = None
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                signal.signal(signum, lambda s, _: self.on_signal(s, trainer))

    def on_signal(self, signum: int, trainer: pl.Trainer) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop at once, no checkpoint
        if self.signum is not None:
            return
        self.signum = signum
        log.warning("%s received: finishing step %d, then writing %s and stopping%s",
                    signal.Signals(signum).name, trainer.global_step, self.dirpath,
                    " (Ctrl-C again stops at once)" if signum == signal.SIGINT else "")
        launcher = trainer.strategy.launcher
        if signum == signal.SIGTERM and launcher is not None and hasattr(launcher, "kill"):
            launcher.kill(signum)  # the other data-parallel processes stop at the same step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        stop = self.signum is not None
        if trainer.world_size > 1:  # every process stops after the same step
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop or self.is_last_step(trainer):
            self.write_last(trainer)
        if stop:
            raise RunInterrupted(self.signum or signal.SIGTERM, trainer.global_step,
                                 self.last_model_path or None)
