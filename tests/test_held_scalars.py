"""The monitor's ``grad_norm/*`` scalars of every logged step: held as tensors and written to the
loggers `SCALAR_STEPS` steps at a time, each at its own step, and whatever is held at a
checkpoint, the end of training and an exception."""

from __future__ import annotations

import numpy as np
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rnnlab import records
from rnnlab.callbacks import SCALAR_STEPS, GradFlowCallback

from .test_record_packs import train_tiny

TAGS = ["grad_norm/encoder", "grad_norm/total"]


class Collecting:
    """A logger adapter that keeps what it is given."""

    def __init__(self):
        self.written: list[tuple[int, dict[str, float]]] = []

    def scalars(self, metrics: dict[str, float], step: int) -> None:
        self.written.append((step, dict(metrics)))


def held(steps) -> list[tuple[int, list[str], torch.Tensor]]:
    return [(step, TAGS, torch.tensor([step + 0.25, 2.0 * step], dtype=torch.float64))
            for step in steps]


def test_every_steps_norms_reach_tensorboard_at_their_steps(tmp_path):
    """A run of 2·SCALAR_STEPS + 10 steps logged every step, monitored every 10th: every step's
    ``grad_norm/*`` is in the event file once, at its step, in order (the last 10 written at the
    end of training), and on the monitored steps they are the records' own numbers."""
    steps = 2 * SCALAR_STEPS + 10
    train_tiny(tmp_path, f"trainer.max_steps={steps}", "monitor.every_n_steps=10",
               "trainer.log_every_n_steps=1")
    events = EventAccumulator(str(tmp_path))  # the run's event files
    events.Reload()
    record = records.load(tmp_path)
    assert record["step"].tolist() == list(range(0, steps, 10))
    for tag in ("grad_norm/encoder", "grad_norm/cell", "grad_norm/decoder", "grad_norm/total",
                "grad_norm/total_clipped"):
        logged = events.Scalars(tag)
        assert [e.step for e in logged] == list(range(steps)), tag
        key = tag.replace("/", "_")
        np.testing.assert_allclose([logged[s].value for s in record["step"]], record[key],
                                   rtol=1e-6, err_msg=tag)
    total = [e.value for e in events.Scalars("grad_norm/total")]
    assert len(set(total)) > steps // 2  # each step's own norm, not one repeated


def test_held_norms_are_written_when_enough_steps_are_held_each_at_its_step(tmp_path):
    callback = GradFlowCallback(tmp_path)
    adapter = Collecting()
    callback.adapters = [adapter]
    callback.held_scalars = held(range(3))
    callback.write_scalars()
    assert adapter.written == [(s, {TAGS[0]: s + 0.25, TAGS[1]: 2.0 * s}) for s in range(3)]
    assert callback.held_scalars == []
    callback.write_scalars()  # nothing held: nothing written
    assert len(adapter.written) == 3


def test_held_norms_are_written_by_a_checkpoint_the_end_and_an_exception(tmp_path):
    callback = GradFlowCallback(tmp_path)
    adapter = Collecting()
    callback.adapters = [adapter]
    callback.held_scalars = held([0, 1])
    callback.state_dict()  # what a checkpoint asks
    assert [step for step, _ in adapter.written] == [0, 1]
    callback.held_scalars = held([2])
    callback.on_exception(None, None, RuntimeError("diverged"))
    assert [step for step, _ in adapter.written] == [0, 1, 2]
    assert callback.held_scalars == []
