"""Mean-field theory of the tanh RNN: the order-to-chaos boundary for critical initialisation.

For z_t = tanh(W z_{t−1} + b) with W = σ_w·Q (Q orthogonal) and b ~ N(0, σ_b²), the
pre-activations' variance settles at the fixed point q* = σ_w² E[tanh(√q* ξ)²] + σ_b², ξ ~ N(0, 1),
and a perturbation grows or shrinks per step by χ = σ_w² E[tanh'(√q* ξ)²] (Chen, Pennington &
Schoenholz 2018, "Dynamical isometry and a mean field theory of RNNs", §3; Poole et al. 2016).
χ = 1 is the order-to-chaos boundary: `critical_weight_scale` finds the σ_w on it for a σ_b.
The inputs' variance is left out (the cell's input term adds to σ_b² in the same way).
"""

from __future__ import annotations

import numpy as np

QUADRATURE = np.polynomial.hermite_e.hermegauss(101)  # nodes and weights for N(0, 1)
CRITICAL_BIAS_SCALE = 0.05  # σ_b: small, so q* is small and tanh near its linear part


def expect(f, q: float) -> float:
    """E[f(√q ξ)] for ξ ~ N(0, 1), by Gauss–Hermite quadrature."""
    nodes, weights = QUADRATURE
    return float(np.sum(weights * f(np.sqrt(q) * nodes)) / np.sqrt(2 * np.pi))


def fixed_point(sigma_w: float, sigma_b: float) -> float:
    """q* = σ_w² E[tanh(√q* ξ)²] + σ_b², by iteration from q = 1."""
    q = 1.0
    for _ in range(10_000):
        q_next = sigma_w ** 2 * expect(lambda h: np.tanh(h) ** 2, q) + sigma_b ** 2
        if abs(q_next - q) < 1e-15:
            break
        q = q_next
    return q


def chi(sigma_w: float, sigma_b: float) -> float:
    """σ_w² E[tanh'(√q* ξ)²]: the mean-field growth of a perturbation per step."""
    q = fixed_point(sigma_w, sigma_b)
    return sigma_w ** 2 * expect(lambda h: 1.0 / np.cosh(h) ** 4, q)


def critical_weight_scale(sigma_b: float = CRITICAL_BIAS_SCALE) -> float:
    """The σ_w with χ(σ_w, σ_b) = 1, by bisection on [1, 4] (χ grows with σ_w there)."""
    low, high = 1.0, 4.0
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if chi(middle, sigma_b) < 1 else (low, middle)
    return (low + high) / 2
