"""The cells' written-out transition Jacobians against autograd: the products J v and Jᵀ w
(`Cell.transition_jacobian`) that the Jacobian norms' Lanczos iteration uses."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from rnnlab import gradflow

from .conftest import CONF, float64_model

OPERATOR_CELLS = [("rnn", {"nonlinearity": "tanh"}), ("rnn", {"nonlinearity": "relu"}),
                  ("rnn", {"nonlinearity": "sigmoid"}), ("rnn", {"nonlinearity": "identity"}),
                  ("rnn", {"constraint": "orthogonal", "gain": 0.8}), ("gru", {}),
                  ("lstm", {}), ("lstm", {"forget_bias": 3.0}), ("antisymmetric", {}),
                  ("antisymmetric", {"epsilon": 0.5, "gamma": 0.1, "sigma": 2.0}),
                  ("lru", {"hidden_size": 8}), ("lru", {"hidden_size": 8, "r_min": 0.0}),
                  ("mingru", {}), ("indrnn", {}), ("indrnn", {"horizon": 20})]


def operator_case(cell: str, options: dict, N: int = 9, hidden: int = 7):
    """A float64 cell from conf/cell/<cell>.yaml, N rows of inputs and states (inputs scaled
    up, so that relu's and tanh's slopes vary), and the full Jacobian of its step per row by
    torch.autograd.functional.jacobian: (N, D, D)."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "cell" / f"{cell}.yaml"))
    hidden = options.get("hidden_size", hidden)  # (the LRU's: even)
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

