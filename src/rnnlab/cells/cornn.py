"""coRNN, the coupled oscillatory RNN (Rusch & Mishra, ICLR 2021; github.com/tk-rusch/coRNN)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rnnlab.cells.base import Cell, State
from rnnlab.config import is_number, require


class CoRNN(Cell):
    """Damped, driven, coupled oscillators y'' = tanh(W y + 𝒲 y' + V u + b) − γ y − ε y',
    discretised with the authors' implicit-explicit scheme (z = y'):

        z_t = z_{t−1} + Δt·(tanh(W y_{t−1} + 𝒲 z_{t−1} + V u_t + b) − γ y_{t−1} − ε z_{t−1})
        y_t = y_{t−1} + Δt·z_t

    State (y, z), each (B, hidden_size); the decoder reads y. Rusch & Mishra, "Coupled
    Oscillatory Recurrent Neural Network (coRNN): An accurate and (gradient) stable architecture
    for learning long time dependencies", ICLR 2021. Their bound: ||∂L/∂W|| grows at most
    linearly in T, and its vanishing part decays no faster than Δt^{3/2}, whatever T.

    Options: ``dt`` (Δt), ``gamma`` (γ, the restoring force), ``epsilon`` (ε, the damping); the
    defaults are those of the authors' adding-task script (adding/adding_task.py: Δt = 0.06,
    γ = 66, ε = 15, with hidden 128, batch 50, Adam at lr 0.02). The authors keep V, 𝒲, W and b
    in one ``nn.Linear(input + 2H, H)`` on cat(u, z, y); here they are separate tensors with the
    same initialisation, U(±1/√(input + 2H)).
    """

    state_names = ("y", "z")

    def __init__(self, input_size: int, hidden_size: int = 64, dt: float = 0.06,
                 gamma: float = 66.0, epsilon: float = 15.0):
        super().__init__(input_size, hidden_size)
        require(is_number(dt) and dt > 0, "cell.dt", dt, "a finite number > 0")
        require(is_number(gamma), "cell.gamma", gamma, "a finite number")
        require(is_number(epsilon), "cell.epsilon", epsilon, "a finite number")
        self.dt, self.gamma, self.epsilon = float(dt), float(gamma), float(epsilon)
        H = hidden_size
        bound = 1.0 / math.sqrt(input_size + 2 * H)  # nn.Linear's on the authors' cat(u, z, y)
        self.weight_u = nn.Parameter(torch.empty(H, input_size).uniform_(-bound, bound))  # V
        self.weight_z = nn.Parameter(torch.empty(H, H).uniform_(-bound, bound))  # 𝒲
        self.weight_y = nn.Parameter(torch.empty(H, H).uniform_(-bound, bound))  # W
        self.bias = nn.Parameter(torch.empty(H).uniform_(-bound, bound))

    def step(self, u_t: Tensor, state: State, dt: Tensor | None) -> State:
        return self.projected_step(F.linear(u_t, self.weight_u, self.bias), state, dt)

    def input_projection(self, u: Tensor) -> Tensor:
        """V u_t + b for many steps at once: the loop then makes one matmul per chunk, and the
        backward pass one for V's gradient, instead of one a step."""
        return F.linear(u, self.weight_u, self.bias)

    def projected_step(self, g_t: Tensor, state: State, dt: Tensor | None) -> State:
        y, z = state
        drive = torch.tanh(torch.addmm(torch.addmm(g_t, y, self.weight_y.T), z,
                                       self.weight_z.T))
        z = z + self.dt * (drive - self.gamma * y - self.epsilon * z)
        y = y + self.dt * z
        return y, z
