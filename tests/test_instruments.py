"""The gradient-flow instruments against independent computations, and what training logs of them.

Per-step parameter contributions, transition Jacobians, the recurrent matrix's spectrum, gradient
clipping, the TensorBoard custom-scalars layout and the hparams tab.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util

from rnnlab import callbacks, gradflow
from rnnlab.callbacks import chosen_timesteps
from rnnlab.cells import Cell
from rnnlab.config import ConfigError
from rnnlab.figures import BOUND_DECADES, plt, profile_figure
from rnnlab.model import MODULES, RecurrentModel
from rnnlab.records import Jacobians, Record
from rnnlab.tasks import Adding
from rnnlab.train import build, build_model, train

from .conftest import CONF, exact_jacobian_norms, float64_model

CELLS = sorted(p.stem for p in (CONF / "cell").glob("*.yaml"))


def make_model(cell: str = "rnn", **overrides) -> RecurrentModel:
    """A float64 model around conf/cell/<cell>.yaml, initialised in float64."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "cell" / f"{cell}.yaml"))
    cfg.update({"hidden_size": 6, **overrides})
    return float64_model(cfg)


def adding_batch(T: int, B: int = 5) -> dict:
    batch = Adding(seq_len=T, batch_size=B).generate(B, torch.Generator().manual_seed(0))
    return {k: v.double() for k, v in batch.items()}


def events(run) -> EventAccumulator:
    accumulator = EventAccumulator(str(run),
                                   size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    accumulator.Reload()
    return accumulator


def first_batch_gradient(cfg) -> torch.Tensor:
    """The float64 gradient of the first training batch's loss for the untrained model, flattened,
    computed apart from the trainer (the model is rebuilt exactly as train() builds it)."""
    pl.seed_everything(cfg.seed)
    task = build(cfg.task)
    model = build_model(cfg, task).double()
    batch = next(iter(task.train_dataloader()))
    loss = model.loss_fn(model(batch["x"].double()), batch["y"].double())
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))])


# --- per-step parameter contributions -----------------------------------------------------------
@pytest.mark.parametrize("cell", CELLS)
def test_param_contributions_sum_to_the_autograd_gradient_of_every_shared_parameter(cell):
    model = make_model(cell)
    batch = adding_batch(12)
    param_probes = model.make_param_probes(12)
    loss = model.loss_fn(model(batch["x"], None, None, param_probes), batch["y"])
    probes = {(m, n): q for m, qs in param_probes.items() for n, q in qs.items()}
    probe_grads = dict(zip(probes, torch.autograd.grad(loss, list(probes.values()))))

    expected_loss = model.loss_fn(model(batch["x"]), batch["y"])  # the plain (fast) path
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-12)
    for module in MODULES:
        params = dict(getattr(model, module).named_parameters())
        expected = torch.autograd.grad(expected_loss, list(params.values()), retain_graph=True)
        for (name, _), g in zip(params.items(), expected):
            torch.testing.assert_close(probe_grads[module, name].sum(0), g, rtol=1e-10,
                                       atol=1e-12, msg=f"{module}.{name}")


def per_step_copies_contributions(model: RecurrentModel, batch: dict) -> dict[str, np.ndarray]:
    """dL/dW⁽ᵗ⁾ for the Elman RNN by giving every step its own copy of every parameter, written
    out by hand (no probes, no functional_call): ||dL/dW⁽ᵗ⁾|| per module, (T,) each."""
    x, y = batch["x"], batch["y"]
    B, T = x.shape[:2]
    copies = {m: [{n: p.detach().clone().requires_grad_() for n, p in
                   getattr(model, m).named_parameters()} for _ in range(T)] for m in MODULES}
    z = torch.zeros(B, model.cell.hidden_size, dtype=x.dtype)
    for t in range(T):
        enc, cell = copies["encoder"][t], copies["cell"][t]
        u = x[:, t] @ enc["weight"].T + enc["bias"]
        z = torch.tanh(u @ cell["weight_ih"].T + cell["bias_ih"]
                       + z @ cell["weight_hh"].T + cell["bias_hh"])
    dec = copies["decoder"][T - 1]
    loss = F.mse_loss((z @ dec["weight"].T + dec["bias"]).unsqueeze(1), y)
    loss.backward()
    return {f"dL_dW_{m}": np.array([
        math.sqrt(sum(float(p.grad.square().sum()) if p.grad is not None else 0.0
                      for p in copies[m][t].values())) for t in range(T)]) for m in MODULES}


def test_param_contribution_norms_equal_those_of_an_unrolled_net_with_per_step_copies():
    model = make_model("rnn", nonlinearity="tanh", init="normal", gain=1.4)
    batch = adding_batch(10)
    record = gradflow.grad_flow(model, batch, param_contributions=True)
    for key, expected in per_step_copies_contributions(model, batch).items():
        np.testing.assert_allclose(record.contributions[key], expected, rtol=1e-10, atol=1e-14,
                                   err_msg=key)


def per_step_probe_contributions(model: RecurrentModel, batch: dict) -> np.ndarray:
    """||dL/dW⁽ᵗ⁾|| of the cell from a parameter probe q_t on every step of the forward pass."""
    param_probes = model.make_param_probes(batch["x"].shape[1])
    loss = model.loss_fn(model(batch["x"], None, None, param_probes), batch["y"])
    grads = torch.autograd.grad(loss, list(param_probes["cell"].values()), allow_unused=True)
    return torch.stack([g.flatten(1).square().sum(1) for g in grads if g is not None]
                       ).sum(0).sqrt().numpy()


@pytest.mark.parametrize("cell", CELLS)
def test_streamed_cell_contributions_equal_per_step_parameter_probes(cell):
    """The monitor's cell contributions, taken after the backward pass a chunk of steps at a
    time (one vmap per chunk where the step allows it), against probing W + q_t in the pass."""
    model = make_model(cell)
    batch = adding_batch(12)
    record = gradflow.grad_flow(model, batch, param_contributions=True)
    np.testing.assert_allclose(record.contributions["dL_dW_cell"],
                               per_step_probe_contributions(model, batch), rtol=1e-10,
                               atol=1e-14)
    if cell in ("rnn", "gru", "lstm", "mingru", "lru", "indrnn", "antisymmetric"):
        assert model.batched_contributions and model.cell.step_parameter_grads is not None


@pytest.mark.parametrize("cell, options", [
    ("rnn", {"nonlinearity": "tanh"}), ("rnn", {"nonlinearity": "relu"}),
    ("rnn", {"nonlinearity": "sigmoid"}), ("rnn", {"nonlinearity": "identity"}),
    ("gru", {}), ("lstm", {}), ("mingru", {}), ("lru", {}), ("indrnn", {}),
    ("indrnn", {"horizon": 3, "magnitude": 1.2}), ("antisymmetric", {}),
    ("antisymmetric", {"epsilon": 0.5, "gamma": 0.1, "sigma": 2.0})])
def test_written_out_per_step_parameter_gradients_equal_the_vmap_of_autograd(cell, options):
    """A cell's `step_parameter_grads` against `per_step_parameter_grads` (vmap of the step's
    vector–Jacobian product) on random states and cotangents, every parameter, every step."""
    from rnnlab.steps import per_step_parameter_grads

    torch.manual_seed(5)
    model = make_model(cell, **options)
    C, B, H = 7, 4, model.cell.hidden_size
    u = torch.randn(C, B, model.cell.input_size, dtype=torch.float64)
    previous = tuple(torch.randn(C, B, H, dtype=torch.float64) for _ in model.cell.state_names)
    cotangents = tuple(torch.randn(C, B, H, dtype=torch.float64) for _ in previous)
    if cell == "mingru":  # where c + 1/2 = σ(c), at c = 0, g' is the mean of both sides
        u[0, 0] = 0
        with torch.no_grad():
            model.cell.candidate.bias[:3] = 0
        c = model.cell.candidate(u[0, 0])
        assert torch.equal(c[:3] + 0.5, torch.sigmoid(c[:3]))
    if "horizon" in options:  # some weights beyond the bound, where w gets no gradient
        with torch.no_grad():
            model.cell.recurrent[::2] = 1.5
    written = model.cell.step_parameter_grads(u, previous, cotangents, None)
    by_vmap = per_step_parameter_grads(model.cell, u, previous, cotangents, None)
    assert len(written) == len(by_vmap) == len(list(model.cell.parameters()))
    for name, a, b in zip(dict(model.cell.named_parameters()), written, by_vmap):
        assert a.shape == b.shape == (C, *model.cell.get_parameter(name).shape), name
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13, msg=name)


def test_a_constrained_rnn_steps_its_contributions_by_vmap():
    """With constraint=orthogonal the parameter is Q's generator, not W: no written-out form,
    and the vmap's contributions still equal the per-step probes'."""
    model = make_model("rnn", init="orthogonal", constraint="orthogonal")
    assert model.cell.step_parameter_grads is None
    batch = adding_batch(8)
    record = gradflow.grad_flow(model, batch, param_contributions=True)
    np.testing.assert_allclose(record.contributions["dL_dW_cell"],
                               per_step_probe_contributions(model, batch), rtol=1e-10,
                               atol=1e-14)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "mingru"])
def test_contributions_in_chunks_bounded_by_the_activations_equal_per_step_probes(
        cell, monkeypatch):
    """Chunks of 5 steps (the activation bound: 5 × batch × state width values), the last one
    short, give the same contributions as probing every step in the pass."""
    model = make_model(cell)
    batch = adding_batch(12)
    rows, width = batch["x"].shape[0], sum(s[0].numel() for s in model.cell.init_state(1))
    monkeypatch.setattr("rnnlab.model.CONTRIBUTION_ACTIVATION_VALUES", 5 * rows * width + 1)
    assert model.contribution_chunk_steps(rows) == 5
    record = gradflow.grad_flow(model, batch, param_contributions=True)
    np.testing.assert_allclose(record.contributions["dL_dW_cell"],
                               per_step_probe_contributions(model, batch), rtol=1e-10,
                               atol=1e-14)


class ItemCell(Cell):
    """z_t = tanh(W z + U u) · s with s read by .item(): a step vmap cannot batch."""

    def __init__(self, input_size: int, hidden_size: int = 6):
        super().__init__(input_size, hidden_size)
        self.input = torch.nn.Linear(input_size, hidden_size)
        self.recurrent = torch.nn.Linear(hidden_size, hidden_size, bias=False)

    def step(self, u_t, state, dt):
        (z,) = state
        scale = 1.0 if float(z.abs().max().item()) < 1e6 else 0.5
        return (scale * torch.tanh(self.input(u_t) + self.recurrent(z)),)


def test_a_step_vmap_cannot_batch_gets_its_contributions_step_by_step(caplog):
    model = float64_model({"_target_": f"{__name__}.ItemCell", "hidden_size": 6})
    batch = adding_batch(9)
    with caplog.at_level("INFO", logger="rnnlab.model"):
        record = gradflow.grad_flow(model, batch, param_contributions=True)
    assert not model.batched_contributions
    assert "ItemCell: per-step parameter contributions step by step" in caplog.text
    np.testing.assert_allclose(record.contributions["dL_dW_cell"],
                               per_step_probe_contributions(model, batch), rtol=1e-10,
                               atol=1e-14)


def test_decoder_contributes_only_at_the_step_the_loss_reads():
    model = make_model("rnn")
    record = gradflow.grad_flow(model, adding_batch(8), param_contributions=True)
    decoder = record.contributions["dL_dW_decoder"]
    assert (decoder[:-1] == 0).all()
    assert decoder[-1] == pytest.approx(record.grad_norms["grad_norm_decoder"], rel=1e-12)


def test_param_contributions_leave_the_models_parameter_grads_untouched():
    model = make_model("rnn")
    gradflow.grad_flow(model, adding_batch(6), param_contributions=True, jacobian_iterations=3)
    assert all(p.grad is None for p in model.parameters())


# --- transition Jacobians ----------------------------------------------------------------------
SPREAD_SINGULAR_VALUES = {"node": {"dt": 1.0}, "lem": {"dt": 1.0},
                          "cornn": {"dt": 1.0, "gamma": 1.0, "epsilon": 1.0},
                          "antisymmetric": {"epsilon": 1.0, "sigma": 1.0}}


@pytest.mark.parametrize("cell", CELLS)
def test_jacobian_norm_is_the_largest_singular_value_of_the_autograd_jacobian(cell):
    # The ODE's J = I + δt·∂g/∂z has clustered singular values at small δt, where power
    # iteration needs thousands of steps (measured: 4e-6 off after 300 at δt = 0.1, exact after
    # 3000); δt = 1 spreads them, so 300 suffice to check the method to 1e-8. The same for the
    # other cells with a small step (coRNN, LEM, AntisymmetricRNN: 1e-4 off at their defaults).
    model = make_model(cell, **SPREAD_SINGULAR_VALUES.get(cell, {}))
    batch = adding_batch(6, B=3)
    record = gradflow.jacobians(model, batch, iterations=300)
    np.testing.assert_allclose(record.jacobian_norm, exact_jacobian_norms(model, batch),
                               rtol=1e-8)


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_jacobian_norms_in_small_batches_of_timesteps_equal_those_in_one(cell, monkeypatch):
    model, batch = make_model(cell), adding_batch(7, B=3)
    whole = gradflow.jacobians(model, batch, iterations=20).jacobian_norm
    monkeypatch.setattr(gradflow, "JACOBIAN_ROWS", 2 * 3)  # batches of 2 timesteps, one of 1
    batched = gradflow.jacobians(model, batch, iterations=20).jacobian_norm
    np.testing.assert_allclose(batched, whole, rtol=1e-12)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm", "node", "antisymmetric"])
def test_jacobian_norms_over_segments_of_the_trajectory_equal_those_over_the_whole(cell,
                                                                                monkeypatch):
    # The Jacobians hold one segment of the trajectory at a time: segments of 2 timesteps
    # (batches of 2) continue each other's states and start vectors, and give the norms that
    # the whole trajectory in one pass gives (to rounding: a segment's input projection is a
    # matmul over its own steps).
    model, batch = make_model(cell), adding_batch(7, B=3)
    monkeypatch.setattr(gradflow, "JACOBIAN_ROWS", 2 * 3)
    with model.trajectory(batch["x"]) as (u, previous):
        whole = gradflow.transition_jacobian_norms(model.cell, u, previous, None, 3)
        states = [torch.cat(s) for s in previous]
    monkeypatch.setattr(gradflow, "JACOBIAN_SEGMENTS", 1)
    segmented = gradflow.jacobians(model, batch, iterations=3).jacobian_norm  # 3 < the state:
    np.testing.assert_allclose(segmented, whole.amax(1).double().numpy(), rtol=1e-12)  # starts
    pieces = [(t0, [torch.cat(s) for s in p]) for t0, _, _, p
              in model.trajectory_segments(batch["x"], None, 3)]
    assert [t0 for t0, _ in pieces] == [0, 3, 6]
    for a, b in zip([s for _, p in pieces for s in p], states, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    assert model.training  # restored


def test_linear_orthogonal_rnn_jacobians_are_the_gain_and_their_product_is_the_profile():
    gain, T = 0.9, 20
    model = make_model("rnn", nonlinearity="identity", init="orthogonal", gain=gain)
    record = gradflow.grad_flow(model, adding_batch(T), jacobian_iterations=2).arrays()
    np.testing.assert_allclose(record["jacobian_norm"], gain, rtol=1e-12)
    assert record["jacobian_rate"] == pytest.approx(math.log10(gain), abs=1e-12)
    np.testing.assert_allclose(gradflow.jacobian_bound(record["dL_dz"], record["jacobian_norm"]),
                               record["dL_dz"], rtol=1e-10)
    np.testing.assert_allclose(record["recurrent_singular_values"], gain, rtol=1e-12)
    assert record["recurrent_spectral_radius"] == pytest.approx(gain, rel=1e-12)


def test_jacobian_bound_holds_for_a_tanh_rnn_read_at_the_last_step():
    T = 25
    model = make_model("rnn", nonlinearity="tanh", init="normal", gain=2.0)
    record = gradflow.grad_flow(model, adding_batch(T), jacobian_iterations=50).arrays()
    bound = gradflow.jacobian_bound(record["dL_dz"], record["jacobian_norm"])
    assert (record["dL_dz"] <= bound * (1 + 1e-9)).all()
    assert record["log10_first_last"] <= (T - 1) * record["jacobian_rate"] + 1e-9


def test_jacobian_bound_is_the_last_norm_times_the_later_jacobian_norms():
    bound = gradflow.jacobian_bound(np.array([9.0, 9.0, 9.0, 5.0]), np.array([7.0, 2.0, 3.0, 4.0]))
    np.testing.assert_allclose(bound, [5.0 * 2 * 3 * 4, 5.0 * 3 * 4, 5.0 * 4, 5.0])


@pytest.mark.parametrize("jacobian_norm", [2.0, 1e4])  # 10^300 and past float64: inf
def test_profile_figure_draws_a_bound_hundreds_of_decades_above_the_profile(jacobian_norm):
    T = 1000
    dL_dz = np.linspace(0.01, 0.02, T)
    record = Record(7, {"dL_dz": dL_dz},
                    jacobians=Jacobians(np.full(T, jacobian_norm), math.log10(jacobian_norm)))
    fig = profile_figure(record, step=7)
    fig.canvas.draw()  # ticks and layout: a log axis up to 1e300 overflowed here
    profile, bound = fig.axes[0].get_lines()
    drawn = bound.get_ydata()
    assert np.nanmax(drawn) <= dL_dz.max() * 10.0 ** BOUND_DECADES
    assert np.isfinite(drawn).sum() >= 1  # the bound's end, where it meets the profile
    np.testing.assert_array_equal(profile.get_ydata(), dL_dz)
    low, high = fig.axes[0].get_ylim()
    assert 0 < low <= dL_dz.min() and high <= dL_dz.max() * 10.0 ** (BOUND_DECADES + 1)


def test_recurrent_spectrum_matches_numpy():
    model = make_model("rnn", init="normal", hidden_size=7)
    W = model.cell.weight_hh.detach().numpy()
    spectrum = gradflow.recurrent_spectrum(model.cell)
    np.testing.assert_allclose(spectrum.recurrent_singular_values,
                               np.linalg.svd(W, compute_uv=False), rtol=1e-12)
    assert spectrum.recurrent_spectral_norm == pytest.approx(np.linalg.norm(W, 2), rel=1e-12)
    assert spectrum.recurrent_spectral_radius == pytest.approx(
        np.abs(np.linalg.eigvals(W)).max(), rel=1e-12)


# --- through training: the gain sweep, clipping, what is logged ---------------------------------
@pytest.mark.parametrize("gain", [0.7, 0.9, 1.0, 1.1, 1.3])
def test_gain_sweep_of_linear_orthogonal_rnn_records_decay_rate_log10_gain(make_cfg, tmp_path,
                                                                          gain):
    train(make_cfg("cell.nonlinearity=identity", "cell.init=orthogonal", f"cell.gain={gain}",
                   "cell.hidden_size=16", "task.seq_len=30", "trainer.max_steps=1"))
    record = gradflow.load(tmp_path / "run")
    assert record["decay_rate"][0] == pytest.approx(math.log10(gain), abs=1e-6)
    assert record["jacobian_rate"][0] == pytest.approx(math.log10(gain), abs=1e-6)
    assert record["recurrent_spectral_radius"][0] == pytest.approx(gain, rel=1e-6)


EXPLODING = ("cell.nonlinearity=tanh", "cell.init=orthogonal", "cell.gain=3", "cell.hidden_size=16",
             "task.seq_len=30", "trainer.max_steps=2", "+trainer.precision=64")


def test_clipping_by_norm_caps_an_exploding_tanh_rnn_and_records_both_norms(make_cfg, tmp_path):
    cfg = make_cfg(*EXPLODING, "trainer.gradient_clip_val=1.0",
                   "trainer.gradient_clip_algorithm=norm")
    train(cfg)
    record = gradflow.load(tmp_path / "run")
    assert record["log10_first_last"][0] > 1  # ||dL/dz_0|| over 10× ||dL/dz_{T−1}||: exploding
    expected = float(first_batch_gradient(cfg).norm())
    assert expected > 10
    assert record["grad_norm_total"][0] == pytest.approx(expected, rel=1e-10)
    # torch's clip_grad_norm_ scales by max_norm / (norm + 1e-6)
    np.testing.assert_allclose(record["grad_norm_total_clipped"],
                               record["grad_norm_total"] / (record["grad_norm_total"] + 1e-6),
                               rtol=1e-10)


def test_clipping_by_value_clamps_every_gradient_entry(make_cfg, tmp_path):
    cfg = make_cfg(*EXPLODING, "trainer.gradient_clip_val=0.01",
                   "trainer.gradient_clip_algorithm=value")
    train(cfg)
    record = gradflow.load(tmp_path / "run")
    gradient = first_batch_gradient(cfg)
    assert record["grad_norm_total"][0] == pytest.approx(float(gradient.norm()), rel=1e-10)
    assert record["grad_norm_total_clipped"][0] == pytest.approx(
        float(gradient.clamp(-0.01, 0.01).norm()), rel=1e-10)


def test_without_clipping_the_clipped_norm_equals_the_norm(make_cfg, tmp_path):
    train(make_cfg("task.seq_len=8"))
    record = gradflow.load(tmp_path / "run")
    np.testing.assert_allclose(record["grad_norm_total_clipped"], record["grad_norm_total"],
                               rtol=1e-12)
    modules = np.sqrt(sum(record[f"grad_norm_{m}"] ** 2 for m in MODULES))
    np.testing.assert_allclose(record["grad_norm_total"], modules, rtol=1e-10)


def test_training_records_equal_grad_flow_with_every_instrument_on_the_first_batch(make_cfg,
                                                                                   tmp_path):
    cfg = make_cfg("trainer.max_steps=1", "task.seq_len=15", "monitor.jacobian_iterations=7")
    train(cfg)
    recorded = {k: v[0] for k, v in gradflow.load(tmp_path / "run").items()}
    pl.seed_everything(cfg.seed)
    task = build(cfg.task)
    model = build_model(cfg, task)
    batch = next(iter(task.train_dataloader()))
    expected = gradflow.grad_flow(model, batch, param_contributions=True,
                                 jacobian_iterations=7).arrays()
    for key in [f"dL_dW_{m}" for m in MODULES] + ["jacobian_norm", "recurrent_singular_values"]:
        np.testing.assert_allclose(recorded[key], expected[key], rtol=1e-5, atol=1e-9,
                                   err_msg=key)
    for key in ("jacobian_rate", "recurrent_spectral_radius"):
        assert recorded[key] == pytest.approx(expected[key], rel=1e-5)


def test_jacobians_run_on_multiples_of_their_own_interval_and_are_nan_elsewhere(make_cfg,
                                                                               tmp_path):
    train(make_cfg("trainer.max_steps=5", "task.seq_len=6", "monitor.jacobian_every_n_steps=2"))
    record = gradflow.load(tmp_path / "run")
    assert record["step"].tolist() == [0, 1, 2, 3, 4]
    measured = ~np.isnan(record["jacobian_rate"])
    assert measured.tolist() == [True, False, True, False, True]
    assert np.isnan(record["jacobian_norm"][~measured]).all()
    assert (record["jacobian_norm"][measured] > 0).all()


def test_monitor_profile_records_neither_contributions_nor_jacobians(make_cfg, tmp_path):
    train(make_cfg("monitor=profile", "monitor.every_n_steps=1", "task.seq_len=6"))
    record = gradflow.load(tmp_path / "run")
    assert "dL_dz" in record and "grad_norm_total" in record
    assert not [k for k in record if k.startswith(("dL_dW_", "jacobian", "recurrent"))]


def test_new_tensorboard_scalars_equal_grad_flow_records(make_cfg, tmp_path):
    train(make_cfg("task.seq_len=12", "trainer.max_steps=4", "monitor.every_n_steps=2",
                   "monitor.jacobian_every_n_steps=2", "trainer.gradient_clip_val=0.5",
                   "monitor.num_timesteps=5"))
    record = gradflow.load(tmp_path / "run")
    accumulator = events(tmp_path / "run")
    steps = record["step"].tolist()
    for key in [f"dL_dW_{m}" for m in MODULES] + ["jacobian_norm"]:
        for t in chosen_timesteps(12, None, 5):
            logged = accumulator.Scalars(f"{key}/t_{t:04d}")
            assert [e.step for e in logged] == steps
            np.testing.assert_allclose([e.value for e in logged], record[key][:, t], rtol=1e-6)
    for tag, key in [("grad_flow/jacobian_rate", "jacobian_rate"),
                     ("recurrent/spectral_norm", "recurrent_spectral_norm"),
                     ("recurrent/spectral_radius", "recurrent_spectral_radius")]:
        logged = accumulator.Scalars(tag)
        assert [e.step for e in logged] == steps
        np.testing.assert_allclose([e.value for e in logged], record[key], rtol=1e-6)
    for tag, key in [("grad_norm/total", "grad_norm_total"),
                     ("grad_norm/total_clipped", "grad_norm_total_clipped")]:
        by_step = {e.step: e.value for e in accumulator.Scalars(tag)}
        assert sorted(by_step) == [0, 1, 2, 3]  # every step
        np.testing.assert_allclose([by_step[s] for s in steps], record[key], rtol=1e-6)


def read_layout(accumulator: EventAccumulator) -> dict[str, list[str]]:
    """Chart title → tag regexes, from the custom-scalars layout in the event file."""
    (event,) = accumulator.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(event.tensor_proto).item())
    return {chart.title: list(chart.multiline.tag) for c in layout.category for chart in c.chart}


def test_custom_scalars_layout_puts_each_instruments_timesteps_on_one_chart(make_cfg, tmp_path):
    train(make_cfg("task.seq_len=12", "trainer.max_steps=1", "monitor.num_timesteps=5"))
    accumulator = events(tmp_path / "run")
    layout = read_layout(accumulator)
    scalars = accumulator.Tags()["scalars"]
    charted = {title: sorted(t for t in scalars if any(re.search(r, t) for r in regexes))
               for title, regexes in layout.items()}
    times = chosen_timesteps(12, None, 5)
    for prefix in ["dL_dz", *(f"dL_dW_{m}" for m in MODULES), "jacobian_norm"]:
        expected = [f"{prefix}/t_{t:04d}" for t in times]
        assert expected in charted.values(), f"no chart holds exactly the {prefix} timesteps"
    assert ["grad_norm/total", "grad_norm/total_clipped"] in charted.values()
    assert ["grad_flow/decay_rate", "grad_flow/jacobian_rate",
            "grad_flow/predicted_decay_rate"] in charted.values()
    assert all(charted.values()), "a chart matches no logged tag"


def test_custom_scalars_layout_without_timesteps_charts_the_summaries(make_cfg, tmp_path):
    train(make_cfg("task.seq_len=12", "trainer.max_steps=1"))
    accumulator = events(tmp_path / "run")
    scalars = accumulator.Tags()["scalars"]
    charted = {title: sorted(t for t in scalars if any(re.search(r, t) for r in regexes))
               for title, regexes in read_layout(accumulator).items()}
    for tags in (["grad_flow/decay_rate", "grad_flow/jacobian_rate",
                  "grad_flow/predicted_decay_rate"],
                 ["grad_flow/log10_first_last"], ["grad_flow/horizon"]):
        assert tags in charted.values()
    assert not [t for tags in charted.values() for t in tags if "/t_" in t]
    assert all(charted.values()), "a chart matches no logged tag"


def latest(values: np.ndarray) -> float:
    """The last finite value of a record field over the monitored steps."""
    finite = values[np.isfinite(values)]
    assert finite.size
    return float(finite[-1])


def test_by_default_jacobians_and_spectrum_come_on_the_least_multiple_above_a_period(
        make_cfg, tmp_path, monkeypatch):
    """auto: the monitored steps that are multiples of the least multiple of every_n_steps
    ≥ INSTRUMENT_STEPS (500; 5 here, so the run stays short): 6 for every_n_steps = 2."""
    monkeypatch.setattr(callbacks, "INSTRUMENT_STEPS", 5)
    train(make_cfg("task.seq_len=6", "trainer.max_steps=13", "monitor.every_n_steps=2"))
    record = gradflow.load(tmp_path / "run")
    assert record["step"].tolist() == [0, 2, 4, 6, 8, 10, 12]
    assert record["step"][np.isfinite(record["jacobian_rate"])].tolist() == [0, 6, 12]
    assert record["step"][np.isfinite(record["predicted_decay_rate"])].tolist() == [0, 6, 12]


def test_hparams_tab_holds_the_config_and_the_final_metrics(make_cfg, tmp_path):
    metrics = train(make_cfg("task.seq_len=9", "cell.gain=1.3", "trainer.max_steps=3"))
    record = gradflow.load(tmp_path / "run")
    accumulator = events(tmp_path / "run")
    content = {tag: plugin_data_pb2.HParamsPluginData.FromString(data)
               for tag, data in accumulator.PluginTagToContent("hparams").items()}
    hparams = content["_hparams_/session_start_info"].session_start_info.hparams
    assert hparams["cell/gain"].number_value == 1.3
    assert hparams["task/seq_len"].number_value == 9
    assert hparams["cell/_target_"].string_value == "rnnlab.cells.rnn.ElmanRNN"
    assert not any(name.startswith("hydra") for name in hparams)
    metric_tags = [m.name.tag for m in content["_hparams_/experiment"].experiment.metric_infos]
    expected = {"final/val_loss": metrics["val/loss"], "final/val_baseline": 1 / 6,
                "final/val_accuracy": metrics["val/accuracy"],
                "final/decay_rate": record["decay_rate"][-1],
                "final/log10_first_last": record["log10_first_last"][-1],
                "final/horizon": record["horizon"][-1],
                # measured on fewer steps (auto: every 10th monitored one): the latest measured
                "final/jacobian_rate": latest(record["jacobian_rate"]),
                "final/predicted_decay_rate": latest(record["predicted_decay_rate"]),
                "final/train_seconds_per_step": metrics["train/seconds_per_step"],
                "final/train_peak_memory_mb": metrics["train/peak_memory_mb"]}
    assert sorted(metric_tags) == sorted(expected)
    for tag, value in expected.items():
        (event,) = accumulator.Scalars(tag)
        assert event.step == metrics["step"]
        assert event.value == pytest.approx(value, rel=1e-6)
    assert "hp_metric" not in accumulator.Tags()["scalars"]


# --- bad settings ------------------------------------------------------------------------------
BAD = [
    (("monitor.every_n_steps=2", "monitor.jacobian_every_n_steps=3"),
     "monitor.jacobian_every_n_steps must be 0 (off) or a multiple of monitor.every_n_steps = 2, "
     "got 3"),
    (("monitor.jacobian_every_n_steps=-1",),
     "monitor.jacobian_every_n_steps must be an integer >= 0, got -1"),
    (("monitor.jacobian_iterations=0",), "monitor.jacobian_iterations must be an integer >= 1"),
    (("monitor.param_contributions=sometimes",),
     "monitor.param_contributions must be true or false, got 'sometimes'"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[b[0][-1] for b in BAD])
def test_bad_monitor_setting_names_key_and_fix_before_training(make_cfg, tmp_path, overrides,
                                                               message):
    with pytest.raises(ConfigError) as error:
        train(make_cfg(*overrides))
    key = overrides[-1].split("=")[0]
    assert message in str(error.value) and f"(set {key}=...)" in str(error.value)
    assert not (tmp_path / "run" / "grad_flow").exists()


def test_images_are_drawn_every_nth_record_and_at_the_last(make_cfg, tmp_path):
    train(make_cfg("task.seq_len=6", "trainer.max_steps=5", "monitor.figure_every_n_records=3"))
    accumulator = events(tmp_path / "run")
    assert gradflow.load(tmp_path / "run")["step"].tolist() == [0, 1, 2, 3, 4]
    for tag in ("grad_flow/profile", "grad_flow/heatmap"):
        assert [e.step for e in accumulator.Images(tag)] == [0, 3, 4]


def test_a_figure_that_cannot_be_drawn_is_a_warning_and_training_goes_on(make_cfg, tmp_path,
                                                                         monkeypatch, caplog):
    from rnnlab import callbacks

    def broken(record, step):
        plt.figure()  # left open by the failure: the monitor closes it
        raise OverflowError("cannot convert float infinity to integer")

    monkeypatch.setattr(callbacks, "profile_figure", broken)
    open_before = set(plt.get_fignums())
    metrics = train(make_cfg("task.seq_len=6", "trainer.max_steps=3",
                             "monitor.figure_every_n_records=1"))
    assert metrics["step"] == 3
    assert gradflow.load(tmp_path / "run")["step"].tolist() == [0, 1, 2]  # every record kept
    assert "grad_flow figures of step 0 not drawn (OverflowError" in caplog.text
    assert f"its record in {tmp_path / 'run' / 'grad_flow'} holds their values" in caplog.text
    assert set(plt.get_fignums()) == open_before
    assert not events(tmp_path / "run").Tags()["images"]
