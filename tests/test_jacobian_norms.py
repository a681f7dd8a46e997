"""The per-step Jacobian norms at the monitor's default against exact SVDs."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from rnnlab import GradFlowCallback, gradflow
from rnnlab.tasks import Adding

from .conftest import CONF, exact_jacobian_norms, float64_model

DEFAULT_ITERATIONS = inspect.signature(GradFlowCallback).parameters["jacobian_iterations"].default


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm", "node"])
def test_default_jacobian_norms_are_within_1e_4_of_the_exact_singular_value(cell):
    # H = 48: a state (96 for the LSTM) larger than the default's Lanczos steps, so the result
    # is not exact by construction.
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "cell" / f"{cell}.yaml"))
    cfg["hidden_size"] = 48
    model = float64_model(cfg, encoder_size=8)
    batch = Adding(seq_len=6, batch_size=3).generate(3, torch.Generator().manual_seed(0))
    batch = {k: v.double() for k, v in batch.items()}
    assert DEFAULT_ITERATIONS < 48
    estimate = gradflow.jacobians(model, batch, DEFAULT_ITERATIONS).jacobian_norm
    np.testing.assert_allclose(estimate, exact_jacobian_norms(model, batch), rtol=1e-4)
