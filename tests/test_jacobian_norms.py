"""The per-step Jacobian norms at the monitor's default against exact SVDs."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from rnnlab import GradFlowCallback, gradflow
from rnnlab.tasks import Adding

from .conftest import CONF, float64_model

DEFAULT_ITERATIONS = inspect.signature(GradFlowCallback).parameters["jacobian_iterations"].default


def exact_norms(model, batch: dict) -> np.ndarray:
    """max over the batch of torch.linalg.svdvals(∂z_t/∂z_{t−1})[0], the Jacobian built by
    torch.autograd.functional.jacobian one sequence at a time (state tensors concatenated)."""
    u = model.encoder(batch["x"]).detach()
    B, T = u.shape[:2]
    state = model.cell.init_state(B)
    norms = np.zeros(T)
    for t in range(T):
        for b in range(B):
            before = tuple(s[b:b + 1] for s in state)
            widths = [s.shape[1] for s in before]

            def step(flat, t=t, b=b, widths=widths):
                return torch.cat(model.cell.step(u[b:b + 1, t], tuple(flat.split(widths, 1)),
                                                 None), 1)[0]

            J = torch.autograd.functional.jacobian(step, torch.cat(before, 1))[:, 0]
            norms[t] = max(norms[t], float(torch.linalg.svdvals(J)[0]))
        state = tuple(s.detach() for s in model.cell.step(u[:, t], state, None))
    return norms


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
    np.testing.assert_allclose(estimate, exact_norms(model, batch), rtol=1e-4)
