"""Profiles stay exact where the squares of float64 gradients leave float64's range."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from rnnlab import gradflow
from rnnlab.probing import (
    ProbedPass,
    StateProbes,
    float64_copy,
    norms_over_processes,
    row_norms,
)
from rnnlab.tasks import Adding

from .conftest import CONF, float64_model


@pytest.mark.parametrize("magnitude", [1e-300, 1e-200, 1e-160, 1e-100, 1.0, 1e200, 1e300])
def test_row_norms_of_float64_rows_at_any_magnitude(magnitude):
    row = torch.tensor([3.0, -4.0, 0.0, 12.0], dtype=torch.float64) * magnitude  # ‖·‖ = 13·m
    rows = torch.stack([row, torch.zeros(4, dtype=torch.float64)])
    np.testing.assert_allclose(row_norms(rows).numpy(), [13 * magnitude, 0.0], rtol=1e-15)


def test_row_norms_keep_non_finite_rows_non_finite():
    rows = torch.tensor([[math.inf, 1.0], [math.nan, 1e-200]], dtype=torch.float64)
    norms = row_norms(rows)
    assert math.isinf(norms[0]) and math.isnan(norms[1])


@pytest.mark.parametrize("block_values", [7, 2**20])
def test_row_norms_of_float32_rows_are_float64_sums_in_any_blocks(monkeypatch, block_values):
    # float32 squares underflow below ~1e-19 and overflow above ~1e19; float64's do not. Rows
    # of 5 values, blocks of 1 row (7 values) or all of them: the same float64 norms.
    monkeypatch.setattr("rnnlab.probing.ROW_NORM_BLOCK_VALUES", block_values)
    generator = torch.Generator().manual_seed(0)
    scales = torch.tensor([1e-30, 1e-20, 1.0, 1e20, 1e30, 0.0])
    rows = (torch.randn(6, 5, generator=generator) * scales[:, None]).float()
    expected = [math.sqrt(math.fsum(float(v) ** 2 for v in row.double())) for row in rows]
    norms = row_norms(rows)
    assert norms.dtype == torch.float64 and norms.shape == (6,)
    np.testing.assert_allclose(norms.numpy(), expected, rtol=1e-15)
    assert norms[0] > 0 and math.isfinite(norms[4])  # a float32 accumulation gives 0 and inf
    assert row_norms(rows[:0]).shape == (0,)


def test_float64_copies_of_row_blocks_reuse_one_buffer_per_thread(monkeypatch):
    # A fresh float64 copy per block grew the resident memory by its size at every block
    # (glibc served the allocations in between from the freed copy): one buffer, reused, grown
    # only for a larger block, and copies equal to .double().
    monkeypatch.setattr("rnnlab.probing.SCRATCH", threading.local())
    monkeypatch.setattr("rnnlab.probing.ROW_NORM_BLOCK_VALUES", 16)
    generator = torch.Generator().manual_seed(0)
    small, large = torch.randn(3, 5, generator=generator), torch.randn(4, 9, generator=generator)
    first = float64_copy(small)
    torch.testing.assert_close(first, small.double(), rtol=0, atol=0)
    again = float64_copy(small.t())  # strided: copied as it reads
    torch.testing.assert_close(again, small.t().double(), rtol=0, atol=0)
    assert again.data_ptr() == first.data_ptr()
    grown = float64_copy(large)  # 36 values > 16: a larger buffer, kept for what follows
    torch.testing.assert_close(grown, large.double(), rtol=0, atol=0)
    assert float64_copy(small).data_ptr() == grown.data_ptr()
    seen = []
    thread = threading.Thread(target=lambda: seen.append(float64_copy(small).data_ptr()))
    thread.start()
    thread.join()
    assert seen[0] != grown.data_ptr()  # another thread's own buffer
    # row_norms through it: every block's norms as vector_norm in float64 gives them
    rows = torch.randn(50, 7, generator=generator)
    np.testing.assert_allclose(row_norms(rows).numpy(), torch.linalg.vector_norm(
        rows, dim=1, dtype=torch.float64).numpy(), rtol=1e-15)


def test_streamed_probes_give_the_kept_gradients_norms_and_keep_no_gradient():
    # The probes' norms taken as each chunk's gradient arrives (and the gradient dropped) equal
    # the norms of the gradients kept to the end; a leaf the loss does not reach reads 0.
    generator = torch.Generator().manual_seed(0)
    weights = torch.randn(7, 3, 2, generator=generator, dtype=torch.float64)
    weights[6] = 0
    passes = []
    for streamed in (False, True):
        leaves = [torch.zeros(n, 3, 2, dtype=torch.float64, requires_grad=True) for n in (3, 3, 1)]
        probes = StateProbes(leaves, [1] * 7)
        if streamed:
            probes.stream()
        used = torch.cat(leaves[:2])  # the last leaf takes no part: no gradient
        (((used + 1) ** 3) * weights[:6] * 1e-200).sum().backward()
        passes.append((probes, leaves))
    (kept, kept_leaves), (streamed, streamed_leaves) = passes
    assert all(leaf.grad is None for leaf in streamed_leaves)
    assert kept_leaves[0].grad is not None
    np.testing.assert_array_equal(streamed.norms(), kept.norms())
    assert streamed.norms()[6] == 0 and (streamed.norms()[:6] > 0).all()  # 1e-200: float64 rows
    # gradients given by autograd.grad run no hook: the norms are those of the .grad set
    leaves = [torch.zeros(n, 3, 2, dtype=torch.float64, requires_grad=True) for n in (3, 3, 1)]
    probes = StateProbes(leaves, [1] * 7)
    probes.stream()
    grads = torch.autograd.grad((((torch.cat(leaves[:2]) + 1) ** 3) * weights[:6] * 1e-200).sum(),
                                leaves[:2])
    for leaf, g in zip(leaves, grads):
        leaf.grad = g
    np.testing.assert_array_equal(probes.norms(), kept.norms())


def test_streamed_probes_refuse_a_second_gradient_and_other_layouts():
    leaf = torch.zeros(2, 3, requires_grad=True)
    probes = StateProbes([leaf], [1, 1])
    probes.stream()
    (leaf * 2).sum().backward()
    with pytest.raises(RuntimeError, match="second gradient"):
        (leaf * 3).sum().backward()
    with pytest.raises(ValueError, match="chunk layout"):
        StateProbes([torch.zeros(5, 3, requires_grad=True)], [2, 3]).stream()


@pytest.mark.parametrize("layout", ["one leaf", "a leaf per step"])
def test_state_norms_of_tiny_float64_gradients_in_both_layouts(layout):
    T, B, H = 4, 3, 2
    grad = torch.arange(1.0, T * B * H + 1, dtype=torch.float64).reshape(T, B, H)
    grad = grad * torch.tensor([1e-300, 1e-170, 1.0, 1e250], dtype=torch.float64)[:, None, None]
    expected = [math.sqrt(sum(float(v / s) ** 2 for v in grad[t].flatten())) * s
                for t, s in enumerate([1e-300, 1e-170, 1.0, 1e250])]
    if layout == "one leaf":
        leaf = torch.zeros(T, B, H, dtype=torch.float64)
        leaf.grad = grad
        probes = StateProbes([leaf], [1] * T)
    else:
        leaves = [torch.zeros(B, H, dtype=torch.float64) for _ in range(T)]
        for leaf, g in zip(leaves, grad):
            leaf.grad = g
        probes = StateProbes(leaves, [B] * T)
    np.testing.assert_allclose(probes.norms(), expected, rtol=1e-14)


def test_norms_over_processes_sum_squares_below_float64s_square_range():
    # Two processes as the rows of one tensor; the reduce is the all-reduce sum over them. The
    # squares of their norms (1e-400) underflow; the combined norm √(3² + 4²)·1e-200 does not.
    norms = torch.tensor([[3e-200, 1.0, 0.0], [4e-200, 0.0, 0.0]], dtype=torch.float64)

    def all_reduce_sum(x):
        return x.sum(0, keepdim=True).expand_as(x)

    def in_place_all_reduce_sum(x):  # as torch.distributed and Lightning's strategies do
        return x.copy_(x.sum(0, keepdim=True).expand_as(x))

    for reduce in (all_reduce_sum, in_place_all_reduce_sum):
        combined = norms_over_processes(norms.clone(), reduce)
        np.testing.assert_allclose(combined.numpy(), [[5e-200, 1.0, 0.0]] * 2, rtol=1e-15)


def test_float64_profile_of_a_linear_orthogonal_rnn_below_1e_minus_154():
    """W = g·Q, identity activation: ‖∂L/∂z_t‖ = g^(T−1−t)·‖∂L/∂z_{T−1}‖ exactly (Q orthogonal),
    here down to ~1e-190, where √(Σ x²) in float64 gives 0."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "cell" / "rnn.yaml"))
    cfg.update({"hidden_size": 6, "nonlinearity": "identity", "init": "orthogonal",
                "gain": 0.5})
    model = float64_model(cfg, encoder_size=4)
    T = 640
    batch = Adding(seq_len=T, batch_size=2).generate(2, torch.Generator().manual_seed(0))
    record = gradflow.grad_flow(model, {k: v.double() for k, v in batch.items()})
    profile = record.profiles["dL_dz"]
    expected = profile[-1] * 0.5 ** (T - 1 - np.arange(T))
    assert expected[0] < 1e-180
    np.testing.assert_allclose(profile, expected, rtol=1e-9)


def test_contributions_of_tiny_float64_gradients_kept_and_streamed():
    """dL_dW_<module>: √(Σ over parameters and entries of (dL/dW⁽ᵗ⁾)²) at t, at 1e-200 and 1e250."""
    T = 4
    scale = torch.tensor([1e-200, 1e-170, 1.0, 1e250], dtype=torch.float64)
    weight = torch.arange(1.0, T * 6 + 1, dtype=torch.float64).reshape(T, 2, 3)
    weight = weight * scale[:, None, None]
    bias = -torch.arange(1.0, T * 2 + 1, dtype=torch.float64).reshape(T, 2) * scale[:, None]
    expected = [math.sqrt(sum(float(v / s) ** 2 for v in torch.cat([weight[t].flatten(),
                                                                     bias[t]]))) * float(s)
                for t, s in enumerate(scale)]
    q_weight, q_bias = torch.zeros_like(weight), torch.zeros_like(bias)
    q_weight.grad, q_bias.grad = weight, bias
    kept = ProbedPass(states={}, params={"cell": {"weight": q_weight, "bias": q_bias}})
    streamed = ProbedPass(states={}, streamed={"cell": lambda: iter(
        [[weight[:2], bias[:2]], [weight[2:], bias[2:]]])})
    for probed in (kept, streamed):
        np.testing.assert_allclose(probed.contributions()["dL_dW_cell"], expected, rtol=1e-14)
