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


# --- the cells' own J v and Jᵀ w (`Cell.transition_jacobian`) ----------------------------------
OPERATOR_CELLS = [("rnn", {"nonlinearity": "tanh"}), ("rnn", {"nonlinearity": "relu"}),
                  ("rnn", {"nonlinearity": "sigmoid"}), ("rnn", {"nonlinearity": "identity"}),
                  ("rnn", {"constraint": "orthogonal", "gain": 0.8}), ("gru", {}),
                  ("lstm", {}), ("lstm", {"forget_bias": 3.0})]


def operator_case(cell: str, options: dict, N: int = 9, hidden: int = 7):
    """A float64 cell from conf/cell/<cell>.yaml, N rows of inputs and states (large enough
    that relu's and tanh's slopes vary), and the full Jacobian of its step per row by
    torch.autograd.functional.jacobian: (N, D, D)."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "cell" / f"{cell}.yaml"))
    cfg.update({"hidden_size": hidden, **options})
    model = float64_model(cfg, encoder_size=5)
    cell_ = model.cell
    generator = torch.Generator().manual_seed(1)
    u = torch.randn(N, 5, generator=generator, dtype=torch.float64) * 2
    z = tuple(torch.randn(N, hidden, generator=generator, dtype=torch.float64)
              for _ in cell_.state_names)
    rows = []
    for n in range(N):
        blocks = torch.autograd.functional.jacobian(
            lambda *s, n=n: cell_.step(u[n:n + 1], s, None), tuple(s[n:n + 1] for s in z))
        rows.append(torch.cat([torch.cat([b.reshape(hidden, hidden) for b in row], 1)
                               for row in blocks], 0))
    return cell_, u, z, torch.stack(rows)


@pytest.mark.parametrize("cell,options", OPERATOR_CELLS)
def test_transition_jacobian_products_are_the_autograd_jacobian_times_a_vector(cell, options):
    cell_, u, z, J = operator_case(cell, options)
    with torch.no_grad():
        matvec, rmatvec = cell_.transition_jacobian(u, z, None)
    generator = torch.Generator().manual_seed(2)
    v = torch.randn(J.shape[:2], generator=generator, dtype=torch.float64)
    w = torch.randn(J.shape[:2], generator=generator, dtype=torch.float64)
    torch.testing.assert_close(matvec(v), torch.einsum("nij,nj->ni", J, v), rtol=1e-12,
                               atol=1e-14)
    torch.testing.assert_close(rmatvec(w), torch.einsum("nji,nj->ni", J, w), rtol=1e-12,
                               atol=1e-14)


@pytest.mark.parametrize("cell,options", OPERATOR_CELLS)
def test_lanczos_with_the_cells_products_equals_lanczos_with_autograd(cell, options):
    cell_, u, z, J = operator_case(cell, options)
    D = J.shape[1]
    v = tuple(torch.randn(s.shape, generator=torch.Generator().manual_seed(3),
                          dtype=torch.float64) for s in z)
    own = gradflow.lanczos_norms(cell_, u, z, None, v, D)
    cell_.transition_jacobian = None  # the instance falls back to autograd
    generic = gradflow.lanczos_norms(cell_, u, z, None, v, D)
    torch.testing.assert_close(own, generic, rtol=1e-10, atol=0)
    torch.testing.assert_close(own, torch.linalg.matrix_norm(J, 2), rtol=1e-10, atol=0)
