"""Gradient flossing (Engelken, NeurIPS 2023): drive the top Lyapunov exponents towards 0.

The loss is Σ_i λ_i² over the top k exponents of the backward product J_{T−1}ᵀ … J_1ᵀ along the
batch's trajectories, computed as `rnnlab.lyapunov` does (vector–Jacobian products of
``cell.step`` and QR every step) but with the graph kept through the products and the QR, so that
its gradient moves the parameters: exponents near 0 mean gradients that neither vanish nor
explode over the sequence. `prefloss` runs it alone before training.

`Flossing` holds the settings ``model.flossing.{k, weight, pre_steps, every_n_steps, lr}`` that
switch it on in training (`rnnlab.model.RecurrentModel`): ``pre_steps`` Adam steps on the
flossing loss alone before the first training step, and weight · flossing loss added to the
training loss on every ``every_n_steps``-th step.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import Tensor

from rnnlab.config import ConfigError, is_number, require, require_int
from rnnlab.lyapunov import initial_vectors


@dataclass(frozen=True)
class Flossing:
    """``model.flossing``, checked: every key is required (conf/model/default.yaml has them).

    ``k``: exponents driven to 0; ``weight``: of the term added to the training loss (0: none);
    ``pre_steps``: Adam steps on the flossing loss alone before training (0: none);
    ``every_n_steps``: the term is added on the training steps that are multiples of it;
    ``lr``: the preflossing Adam's learning rate (None: ``model.optimizer.lr``).
    """

    k: int
    weight: float
    pre_steps: int
    every_n_steps: int
    lr: float | None

    def __post_init__(self) -> None:
        require_int("model.flossing.k", self.k)
        require(is_number(self.weight) and self.weight >= 0, "model.flossing.weight", self.weight,
                "a finite number >= 0 (0: no flossing term in the training loss)")
        require_int("model.flossing.pre_steps", self.pre_steps, minimum=0)
        require_int("model.flossing.every_n_steps", self.every_n_steps)
        require(self.lr is None or (is_number(self.lr) and self.lr > 0), "model.flossing.lr",
                self.lr, "null (use model.optimizer.lr) or a finite number > 0")

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> Flossing:
        """From the ``model.flossing`` mapping; None (a model built by hand): off."""
        if config is None:
            return cls(k=1, weight=0.0, pre_steps=0, every_n_steps=1, lr=None)
        require(isinstance(config, dict), "model.flossing", config,
                "a mapping {k, weight, pre_steps, every_n_steps, lr}")
        names = [f.name for f in fields(cls)]
        for key in config:
            if key not in names:
                raise ConfigError(f"model.flossing.{key} is not a flossing setting (they are "
                                  f"{', '.join(names)}); remove it (~model.flossing.{key})")
        for key in names:
            if key not in config:
                raise ConfigError(f"model.flossing.{key} is missing (set model.flossing.{key}=...)")
        return cls(**config)

    def due(self, step: int) -> bool:
        """Whether training step ``step`` adds the flossing term."""
        return self.weight > 0 and step % self.every_n_steps == 0


def lyapunov_exponents(model, x: Tensor, k: int, dt: Tensor | None = None) -> Tensor:
    """The top k exponents (log10 per step) of each sequence of x (S, T, input), (S, k),
    differentiable with respect to the model's parameters."""
    u = model.encoder(x)
    S, T = u.shape[:2]
    state = model.cell.init_state(S)
    inputs = u.unbind(1)
    dts = dt.unbind(1) if dt is not None else (None,) * T
    previous = []
    for t in range(T):
        previous.append(state)
        state = model.cell.step(inputs[t], state, dts[t])
    widths = [s.shape[1] for s in state]
    D = sum(widths)
    k = min(k, D)
    Q = initial_vectors(S, D, k, u)
    total = torch.zeros(S, k, dtype=u.dtype, device=u.device)
    for t in range(T - 1, 0, -1):
        z = tuple(s.repeat_interleave(k, 0) for s in previous[t])
        dt_t = dts[t].repeat_interleave(k, 0) if dts[t] is not None else None
        out = model.cell.step(inputs[t].repeat_interleave(k, 0), z, dt_t)
        cotangent = Q.transpose(1, 2).reshape(S * k, D).split(widths, 1)
        grads = torch.autograd.grad(out, z, cotangent, create_graph=True, allow_unused=True)
        V = torch.cat([g if g is not None else torch.zeros_like(s) for g, s in zip(grads, z)], 1)
        Q, R = torch.linalg.qr(V.reshape(S, k, D).transpose(1, 2))
        total = total + torch.log10(R.diagonal(dim1=-2, dim2=-1).abs())
    return total / (T - 1)


def flossing_loss(model, x: Tensor, k: int, dt: Tensor | None = None) -> Tensor:
    """Σ_{i ≤ k} λ_i², averaged over the sequences of x."""
    return lyapunov_exponents(model, x, k, dt).square().sum(1).mean()


def prefloss(model, batches: Iterable[dict[str, Tensor]], k: int, steps: int,
             lr: float = 1e-3) -> list[float]:
    """``steps`` Adam steps on `flossing_loss` alone, over ``batches`` (an iterable of batch
    dicts, cycled); returns the losses."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    iterator = iter(batches)
    for _ in range(steps):
        batch = next(iterator)
        loss = flossing_loss(model, batch["x"], k, batch.get("dt"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def cycled(dataset) -> Iterator[dict[str, Tensor]]:
    """Items 0, 1, … of a map-style dataset of whole batches (rnnlab's training batches in the
    order the first epoch draws them), starting again after the last."""
    index = 0
    while True:
        yield dataset[index % len(dataset)]
        index += 1
