"""Faults a user's run meets, as Lightning callbacks a test adds with ``+callbacks.<name>=...``:
a signal sent to the training process itself at a chosen step (``+callbacks.fault.step=5``,
``+callbacks.fault.send=SIGTERM``)."""

from __future__ import annotations

import os
import signal

import pytorch_lightning as pl


class SignalAt(pl.Callback):
    """Send ``send`` (a signal's name: SIGKILL, SIGTERM, SIGINT, SIGUSR1) to this process once
    ``step`` optimizer steps are done; lists of steps and names send one at each."""

    def __init__(self, step: int | list[int], send: str | list[str] = "SIGKILL"):
        steps = [step] if isinstance(step, int) else list(step)
        names = [send] * len(steps) if isinstance(send, str) else list(send)
        self.plan = dict(zip(steps, names))

    def on_train_batch_end(self, trainer, *args) -> None:
        name = self.plan.pop(trainer.global_step, None)
        if name is not None:
            os.kill(os.getpid(), getattr(signal, name))
