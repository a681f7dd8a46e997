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


@pytest.mark.parametrize("cell,hidden", [("rnn", 48), ("gru", 48), ("lstm", 48), ("node", 48),
                                         ("rnn", 128), ("gru", 128)])
def test_default_jacobian_norms_are_within_1e_4_of_the_exact_singular_value(cell, hidden):
    # A state (2H for the LSTM) larger than the default's Lanczos steps, so the result is not
    # exact by construction; H = 128 is the benchmark's size, where 20 steps were not enough
    # for the GRU (1.6e-4).
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "cell" / f"{cell}.yaml"))
    cfg["hidden_size"] = hidden
    model = float64_model(cfg, encoder_size=8)
    batch = Adding(seq_len=6, batch_size=3).generate(3, torch.Generator().manual_seed(0))
    batch = {k: v.double() for k, v in batch.items()}
    assert DEFAULT_ITERATIONS < hidden
    estimate = gradflow.jacobians(model, batch, DEFAULT_ITERATIONS).jacobian_norm
    np.testing.assert_allclose(estimate, exact_jacobian_norms(model, batch), rtol=1e-4)


def test_top_tridiagonal_eigenvalue_matches_a_dense_eigensolver():
    rng = np.random.default_rng(0)
    diagonal = rng.uniform(0, 3, (50, 12))
    off = rng.uniform(0, 1, (50, 11))
    off[::7, 4] = 0.0  # a split matrix: two blocks
    dense = np.zeros((50, 12, 12))
    index = np.arange(12)
    dense[:, index, index] = diagonal
    dense[:, index[:-1], index[1:]] = off
    dense[:, index[1:], index[:-1]] = off
    np.testing.assert_allclose(gradflow.top_tridiagonal_eigenvalue(diagonal, off),
                               np.linalg.eigvalsh(dense)[:, -1], rtol=1e-13)
    one_by_one = gradflow.top_tridiagonal_eigenvalue(diagonal[:, :1], off[:, :0])
    np.testing.assert_allclose(one_by_one, diagonal[:, 0], rtol=1e-13)



def test_top_tridiagonal_eigenvalue_to_a_relative_tolerance():
    # What float32 norms ask for (2^-30 of the eigenvalue, below half a float32 ulp of its
    # square root): within it of the dense eigensolver, in fewer bisections than full float64.
    rng = np.random.default_rng(1)
    diagonal, off = rng.uniform(0, 3, (200, 30)), rng.uniform(0, 1, (200, 29))
    dense = np.zeros((200, 30, 30))
    index = np.arange(30)
    dense[:, index, index] = diagonal
    dense[:, index[:-1], index[1:]] = off
    dense[:, index[1:], index[:-1]] = off
    exact = np.linalg.eigvalsh(dense)[:, -1]
    loose = gradflow.top_tridiagonal_eigenvalue(diagonal, off, rtol=2.0 ** -30)
    np.testing.assert_allclose(loose, exact, rtol=2.0 ** -30)
    assert np.abs(loose / exact - 1).max() > 1e-13  # it did stop early
    np.testing.assert_allclose(np.sqrt(loose).astype(np.float32), np.sqrt(exact).astype(np.float32),
                               rtol=2.0 ** -23)


def test_lanczos_norms_when_the_products_hand_back_their_argument():
    # A cell whose J and Jᵀ return their argument itself (J = I): the iteration must not
    # overwrite its basis vector through the product it got back.
    class Identity:
        @staticmethod
        def transition_jacobian(u, state, dt):
            return (lambda v: v), (lambda w: w)

    z = (torch.randn(5, 7),)
    v = (torch.randn(5, 7, generator=torch.Generator().manual_seed(0)),)
    norms = gradflow.lanczos_norms(Identity(), torch.zeros(5, 1), z, None, v, 6)
    np.testing.assert_allclose(norms.numpy(), np.ones(5), rtol=1e-6)
    assert v[0].abs().sum() > 0  # the start vectors are the caller's, untouched
