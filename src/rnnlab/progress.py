"""StepProgressBar: Lightning's rich progress bar counting the run's steps, not an epoch's batches.

rnnlab trains for ``trainer.max_steps`` with no epoch limit (an epoch is just ``task.train_batches``
batches of fresh data), where Lightning's bar reads "Epoch 29/-2" and restarts every epoch. This
one is a single bar over the whole run: "Training step 1200/3000".
"""

from __future__ import annotations

import time

import pytorch_lightning as pl
from pytorch_lightning.callbacks import RichProgressBar

# The training bar is redrawn at most this often (and at the last step): a redraw with the
# loss's metrics cost ~0.09 ms, about 1% of a 7 ms training step, and reads the loss from the
# device (a sync on a GPU).
REDRAW_S = 0.1


class StepProgressBar(RichProgressBar):
    """A `RichProgressBar` whose training bar counts optimizer steps up to ``max_steps`` (batches
    of the epoch when the run is limited by epochs instead), redrawn at most every `REDRAW_S`
    seconds and at the last step."""

    drawn_at = -float("inf")  # when the training bar was last redrawn (`REDRAW_S`)

    def by_steps(self, trainer: pl.Trainer) -> bool:
        return trainer.max_steps is not None and trainer.max_steps > 0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.by_steps(trainer):
            super().on_train_epoch_start(trainer, pl_module)
            return
        if self.is_disabled:
            return
        if self.train_progress_bar_id is not None and self._leave:  # a validation bar left it
            self._stop_progress()
            self._init_progress(trainer)
        if self.progress is not None and self.train_progress_bar_id is None:
            self.train_progress_bar_id = self._add_task(trainer.max_steps, "Training step")
            self._update(self.train_progress_bar_id, trainer.global_step)
        self.refresh()

    def _initialize_train_progress_bar_id(self) -> None:
        if not self.by_steps(self.trainer):
            super()._initialize_train_progress_bar_id()
            return
        self.train_progress_bar_id = self._add_task(self.trainer.max_steps, "Training step")

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        """Lightning's, and ``train/loss``: rnnlab's model writes its loss to the loggers itself
        (`RecurrentModel.write_train_loss`), so it is taken from the model."""
        metrics = super().get_metrics(trainer, pl_module)
        loss = getattr(pl_module, "train_loss", None)
        if loss is not None:
            metrics["train/loss"] = float(loss)
        return metrics

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.by_steps(trainer):
            super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
            return
        if not self.is_disabled and self.train_progress_bar_id is None:
            self._initialize_train_progress_bar_id()  # resumed mid-epoch
        now = time.monotonic()
        if trainer.global_step < trainer.max_steps and now - self.drawn_at < REDRAW_S:
            return
        self.drawn_at = now
        self._update(self.train_progress_bar_id, trainer.global_step)
        self._update_metrics(trainer, pl_module)
        self.refresh()
