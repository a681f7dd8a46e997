"""The logged gradient norms against independent computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from rnnlab import gradflow
from rnnlab.model import RecurrentModel
from rnnlab.probing import ProbeRequest
from rnnlab.records import Jacobians, Record
from rnnlab.tasks import Adding
from rnnlab.train import build, build_model, train

from .conftest import float64_model


def rnn_model(**cell) -> RecurrentModel:
    """A float64 model, initialised in float64 (so an orthogonal W is orthogonal to 1e-16)."""
    cell = {"_target_": "rnnlab.cells.rnn.ElmanRNN", "hidden_size": 16, **cell}
    return float64_model(cell, encoder_size=8, seed=None)


def adding_batch(T: int, dtype=torch.float64) -> dict:
    batch = Adding(seq_len=T, batch_size=8).generate(8, torch.Generator().manual_seed(0))
    return {k: v.to(dtype) for k, v in batch.items()}


@pytest.mark.parametrize("gain", [0.9, 1.1])
def test_linear_orthogonal_rnn_gradient_scales_as_gain_power(gain):
    torch.manual_seed(0)
    T = 40
    model = rnn_model(nonlinearity="identity", init="orthogonal", gain=gain)
    dL_dz = gradflow.grad_flow(model, adding_batch(T)).profiles["dL_dz"]
    expected = gain ** (T - 1 - np.arange(T))
    np.testing.assert_allclose(dL_dz / dL_dz[-1], expected, rtol=1e-8)


@pytest.mark.parametrize("chunk", [64, 4])  # the probed loop's chunk of steps: one, or seven
@pytest.mark.parametrize("project", [True, False])  # one node per chunk, or stepped
def test_probe_profile_equals_retain_grad_profile_for_tanh(chunk, project, monkeypatch):
    monkeypatch.setattr("rnnlab.model.PROJECTION_STEPS", chunk)
    torch.manual_seed(1)
    T = 25
    model = rnn_model(nonlinearity="tanh", init="normal", gain=1.3)
    if not project:
        model.cell.input_projection = None
    batch = adding_batch(T)
    profile = gradflow.grad_flow(model, batch).profiles["dL_dz"]

    u = model.encoder(batch["x"])
    (z,) = model.cell.init_state(u.shape[0])
    states = []
    for u_t in u.unbind(1):
        (z,) = model.cell.step(u_t, (z,), None)
        z.retain_grad()
        states.append(z)
    torch.nn.functional.mse_loss(model.decoder(z).unsqueeze(1), batch["y"]).backward()
    expected = [s.grad.norm().item() for s in states]
    np.testing.assert_allclose(profile, expected, rtol=1e-10)


def test_a_passs_zero_probes_store_one_zero_each_and_get_dense_gradients():
    """The probes read as (T, B, H) zeros from a single stored one; after the backward pass
    their gradients are whole (T, B, H) tensors, the profile's rows, kept where the per-step
    contributions read them; without contributions only their rows' norms are kept, taken as
    the gradient arrived (`StateProbes.stream`)."""
    model = rnn_model()
    batch = adding_batch(12)
    kept = {}
    for contributions in (True, False):
        with model.probing(ProbeRequest(contributions=contributions)) as passes:
            loss = model.loss_fn(model(batch["x"]), batch["y"])
        (probes,) = passes[0].states["dL_dz"]
        (probe,) = probes.leaves
        assert probe.shape == (12, 8, 16) and probe.is_leaf
        assert probe.untyped_storage().nbytes() == probe.element_size()
        loss.backward(inputs=[probe])
        if contributions:
            assert probe.grad.shape == probe.shape and probe.grad.is_contiguous()
            assert (probe.grad[:-1] != 0).any(dim=(1, 2)).all()  # every step upstream of the read
            kept = probe.grad.flatten(1).norm(dim=1).double()
        else:
            assert probe.grad is None and probes.streamed is not None
            np.testing.assert_allclose(probes.norms(), kept.numpy(), rtol=1e-6)


def test_grad_flow_leaves_parameter_grads_untouched():
    model = rnn_model()
    gradflow.grad_flow(model, adding_batch(6))
    assert all(p.grad is None for p in model.parameters())


def test_grad_flow_module_norms_equal_autograd_parameter_gradients():
    torch.manual_seed(2)
    model = rnn_model()
    batch = adding_batch(10)
    record = gradflow.grad_flow(model, batch)
    model.loss_fn(model(batch["x"]), batch["y"]).backward()
    for module in ("encoder", "cell", "decoder"):
        grads = [p.grad.flatten() for p in getattr(model, module).parameters()]
        expected = torch.cat(grads).norm().item()
        assert record.grad_norms[f"grad_norm_{module}"] == pytest.approx(expected, rel=1e-12)


def test_per_step_grad_norms_equal_autograd_and_follow_changed_gradients(monkeypatch):
    torch.manual_seed(3)
    model = rnn_model()
    model.cell.weight_hh.requires_grad_(False)  # a parameter without a gradient
    batch = adding_batch(10)
    model.loss_fn(model(batch["x"]), batch["y"]).backward()
    norms = gradflow.GradNorms(model)
    squared_norms, read = gradflow.squared_norms, []  # the gradients each call reads
    monkeypatch.setattr(gradflow, "squared_norms", lambda grads: (
        read.append([id(g) for g in grads]), squared_norms(grads))[1])

    def expected(*modules: str) -> float:
        grads = [p.grad.flatten() for m in modules for p in getattr(model, m).parameters()
                 if p.grad is not None]
        return torch.cat(grads).norm().item()

    by_module = norms.modules()
    assert sorted(by_module) == ["grad_norm_cell", "grad_norm_decoder", "grad_norm_encoder"]
    for module in ("encoder", "cell", "decoder"):
        assert by_module[f"grad_norm_{module}"].item() == pytest.approx(expected(module),
                                                                         rel=1e-12)
        assert by_module[f"grad_norm_{module}"].dtype == torch.float64
        assert by_module[f"grad_norm_{module}"].dim() == 0
    assert len(read[0]) == sum(p.grad is not None for p in model.parameters())
    whole = expected("encoder", "cell", "decoder")
    vector = norms.take()  # the modules' norms in `keys`' order, then the total
    assert vector.dtype == torch.float64 and vector.shape == (4,)
    assert norms.keys == ["grad_norm_encoder", "grad_norm_cell", "grad_norm_decoder"]
    assert vector.tolist() == pytest.approx([expected("encoder"), expected("cell"),
                                             expected("decoder"), whole], rel=1e-12)
    assert norms.named(vector) == {k: vector[i] for i, k in enumerate(norms.keys)}
    read.clear()
    assert norms.total().item() == pytest.approx(whole, rel=1e-12)
    assert read == []  # every gradient's square reused: only their sum
    assert not norms.taken  # and the gradients let go of
    before = norms.total().item()  # nothing kept: every gradient read again, the same total
    assert before == pytest.approx(expected("encoder", "cell", "decoder"), rel=1e-12)

    norms.modules()
    model.decoder.weight.grad.mul_(3.0)  # written in place after modules(): read again
    model.encoder.bias.grad = torch.ones_like(model.encoder.bias)  # a new tensor: read again
    model.cell.bias_ih.grad = None  # gone: left out
    read.clear()
    changed = norms.total().item()
    assert sorted(read[0]) == sorted([id(model.decoder.weight.grad), id(model.encoder.bias.grad)])
    assert changed == pytest.approx(expected("encoder", "cell", "decoder"), rel=1e-12)
    assert changed != pytest.approx(before, rel=1e-6)
    assert gradflow.total_grad_norm(model).item() == pytest.approx(changed, rel=1e-12)
    by_module = norms.modules()  # a parameter fewer with a gradient: its own membership
    for module in ("encoder", "cell", "decoder"):
        assert by_module[f"grad_norm_{module}"].item() == pytest.approx(expected(module),
                                                                         rel=1e-12)
    for p in model.parameters():
        p.grad = None
    assert norms.total().item() == 0.0
    assert all(v.item() == 0.0 for v in norms.modules().values())
    assert norms.take().tolist() == [0.0] * 4


def test_squared_norms_equal_float64_vector_norms_of_any_dtype():
    torch.manual_seed(0)
    grads = [torch.randn(300, 70), torch.randn(7).half(), torch.randn(5).bfloat16(),
             torch.randn(3, dtype=torch.float64), torch.zeros(0),
             torch.tensor([3e38, -3e38]),  # its square overflows float32, not float64
             torch.tensor([1e-30, 2e-30])]  # its square underflows float32, not float64
    squares = gradflow.squared_norms(grads)
    assert squares.dtype == torch.float64
    for g, square in zip(grads, squares):
        reference = float(np.sum(g.double().numpy().astype(np.float64) ** 2))
        assert square.item() == pytest.approx(reference, rel=1e-13, abs=0)
    nonfinite = gradflow.squared_norms([torch.tensor([1.0, float("inf")]),
                                        torch.tensor([float("nan")])])
    assert torch.isinf(nonfinite[0]) and torch.isnan(nonfinite[1])
    assert gradflow.squared_norms([]).shape == (0,)


def test_training_record_at_step_zero_equals_grad_flow_on_first_batch(make_cfg, tmp_path):
    cfg = make_cfg("trainer.max_steps=1", "task.seq_len=15")
    train(cfg)
    (recorded,) = [dict(np.load(p)) for p in (tmp_path / "run" / "grad_flow").iterdir()]

    pl.seed_everything(cfg.seed)  # rebuild the untrained model exactly as train() does
    task = build(cfg.task)
    model = build_model(cfg, task)
    batch = next(iter(task.train_dataloader()))
    expected = gradflow.grad_flow(model, batch).arrays()
    np.testing.assert_allclose(recorded["dL_dz"], expected["dL_dz"], rtol=1e-5)
    assert recorded["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    for module in ("encoder", "cell", "decoder"):
        key = f"grad_norm_{module}"
        assert recorded[key] == pytest.approx(expected[key], rel=1e-5)


@pytest.mark.parametrize("gain", [0.8, 0.95, 1.0, 1.05, 1.2])
def test_decay_rate_is_log10_gain_for_geometric_profile(gain):
    T = 60
    summary = gradflow.summarize(gain ** (T - 1 - np.arange(T)))
    assert summary["decay_rate"] == pytest.approx(math.log10(gain), abs=1e-12)
    assert summary["log10_first_last"] == pytest.approx((T - 1) * math.log10(gain), abs=1e-9)


@pytest.mark.parametrize("seed", range(4))
def test_decay_rate_is_numpys_least_squares_fit_over_the_finite_nonzero_norms(seed):
    """The slope against `np.polyfit` (its own SVD solve) on rough profiles over 14 decades
    with zeros, infinities and nans left out of the fit; nan when fewer than two remain."""
    rng = np.random.default_rng(seed)
    T = 2 + 97 * seed
    profile = 10.0 ** rng.uniform(-14, 0, T)
    profile[rng.random(T) < 0.2] = rng.choice([0.0, np.inf, np.nan])
    profile[[0, -1]] = 1e-3, 1.0  # at least two points in the fit
    with np.errstate(divide="ignore", invalid="ignore"):
        kept = np.isfinite(np.log10(profile))
    back = (T - 1 - np.arange(T))[kept]
    expected = np.polyfit(back, np.log10(profile[kept]), 1)[0]
    assert gradflow.summarize(profile)["decay_rate"] == pytest.approx(expected, rel=1e-12,
                                                                      abs=1e-14)
    assert math.isnan(gradflow.summarize(np.array([0.5, 0.0, np.nan]))["decay_rate"])


def test_horizon_counts_steps_back_within_a_thousandth_of_the_maximum():
    T, gain = 100, 0.9
    profile = gain ** (T - 1 - np.arange(T))
    # gain**k >= 1e-3  <=>  k <= 3 / -log10(gain) = 65.56…
    assert gradflow.summarize(profile)["horizon"] == math.floor(3 / -math.log10(gain))
    assert gradflow.summarize(np.ones(T))["horizon"] == T - 1


def test_load_stacks_records_in_step_order(tmp_path):
    for step in (10, 0, 5):
        Record(step, {"dL_dz": np.full(4, float(step))}, loss=1.0).save(tmp_path / "grad_flow")
    record = gradflow.load(tmp_path)
    assert record["step"].tolist() == [0, 5, 10]
    assert record["dL_dz"].shape == (3, 4) and record["dL_dz"][:, 0].tolist() == [0, 5, 10]
    assert record["T"].tolist() == [4, 4, 4]


def test_load_names_the_directory_when_it_holds_no_records(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no step_\*\.npz \(or steps_\*\.npz\) in "):
        gradflow.load(tmp_path)


def test_load_fills_a_key_missing_on_some_steps_with_nan(tmp_path):
    Record(0, {"dL_dz": np.ones(3)}, jacobians=Jacobians(np.full(3, 2.0), math.log10(2.0))
           ).save(tmp_path / "grad_flow")
    Record(1, {"dL_dz": np.ones(3)}).save(tmp_path / "grad_flow")
    record = gradflow.load(tmp_path)
    assert record["jacobian_norm"].shape == (2, 3)
    assert record["jacobian_norm"][0].tolist() == [2.0, 2.0, 2.0]
    assert np.isnan(record["jacobian_norm"][1]).all()
