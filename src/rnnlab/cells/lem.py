"""LEM, Long Expressive Memory (Rusch, Mishra, Erichson & Mahoney, ICLR 2022;
github.com/tk-rusch/LEM)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from rnnlab.cells.base import Cell, State
from rnnlab.config import is_number, require


class LEM(Cell):
    """Two coupled ODEs y' = σ̂(t)⊙(tanh(W_y z + V_y u) − y), z' = σ(t)⊙(tanh(W_z y + V_z u) − z),
    each discretised with its own learned multi-scale time step (as the authors' LEMCell):

        Δt̄_t = Δt·σ(W_1 y_{t−1} + V_1 u_t + b_1)      Δt_t = Δt·σ(W_2 y_{t−1} + V_2 u_t + b_2)
        z_t = (1 − Δt_t) ⊙ z_{t−1} + Δt_t ⊙ tanh(W_z y_{t−1} + V_z u_t + b_z)
        y_t = (1 − Δt̄_t) ⊙ y_{t−1} + Δt̄_t ⊙ tanh(W_y z_t + V_y u_t + b_y)

    State (y, z), each (B, hidden_size); the decoder reads y. Rusch, Mishra, Erichson & Mahoney,
    "Long Expressive Memory for Sequence Modeling", ICLR 2022: the gradients are bounded
    (no explosion) and their vanishing part decays at most like Δt^{3/2}, independently of T;
    their adding-task log (T = 10,000, hidden 128, batch 50) reaches test MSE below 0.01 near
    iteration 2,000.

    Parameters as the authors' ``inp2hid = Linear(input, 4H)`` (blocks V_1, V_2, V_y, V_z, with
    b_1, b_2, b_y, b_z), ``hid2hid = Linear(H, 3H)`` (W_1, W_2, W_z; its bias adds to b_1, b_2,
    b_z) and ``transform_z = Linear(H, H)`` (W_y), every weight and bias U(±1/√H). ``dt`` (Δt,
    the largest time step) defaults to the authors' adding-task script's, 0.0242
    (adding/adding_task.py, with lr 0.0026).
    """

    state_names = ("y", "z")

    def __init__(self, input_size: int, hidden_size: int = 64, dt: float = 0.0242):
        super().__init__(input_size, hidden_size)
        require(is_number(dt) and dt > 0, "cell.dt", dt, "a finite number > 0")
        self.dt = float(dt)
        H = hidden_size
        self.inp2hid = nn.Linear(input_size, 4 * H)
        self.hid2hid = nn.Linear(H, 3 * H)
        self.transform_z = nn.Linear(H, H)
        bound = 1.0 / math.sqrt(H)
        with torch.no_grad():
            for p in self.parameters():
                p.uniform_(-bound, bound)

    def step(self, u_t: Tensor, state: State, dt: Tensor | None) -> State:
        y, z = state
        i_dt_bar, i_dt, i_y, i_z = self.inp2hid(u_t).chunk(4, dim=-1)
        h_dt_bar, h_dt, h_z = self.hid2hid(y).chunk(3, dim=-1)
        dt_bar = self.dt * torch.sigmoid(i_dt_bar + h_dt_bar)
        dt_z = self.dt * torch.sigmoid(i_dt + h_dt)
        z = (1.0 - dt_z) * z + dt_z * torch.tanh(i_z + h_z)
        y = (1.0 - dt_bar) * y + dt_bar * torch.tanh(self.transform_z(z) + i_y)
        return y, z
