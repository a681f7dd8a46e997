"""The chunked scan of a diagonal linear recurrence h_t = a_t ⊙ h_{t−1} + b_t, and its adjoint.

PyTorch has no associative scan. `linear_scan` splits the T steps into C chunks of about √T
steps: one loop over the L steps of a chunk runs every chunk at once (each from h = 0, keeping
the running product of the a_t), one loop over the C chunks carries the state from chunk to
chunk, and one pass adds each chunk's carried-in state times the running products. That is
L + C ≈ 2√T tensor operations instead of T, each on B·C·H values, and no division: where
0 ≤ |a_t| ≤ 1 (minGRU's 1 − z_t, the LRU's λ) the products only shrink, so nothing overflows.

It is an autograd Function: the backward pass is the same scan run backwards in time,
g_t = ∂L/∂h_t + conj(a_{t+1}) ⊙ g_{t+1}, with ∂L/∂b_t = g_t, ∂L/∂a_t = g_t ⊙ conj(h_{t−1}),
∂L/∂h_{−1} = conj(a_0) ⊙ g_0 (conj: complex inputs, PyTorch's convention), so the graph holds
a, h and h_{−1} and not the L + C steps. Real or complex; a either (B, T, H) or (H,), the same
every step (the LRU's λ, whose running products are then powers λ^k).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def linear_scan(a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
    """h_t = a_t ⊙ h_{t−1} + b_t for t = 0 … T−1 from h_{−1} = h0, every t at once.

    a: (B, T, H), or (H,) for the same a every step; b: (B, T, H); h0: (B, H). Returns h
    (B, T, H), equal to the step-by-step loop up to rounding, and its exact gradients.
    """
    return LinearScan.apply(a, b, h0)


class LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, h0: Tensor) -> Tensor:
        h = chunked_scan(a, b, h0, reverse=False)
        ctx.save_for_backward(a, h, h0)
        return h

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        a, h, h0 = ctx.saved_tensors
        if a.dim() == 1:  # the same a every step: g_t = ∂L/∂h_t + conj(a) g_{t+1}, g_T = 0
            g = chunked_scan(a.conj(), grad, torch.zeros_like(h0), reverse=True)
            a_first = a
        else:  # a_{t+1} multiplies g_{t+1}, and nothing comes after T−1
            a_next = torch.empty_like(a)
            a_next[:, :-1] = a[:, 1:]
            a_next[:, -1] = 0
            g = chunked_scan(a_next.conj(), grad, torch.zeros_like(h0), reverse=True)
            a_first = a[:, 0]
        grad_h0 = a_first.conj() * g[:, 0]
        if a.dim() == 1:  # summed over the batch and every step
            grad_a = (g[:, 1:] * h[:, :-1].conj()).sum((0, 1)) + (g[:, 0] * h0.conj()).sum(0)
        else:
            grad_a = torch.empty_like(g)
            torch.mul(g[:, 1:], h[:, :-1].conj(), out=grad_a[:, 1:])
            torch.mul(g[:, 0], h0.conj(), out=grad_a[:, 0])
        return grad_a, g, grad_h0


def chunk_length(T: int) -> int:
    """About √T: a divisor of T within a factor 2 of √T where there is one (no padding)."""
    root = max(1, math.isqrt(T))
    divisors = [d for d in range(max(1, root // 2), 2 * root + 1) if T % d == 0]
    return min(divisors, key=lambda d: abs(d - root)) if divisors else root


def chunked_scan(a: Tensor, b: Tensor, h0: Tensor, reverse: bool) -> Tensor:
    """The scan without autograd: forwards (h_{−1} = h0 before t = 0) or, with ``reverse``,
    backwards in time (h0 after t = T−1: h_t = a_t ⊙ h_{t+1} + b_t). Shapes as `linear_scan`."""
    B, T, H = b.shape
    L = chunk_length(T)
    C = -(-T // L)
    pad = C * L - T
    constant = a.dim() == 1
    with torch.no_grad():
        if pad:  # steps with a = 1, b = 0 past the far end (before the start when reversed)
            where = (0, 0, pad, 0) if reverse else (0, 0, 0, pad)
            b = torch.nn.functional.pad(b, where)
            if not constant:
                a = torch.nn.functional.pad(a, where, value=1.0)
        b4 = b.reshape(B, C, L, H)
        a4 = None if constant else a.reshape(B, C, L, H)
        steps = range(L - 1, -1, -1) if reverse else range(L)
        # inside every chunk at once, from 0: the states and the running products of a over
        # the steps taken (a^(k+1) forwards, a^(L−k) backwards where a is the same every step)
        local = torch.empty_like(b4)
        if constant:
            products = torch.cumprod(a.expand(L, H), dim=0)  # (L, H)
            products = products.flip(0) if reverse else products
        else:
            products = torch.empty_like(a4)
        h = torch.zeros_like(b4[:, :, 0])
        product = None
        for k in steps:
            a_k = a if constant else a4[:, :, k]
            h = torch.addcmul(b4[:, :, k], a_k, h, out=local[:, :, k])
            if not constant:
                product = (products[:, :, k].copy_(a_k) if product is None
                           else torch.mul(product, a_k, out=products[:, :, k]))
        # the state each chunk starts from, carried over the chunks
        starts = torch.empty_like(b4[:, :, 0])
        state = h0
        edge = 0 if reverse else L - 1  # the chunk's last step in the scan's direction
        for c in (range(C - 1, -1, -1) if reverse else range(C)):
            starts[:, c] = state
            carried = products[edge] if constant else products[:, c, edge]
            state = torch.addcmul(local[:, c, edge], carried, state)
        scale = products[None, None] if constant else products
        out = torch.addcmul(local, scale, starts[:, :, None]).reshape(B, C * L, H)
    return out[:, pad:] if reverse else out[:, :T]
