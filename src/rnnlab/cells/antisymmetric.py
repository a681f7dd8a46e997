"""AntisymmetricRNN (Chang, Chen, Haber & Chi, ICLR 2019)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rnnlab.cells.base import Cell, State
from rnnlab.config import is_number, require


class AntisymmetricRNN(Cell):
    """h_t = h_{t−1} + ε·tanh((W − Wᵀ − γI) h_{t−1} + V u_t + b): forward Euler on the ODE
    h' = tanh((W − Wᵀ − γI) h + V u + b).

    State (h,), (B, hidden_size). Chang, Chen, Haber & Chi, "AntisymmetricRNN: A Dynamical System
    View on Recurrent Neural Networks", ICLR 2019. W − Wᵀ has purely imaginary eigenvalues, so the
    ODE's Jacobian has eigenvalues with real part −γ·tanh' ≤ 0: stable and, at γ = 0, neither
    contracting nor expanding; the diffusion γ > 0 makes forward Euler with step ε stable too
    (|1 + ε λ| ≤ 1 needs a small margin into the left half-plane).

    Options: ``epsilon`` (ε, the step), ``gamma`` (γ, the diffusion), ``sigma`` (W ~ N(0, σ²/H)).
    V and b are initialised as ``nn.Linear``. The defaults, ε = 0.01, γ = 0.01, σ = 0.01, are
    from the paper's grids (ε ∈ {0.01, 0.1, 1}, γ ∈ {0.001, 0.01, 0.1, 1}); the authors' code is
    not public.
    """

    def __init__(self, input_size: int, hidden_size: int = 64, epsilon: float = 0.01,
                 gamma: float = 0.01, sigma: float = 0.01):
        super().__init__(input_size, hidden_size)
        require(is_number(epsilon) and epsilon > 0, "cell.epsilon", epsilon,
                "a finite number > 0")
        require(is_number(gamma) and gamma >= 0, "cell.gamma", gamma, "a finite number >= 0")
        require(is_number(sigma) and sigma >= 0, "cell.sigma", sigma, "a finite number >= 0")
        self.epsilon, self.gamma = float(epsilon), float(gamma)
        H = hidden_size
        self.input = nn.Linear(input_size, H)
        self.weight = nn.Parameter(torch.empty(H, H).normal_(0.0, sigma / math.sqrt(H)))

    def state_matrix(self) -> Tensor:
        """W − Wᵀ − γI: eigenvalues −γ + iω. (Not `recurrent_weight`: the step's Jacobian is
        I + ε·diag(tanh')·(W − Wᵀ − γI), not this matrix, so its spectrum is no gain.)"""
        eye = torch.eye(self.hidden_size, dtype=self.weight.dtype, device=self.weight.device)
        return self.weight - self.weight.T - self.gamma * eye

    def step(self, u_t: Tensor, state: State, dt: Tensor | None) -> State:
        (h,) = state
        return (h + self.epsilon * torch.tanh(h @ self.state_matrix().T + self.input(u_t)),)
