"""Critical initialisation of the tanh RNN and the order-to-chaos transition of its spectrum."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, optimize

from rnnlab.cells.rnn import ElmanRNN
from rnnlab.lyapunov import backward_spectrum
from rnnlab.meanfield import CRITICAL_BIAS_SCALE, critical_weight_scale

from .conftest import default_dtype


def gaussian_mean(f, q: float) -> float:
    """E[f(√q ξ)], ξ ~ N(0, 1), by scipy's adaptive quadrature."""
    density = lambda x: math.exp(-x * x / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    return integrate.quad(lambda x: f(math.sqrt(q) * x) * density(x), -12, 12)[0]


def test_critical_scale_puts_the_mean_field_gain_of_a_perturbation_at_one():
    sigma_w, sigma_b = critical_weight_scale(), CRITICAL_BIAS_SCALE
    q = optimize.brentq(lambda q: sigma_w ** 2 * gaussian_mean(lambda h: math.tanh(h) ** 2, q)
                        + sigma_b ** 2 - q, 1e-6, 10.0)
    chi = sigma_w ** 2 * gaussian_mean(lambda h: math.cosh(h) ** -4, q)
    assert chi == pytest.approx(1.0, abs=1e-9)


def test_critical_init_is_an_orthogonal_matrix_times_the_critical_scale():
    with default_dtype(torch.float64):
        cell = ElmanRNN(input_size=2, hidden_size=16, init="critical")
    W = cell.weight_hh.detach()
    scale = critical_weight_scale()
    torch.testing.assert_close(W @ W.T / scale ** 2, torch.eye(16, dtype=torch.float64))
    assert float(cell.bias_hh.detach().std()) == pytest.approx(CRITICAL_BIAS_SCALE, rel=0.6)


def top_exponent(gain: float, H: int = 200, T: int = 300) -> float:
    """λ₁ of an autonomous tanh rate network z_t = tanh(W z_{t−1}), W ~ N(0, gain²/H)."""
    torch.manual_seed(0)
    with default_dtype(torch.float64):
        cell = ElmanRNN(input_size=1, hidden_size=H, init="normal", gain=gain)
        torch.nn.init.zeros_(cell.bias_ih), torch.nn.init.zeros_(cell.bias_hh)
    u = torch.zeros(1, T, 1, dtype=torch.float64)
    z = (torch.randn(1, H, dtype=torch.float64),)
    previous = []
    with torch.no_grad():
        for t in range(T):
            previous.append(z)
            z = cell.step(u[:, t], z, None)
    return float(backward_spectrum(cell, u, previous, None, k=1).exponents[0, 0])


def test_random_rate_network_crosses_from_order_to_chaos_at_gain_one():
    # The classical large-N result (Sompolinsky, Crisanti & Sommers 1988; Engelken, Wolf &
    # Abbott 2023 for the spectrum): λ₁ < 0 below g = 1, 0 at g = 1 and growing beyond.
    exponents = [top_exponent(g) for g in (0.5, 1.5, 3.0)]
    assert exponents[0] == pytest.approx(math.log10(0.5), abs=0.05)  # z → 0, J → W: radius g
    assert 0 < exponents[1] < exponents[2]
    assert np.all(np.diff(exponents) > 0)
