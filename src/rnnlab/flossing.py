"""Gradient flossing (Engelken, NeurIPS 2023): drive the top Lyapunov exponents towards 0.

The loss is Σ_i λ_i² over the top k exponents of the backward product J_{T−1}ᵀ … J_1ᵀ along the
batch's trajectories, computed as `rnnlab.lyapunov` does (vector–Jacobian products of
``cell.step`` and QR every step) but with the graph kept through the products and the QR, so that
its gradient moves the parameters: exponents near 0 mean gradients that neither vanish nor
explode over the sequence. `prefloss` runs it alone before training.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rnnlab.lyapunov import LYAPUNOV_SEED


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
    generator = torch.Generator().manual_seed(LYAPUNOV_SEED)
    Q = torch.linalg.qr(torch.randn(S, D, k, generator=generator, dtype=torch.float64))[0]
    Q = Q.to(dtype=u.dtype, device=u.device)
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


def prefloss(model, batches, k: int, steps: int, lr: float = 1e-3) -> list[float]:
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
