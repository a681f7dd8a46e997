"""The progress bar counts the run's steps up to max_steps."""

from __future__ import annotations

import io
import re
import sys

import pytorch_lightning as pl
from torch.utils.data import DataLoader

from rnnlab import progress
from rnnlab.progress import StepProgressBar

from .conftest import ROOT

sys.path.insert(0, str(ROOT / "examples"))
import lstm_classifier  # noqa: E402


def test_the_bar_reads_the_step_out_of_max_steps_across_epochs():
    screen = io.StringIO()
    bar = StepProgressBar(console_kwargs={"file": screen, "force_terminal": True, "width": 150})
    trainer = pl.Trainer(max_steps=7, max_epochs=-1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[bar])
    data = DataLoader(lstm_classifier.first_sign_data(12, 5, 3), batch_size=4)  # 3 per epoch
    trainer.fit(lstm_classifier.LSTMClassifier(features=3, hidden=4), data)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert "Training step" in text and "7/7" in text
    assert "Epoch" not in text and "/-2" not in text
    assert trainer.current_epoch >= 2  # the bar went on through three epochs


def test_the_bar_is_redrawn_at_most_every_redraw_s_and_always_at_the_last_step(monkeypatch):
    clock = iter([0.0, 0.01, 0.02, 0.15, 0.16, 0.17, 0.18, 0.19, 0.2])  # one call per step
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    drawn = []
    bar = StepProgressBar(console_kwargs={"file": io.StringIO(), "force_terminal": True})
    update = bar._update
    monkeypatch.setattr(bar, "_update", lambda task, current, *args: (
        drawn.append(current) if task == bar.train_progress_bar_id else None,
        update(task, current, *args))[1])
    trainer = pl.Trainer(max_steps=7, max_epochs=-1, logger=False, enable_checkpointing=False,
                         enable_model_summary=False, callbacks=[bar])
    data = DataLoader(lstm_classifier.first_sign_data(12, 5, 3), batch_size=4)
    trainer.fit(lstm_classifier.LSTMClassifier(features=3, hidden=4), data)
    assert drawn == [0, 1, 4, 7]  # at the start, 0 s, 0.15 s (0.1 s later), the last step
