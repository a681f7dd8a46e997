"""Gradient flossing against independent values."""

from __future__ import annotations

import itertools

import pytest
import torch

from rnnlab import gradflow
from rnnlab.flossing import lyapunov_exponents, prefloss
from rnnlab.lyapunov import lyapunov
from rnnlab.tasks import Adding

from .conftest import float64_model


def rnn(gain: float, H: int = 8):
    cell = {"_target_": "rnnlab.cells.rnn.ElmanRNN", "hidden_size": H, "init": "normal",
            "gain": gain}
    return float64_model(cell, encoder_size=4)


def batches(T: int):
    task, generator = Adding(seq_len=T, batch_size=4), torch.Generator().manual_seed(0)
    return ({k: v.double() for k, v in task.generate(4, generator).items()}
            for _ in itertools.count())


def test_differentiable_exponents_equal_the_monitors_with_qr_every_step():
    model, batch = rnn(1.5), next(batches(25))
    measured = lyapunov(model, batch, k=3, ons_every=1)
    # The monitor leaves the first tenth of the steps out; with T = 25 that is 2 steps, so
    # compare the sums over every step instead: the flossing exponents average all 24.
    exponents = lyapunov_exponents(model, batch["x"], k=3).detach()
    assert exponents.shape == (4, 3)
    assert torch.isfinite(exponents).all()
    top = exponents[:, 0].mean()
    assert float(top) == pytest.approx(float(measured.lyapunov[0]), abs=0.05)


def test_preflossing_brings_the_top_exponent_and_the_measured_decay_near_zero():
    model, stream = rnn(0.5), batches(20)
    batch = next(stream)
    before = gradflow.grad_flow(model, batch, lyapunov_k=2)
    losses = prefloss(model, stream, k=2, steps=80, lr=2e-2)
    after = gradflow.grad_flow(model, batch, lyapunov_k=2)
    assert before.lyapunov.lyapunov[0] < -0.2  # vanishing: a decade every 5 steps or faster
    assert losses[-1] < losses[0] / 10
    assert abs(after.lyapunov.lyapunov[0]) < 0.03  # the tolerance: 0.6 decades over T = 20
    assert abs(after.summary.decay_rate) < 0.05  # and the profile follows
