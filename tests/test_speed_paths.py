"""Training on the fast path is the same model: monitored every step or almost never, the same
parameters come out; the float64 profile is exact where float32 underflows; the compiled loop
matches the plain loop."""

from __future__ import annotations

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from rnnlab import gradflow
from rnnlab.config import ConfigError
from rnnlab.model import RecurrentModel
from rnnlab.train import build, build_model

from .conftest import CONF

CELLS = sorted(p.stem for p in (CONF / "cell").glob("*.yaml"))
# Cells whose unmonitored steps take another path than the probed loop: the fused kernels
# (rnn tanh, gru, lstm), the whole-sequence odeint (and odeint_adjoint), and the compiled loop.
FAST_VARIANTS = {
    **{cell: [f"cell={cell}"] for cell in CELLS},
    "node_whole_sequence": ["cell=node", "cell.solver=euler", "cell.whole_sequence=true"],
    "node_rk4_auto": ["cell=node", "cell.solver=rk4"],  # whole_sequence=auto takes it
    # segments of one interval: the whole-grid adjoint's gradients are stepping's
    "node_adjoint_segments": ["cell=node", "cell.solver=rk4", "cell.adjoint=true",
                              "cell.adjoint_segment=1"],
    "rnn_relu": ["cell=rnn", "cell.nonlinearity=relu"],
}
STEPS = 6


def train_parameters(make_cfg, overrides: list[str], every: int) -> dict[str, torch.Tensor]:
    """Train STEPS steps in float64 with the monitor every ``every`` steps; the final parameters."""
    cfg = make_cfg(*overrides, "+trainer.precision=64-true", f"trainer.max_steps={STEPS}",
                   f"monitor.every_n_steps={every}", "monitor.jacobian_every_n_steps=0",
                   "task.seq_len=12", "task.train_batches=8", "+trainer.limit_val_batches=0",
                   "callbacks.model_checkpoint=null", "+trainer.enable_checkpointing=false",
                   "cell.hidden_size=6", "model.encoder_size=4",
                   "model.fast_path=true")  # each cell's whole-sequence path, whatever its speed
    torch.manual_seed(cfg.seed)
    task = build(cfg.task)
    model = build_model(cfg, task)
    initial = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    trainer = build(cfg.trainer, callbacks=[build(cfg.monitor)], logger=False)
    trainer.fit(model, datamodule=task)
    assert trainer.global_step == STEPS
    assert any(not torch.equal(p.detach(), initial[n]) for n, p in model.named_parameters())
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("variant", sorted(FAST_VARIANTS))
def test_monitoring_every_step_trains_the_same_parameters_as_monitoring_rarely(make_cfg, variant):
    overrides = FAST_VARIANTS[variant]
    probed = train_parameters(make_cfg, overrides, every=1)
    fast = train_parameters(make_cfg, overrides, every=1000)
    assert probed.keys() == fast.keys()
    for name in probed:
        assert probed[name].dtype == torch.float64
        torch.testing.assert_close(fast[name], probed[name], rtol=1e-10, atol=1e-12, msg=name)


class CaptureFirstStep(pl.Callback):
    """Keeps the batch and the weights of training step 0, before the update."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0:
            self.batch = {k: v.clone() for k, v in batch.items()}
            self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def first_profile(make_cfg, tmp_path, profile_dtype: str) -> tuple[np.ndarray, CaptureFirstStep]:
    """dL_dz of step 0 of a tanh RNN with W = 0.02·Q over T = 30 (the norm falls ~0.02 a step)."""
    cfg = make_cfg("cell=rnn", "cell.init=orthogonal", "cell.gain=0.02", "task.seq_len=30",
                   "trainer.max_steps=1", "+trainer.limit_val_batches=0",
                   "callbacks.model_checkpoint=null", "+trainer.enable_checkpointing=false",
                   f"monitor.profile_dtype={profile_dtype}", "monitor.jacobian_every_n_steps=0",
                   f"monitor.dirpath={tmp_path / profile_dtype / 'grad_flow'}")
    torch.manual_seed(cfg.seed)
    task = build(cfg.task)
    model = build_model(cfg, task)
    capture = CaptureFirstStep()
    trainer = build(cfg.trainer, callbacks=[capture, build(cfg.monitor)], logger=False)
    trainer.fit(model, datamodule=task)
    return gradflow.load(tmp_path / profile_dtype)["dL_dz"][0], capture


def reference_profile(weights: dict[str, torch.Tensor], batch: dict[str, torch.Tensor],
                      n_out: int) -> np.ndarray:
    """||∂L/∂z_t|| in float64 by autograd on a loop written out here, z_t = tanh(W z + U u + b)."""
    w = {k: v.double().requires_grad_() for k, v in weights.items()}
    x, y = batch["x"].double(), batch["y"].double()
    u = x @ w["encoder.weight"].T + w["encoder.bias"]
    z = torch.zeros(x.shape[0], w["cell.weight_hh"].shape[0], dtype=torch.float64)
    states = []
    for u_t in u.unbind(1):
        z = torch.tanh(u_t @ w["cell.weight_ih"].T + w["cell.bias_ih"]
                       + z @ w["cell.weight_hh"].T + w["cell.bias_hh"])
        states.append(z)
    read = torch.stack(states[len(states) - n_out:], dim=1)
    loss = F.mse_loss(read @ w["decoder.weight"].T + w["decoder.bias"], y)
    grads = torch.autograd.grad(loss, states)
    return np.array([float(torch.linalg.vector_norm(g)) for g in grads])


def test_float32_profile_underflows_to_zero_early_in_a_fast_vanishing_rnn(make_cfg, tmp_path):
    profile, _ = first_profile(make_cfg, tmp_path, "float32")
    assert profile[0] == 0.0 and profile[-1] > 0


def test_float64_profile_matches_float64_autograd_below_float32_range(make_cfg, tmp_path):
    profile, capture = first_profile(make_cfg, tmp_path, "float64")
    expected = reference_profile(capture.weights, capture.batch, n_out=1)
    assert expected[0] < 1e-45  # below the smallest float32
    assert np.all(profile > 0) and np.all(np.isfinite(profile))
    np.testing.assert_allclose(profile, expected, rtol=1e-9)


def test_float64_profile_leaves_the_training_update_unchanged(make_cfg):
    as_trained = train_parameters(make_cfg, ["cell=rnn"], every=1)
    in_float64 = train_parameters(make_cfg, ["cell=rnn", "monitor.profile_dtype=float64"], every=1)
    for name in as_trained:
        torch.testing.assert_close(in_float64[name], as_trained[name], rtol=1e-10, atol=1e-12)


def test_unknown_profile_dtype_is_a_config_error(make_cfg):
    with pytest.raises(ConfigError, match=r"monitor\.profile_dtype"):
        build(make_cfg("monitor.profile_dtype=float16").monitor)


NO_FUSED_KERNEL = {
    "rnn_sigmoid": {"_target_": "rnnlab.cells.rnn.ElmanRNN", "hidden_size": 6,
                    "nonlinearity": "sigmoid"},
    "node_manual_euler": {"_target_": "rnnlab.cells.ode.NeuralODE", "hidden_size": 6, "width": 8,
                          "solver": "manual_euler"},
}


@pytest.mark.slow  # compiling takes seconds to tens of seconds on a CPU
@pytest.mark.parametrize("cell", sorted(NO_FUSED_KERNEL))
def test_compiled_loop_matches_the_plain_loop(cell):
    torch.manual_seed(0)
    plain = RecurrentModel(NO_FUSED_KERNEL[cell], input_size=2, output_size=1, n_out=2,
                           encoder_size=4)
    compiled = RecurrentModel(NO_FUSED_KERNEL[cell], input_size=2, output_size=1, n_out=2,
                              encoder_size=4, compile=True)
    compiled.load_state_dict(plain.state_dict())
    x, y = torch.randn(5, 9, 2), torch.randn(5, 2, 1)
    outputs, grads = [], []
    for model in (plain, compiled):
        y_hat = model(x)
        model.loss_fn(y_hat, y).backward()
        outputs.append(y_hat.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    assert compiled._compiled_step is not None  # the compiled path ran
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6,
                                   msg=name)


CELL_CONFIGS = {"rnn": {"_target_": "rnnlab.cells.ElmanRNN", "hidden_size": 6},
                "gru": {"_target_": "rnnlab.cells.GRU", "hidden_size": 6},
                "lstm": {"_target_": "rnnlab.cells.LSTM", "hidden_size": 6}}


@pytest.mark.parametrize("cell, T, path", [("rnn", 9, "steps"), ("rnn", 130, "steps"),
                                           ("gru", 9, "chunks"), ("gru", 130, "chunks"),
                                           ("lstm", 9, "sequence"), ("lstm", 130, "sequence")])
@pytest.mark.parametrize("checkpoint_steps", [0, 50])
def test_auto_fast_path_takes_the_path_the_cell_says_is_fastest(cell, T, path, checkpoint_steps,
                                                                monkeypatch):
    """``model.fast_path=auto`` on a CPU: the LSTM's oneDNN kernel, the GRU's probed chunks
    with zero probes, the tanh RNN's steps, or its chunks when segments are checkpointed; true
    takes the cell's `sequence`, false steps; on a GPU (cuDNN) every one its `sequence`. The
    output and the gradients are the same function's (T = 130: chunks of 64 steps, or
    checkpointed segments of 50 run again in the backward)."""
    if path == "steps" and checkpoint_steps:
        path = "chunks"
    torch.manual_seed(0)
    models = {fast: RecurrentModel(CELL_CONFIGS[cell], input_size=2, output_size=1, n_out=3,
                                   encoder_size=4, fast_path=fast,
                                   checkpoint_steps=checkpoint_steps).double()
              for fast in ("auto", True, False)}
    for model in models.values():
        model.load_state_dict(models["auto"].state_dict())
    x = torch.randn(3, T, 2, dtype=torch.float64)
    y = torch.randn(3, 3, 1, dtype=torch.float64)
    assert models["auto"].plain_path(x) == path
    assert models[True].plain_path(x) == "sequence" and models[False].plain_path(x) == "steps"
    assert models["auto"].cell.plain_path(T, torch.device("cuda")) == "sequence"
    calls = {"sequence": 0, "chunks": 0}
    cell_type = type(models["auto"].cell)
    for name, key in (("sequence", "sequence"), ("probed_sequence", "chunks")):
        original = getattr(cell_type, name)
        monkeypatch.setattr(cell_type, name, lambda self, *a, _f=original, _k=key: (
            calls.__setitem__(_k, calls[_k] + 1), _f(self, *a))[1])
    outputs, grads = {}, {}
    for fast, model in models.items():
        outputs[fast] = model(x)
        model.loss_fn(outputs[fast], y).backward()
        grads[fast] = {n: p.grad for n, p in model.named_parameters()}
    chunks = -(-T // (checkpoint_steps or 64)) * (2 if checkpoint_steps else 1)  # recomputed
    assert calls == {"sequence": 1 + (path == "sequence"),
                     "chunks": chunks if path == "chunks" else 0}
    for fast in ("auto", True):
        torch.testing.assert_close(outputs[fast], outputs[False], rtol=1e-12, atol=1e-12)
        for name in grads[False]:
            torch.testing.assert_close(grads[fast][name], grads[False][name], rtol=1e-10,
                                       atol=1e-12, msg=f"{fast} {name}")


@pytest.mark.parametrize("cell, checkpoint_steps, chunks", [
    ("IndRNN", 0, 0), ("IndRNN", 4, 6), ("AntisymmetricRNN", 0, 1), ("AntisymmetricRNN", 4, 6)])
def test_a_cell_without_a_sequence_path_steps_or_runs_its_chunks(cell, checkpoint_steps, chunks,
                                                                monkeypatch):
    """IndRNN and the AntisymmetricRNN have no `sequence`. Under auto IndRNN's unprobed pass
    steps, or with checkpointed segments runs its probed chunks; the AntisymmetricRNN's always
    runs its chunks (W − Wᵀ − γI made once a chunk, not every step). T = 11: one chunk, or
    segments of 4, 4, 3, each again in the backward. The same function as stepping (float64)."""
    torch.manual_seed(0)
    config = {"_target_": f"rnnlab.cells.{cell}", "hidden_size": 5,
              **({"epsilon": 0.5, "sigma": 2.0} if cell == "AntisymmetricRNN" else {})}
    models = {fast: RecurrentModel(config, input_size=2, output_size=1, n_out=2, encoder_size=3,
                                   fast_path=fast, checkpoint_steps=checkpoint_steps).double()
              for fast in ("auto", False)}
    models[False].load_state_dict(models["auto"].state_dict())
    calls = []
    original = type(models["auto"].cell).probed_sequence
    monkeypatch.setattr(type(models["auto"].cell), "probed_sequence",
                        lambda self, *a: (calls.append(1), original(self, *a))[1])
    x, y = torch.randn(3, 11, 2, dtype=torch.float64), torch.randn(3, 2, 1, dtype=torch.float64)
    out = {}
    for fast, model in models.items():
        out[fast] = model(x)
        model.loss_fn(out[fast], y).backward()
        if fast == "auto":
            assert len(calls) == chunks
    assert not calls[chunks:]  # stepping (fast_path false) never runs a chunk
    torch.testing.assert_close(out["auto"], out[False], rtol=1e-12, atol=1e-12)
    for (name, p), q in zip(models["auto"].named_parameters(), models[False].parameters()):
        assert torch.count_nonzero(q.grad) > 0, name
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_a_cells_unknown_plain_path_is_refused(monkeypatch):
    model = RecurrentModel(CELL_CONFIGS["gru"], input_size=2, output_size=1, encoder_size=4)
    monkeypatch.setattr(type(model.cell), "plain_path", lambda self, T, device: "fused")
    with pytest.raises(ConfigError, match=r"GRU\.plain_path.*sequence, chunks, steps"):
        model(torch.randn(2, 5, 2))


def test_compile_must_be_a_boolean():
    with pytest.raises(ConfigError, match=r"model\.compile"):
        RecurrentModel(NO_FUSED_KERNEL["rnn_sigmoid"], input_size=2, output_size=1, compile="yes")


def probed_gradients(cell: str, checkpoint_steps: int) -> dict[str, torch.Tensor]:
    """Loss, probe, parameter-probe and parameter gradients of one probed float64 pass."""
    from omegaconf import OmegaConf

    from rnnlab.tasks import Adding

    from .conftest import default_dtype

    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "cell" / f"{cell}.yaml"))
    cfg["hidden_size"] = 6  # even: the LRU packs hidden_size/2 complex units
    torch.manual_seed(0)
    with default_dtype(torch.float64):
        model = RecurrentModel(cfg, input_size=2, output_size=1, encoder_size=3,
                               checkpoint_steps=checkpoint_steps)
    T, B = 11, 3
    batch = Adding(seq_len=T, batch_size=B).generate(B, torch.Generator().manual_seed(0))
    x, y = batch["x"].double(), batch["y"].double()
    probes = model.make_probes(B, T)
    param_probes = model.make_param_probes(T)
    loss = model.loss_fn(model(x, None, probes, param_probes), y)
    loss.backward()
    grads = {"loss": loss.detach()}
    grads.update({f"probe_{i}": p.grad for i, p in enumerate(probes)})
    grads.update({f"q_{m}.{n}": q.grad for m, qs in param_probes.items() for n, q in qs.items()})
    grads.update({n: p.grad for n, p in model.named_parameters()})
    return grads


@pytest.mark.parametrize("cell", CELLS)
def test_recomputed_segments_give_the_same_probed_gradients(cell):
    whole = probed_gradients(cell, checkpoint_steps=0)
    segmented = probed_gradients(cell, checkpoint_steps=4)  # segments of 4, 4 and 3 steps
    assert whole.keys() == segmented.keys()
    for name in whole:
        assert whole[name] is not None and torch.count_nonzero(whole[name]) > 0, name
        torch.testing.assert_close(segmented[name], whole[name], rtol=1e-12, atol=0, msg=name)


def test_training_with_recomputed_segments_trains_the_same_parameters(make_cfg):
    plain = train_parameters(make_cfg, ["cell=lstm"], every=1)
    segmented = train_parameters(make_cfg, ["cell=lstm", "model.checkpoint_steps=5"], every=1)
    for name in plain:
        torch.testing.assert_close(segmented[name], plain[name], rtol=1e-12, atol=0, msg=name)


def probe_gradients(cell: str, checkpoint_steps: int, project: bool,
                    n_out: int = 1, one_leaf: bool = False) -> dict[str, torch.Tensor]:
    """Loss, state-probe and parameter gradients of the monitor's probed float64 pass (state
    probes only, a leaf per chunk of steps), stepping from the cell's input projection or,
    ``project`` False, through `step`; ``one_leaf``: the same pass with one (T, B, H) probe
    leaf per state given to the model directly."""
    from omegaconf import OmegaConf

    from rnnlab.cells.base import state_keys
    from rnnlab.probing import ProbeRequest
    from rnnlab.tasks import Adding

    from .conftest import default_dtype

    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "cell" / f"{cell}.yaml"))
    cfg["hidden_size"] = 6
    torch.manual_seed(0)
    with default_dtype(torch.float64):
        model = RecurrentModel(cfg, input_size=2, output_size=1, encoder_size=3,
                               checkpoint_steps=checkpoint_steps, n_out=n_out)
    if not project:
        model.cell.input_projection = None
    T, B = 11, 3
    batch = Adding(seq_len=T, batch_size=B).generate(B, torch.Generator().manual_seed(0))
    y = torch.randn(B, n_out, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    if one_leaf:
        probes = model.make_probes(B, T)
        loss = model.loss_fn(model(batch["x"].double(), None, probes), y)
        leaves = dict(zip(state_keys(model.cell.state_names), ([p] for p in probes)))
    else:
        with model.probing(ProbeRequest(stream=False)) as passes:  # the gradients themselves
            loss = model.loss_fn(model(batch["x"].double()), y)
        leaves = {key: probes.leaves for key, (probes,) in passes[0].states.items()}
    loss.backward()
    grads = {"loss": loss.detach()}
    with model.trajectory(batch["x"].double()) as (_, previous):
        grads["trajectory"] = torch.stack([torch.cat(s, 1) for s in previous])
    for key, chunks in leaves.items():
        grads[key] = torch.cat([c.grad for c in chunks])
        grads[f"norms {key}"] = (grads[key].flatten(1).norm(dim=1) if one_leaf else
                                 torch.from_numpy(passes[0].states[key][0].norms()))
    grads.update({n: p.grad for n, p in model.named_parameters()})
    return grads


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm", "mingru", "lru", "indrnn",
                                  "antisymmetric", "cornn"])
@pytest.mark.parametrize("checkpoint_steps", [0, 4])
@pytest.mark.parametrize("n_out", [1, 6])
def test_probed_pass_from_the_input_projection_equals_stepping(cell, checkpoint_steps, n_out,
                                                               monkeypatch):
    """Chunks of 4 projected steps (and segments of 4, 4, 3), each one node where the cell has
    `Cell.probed_sequence` (else stepped by `Cell.projected_step`: IndRNN, coRNN), give
    stepping's probe and parameter gradients; the loss reads the last step, or the last 6
    across chunks. The trajectory's states are stepping's too."""
    monkeypatch.setattr("rnnlab.model.PROJECTION_STEPS", 4)
    stepped = probe_gradients(cell, checkpoint_steps, project=False, n_out=n_out)
    projected = probe_gradients(cell, checkpoint_steps, project=True, n_out=n_out)
    assert stepped.keys() == projected.keys()
    for name in stepped:
        assert torch.count_nonzero(stepped[name]) > 0, name
        torch.testing.assert_close(projected[name], stepped[name], rtol=1e-12, atol=1e-15,
                                   msg=name)


@pytest.mark.parametrize("cell", ["gru", "mingru", "indrnn", "cornn"])
@pytest.mark.parametrize("checkpoint_steps", [0, 4])
def test_a_probe_leaf_per_chunk_gives_one_leafs_gradients(cell, checkpoint_steps, monkeypatch):
    """The monitor's probes, a leaf per chunk of 4 steps (4, 4, 3), get the gradients one
    (T, B, H) leaf gets, chunk by chunk; projected and probed in chunks (GRU, minGRU), projected
    and stepped (IndRNN), stepped (coRNN)."""
    monkeypatch.setattr("rnnlab.model.PROJECTION_STEPS", 4)
    one = probe_gradients(cell, checkpoint_steps, project=True, n_out=6, one_leaf=True)
    chunked = probe_gradients(cell, checkpoint_steps, project=True, n_out=6)
    assert one.keys() == chunked.keys()
    for name in one:
        assert torch.count_nonzero(one[name]) > 0, name
        torch.testing.assert_close(chunked[name], one[name], rtol=1e-12, atol=1e-15, msg=name)


def probed_function_inputs(cell: str, zero_probes: bool) -> tuple:
    """A chunk's float64 inputs of the cell's probed Function: g (C, B, G), the start state,
    recurrent weights (and the GRU's b_hh), probes; every one a leaf to differentiate."""
    from rnnlab.cells.recurrences import ProbedElman, ProbedGRU, ProbedLSTM

    gen = torch.Generator().manual_seed(3)
    B, C, H = 2, 5, 3
    G = {"rnn": 1, "gru": 3, "lstm": 4}[cell] * H

    def leaf(*shape, scale=0.7):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).requires_grad_()

    states = {"rnn": 1, "gru": 1, "lstm": 2}[cell]
    start = [leaf(B, H) for _ in range(states)]
    weights = [leaf(G, H)] + ([leaf(G)] if cell == "gru" else [])
    probes = [leaf(C, B, H, scale=0.0 if zero_probes else 0.3) for _ in range(states)]
    function = {"rnn": ProbedElman, "gru": ProbedGRU, "lstm": ProbedLSTM}[cell]
    return function, (leaf(C, B, G), *start, *weights, *probes, None)


@pytest.mark.parametrize("zero_probes", [True, False])
def test_the_antisymmetric_chunk_matches_finite_differences_and_stepping(zero_probes):
    """`AntisymmetricChunk` (W − Wᵀ − γI made once a chunk): every gradient, W's through the
    state matrix among them, against central finite differences in float64, at a large step
    and far from h = 0 (ε = 0.5, σ = 2, where tanh saturates); with zero probes its states are
    the cell's `step`'s, the same numbers."""
    from rnnlab.cells.antisymmetric import AntisymmetricChunk, AntisymmetricRNN

    torch.manual_seed(0)
    cell = AntisymmetricRNN(3, 4, epsilon=0.5, gamma=0.1, sigma=2.0).double()
    C, B, H = 5, 2, 4
    gen = torch.Generator().manual_seed(3)

    def leaf(*shape, scale=0.7):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).requires_grad_()

    g, h0 = leaf(C, B, H), leaf(B, H)
    probes = leaf(C, B, H, scale=0.0 if zero_probes else 0.3)
    weight = cell.weight.detach().clone().requires_grad_()

    def chunk(g, h0, weight, probes):
        matrix = weight - weight.T - cell.gamma * torch.eye(H, dtype=torch.float64)
        return AntisymmetricChunk.apply(g, h0, matrix, probes, cell.epsilon)

    assert torch.autograd.gradcheck(chunk, (g, h0, weight, probes), eps=1e-6, atol=1e-8,
                                    rtol=1e-6)
    u = torch.randn(B, C, 3, dtype=torch.float64)
    h, stepped = torch.zeros(B, H, dtype=torch.float64), []
    for t in range(C):
        (h,) = cell.step(u[:, t], (h,), None)
        stepped.append(h)
    hs, (last,) = cell.probed_sequence(cell.input_projection(u.transpose(0, 1)),
                                       (torch.zeros(B, H, dtype=torch.float64),),
                                       (torch.zeros(C, B, H, dtype=torch.float64),), None)
    torch.testing.assert_close(hs, torch.stack(stepped), rtol=1e-14, atol=1e-15)
    torch.testing.assert_close(last, stepped[-1], rtol=0, atol=0)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("zero_probes", [True, False])
def test_probed_functions_match_finite_differences(cell, zero_probes):
    """Every gradient of the chunked probed step, with the probes at zero (the monitor's) and
    away from it, against central finite differences in float64 (`torch.autograd.gradcheck`);
    every output (each step's z[0], the last state) carries a random cotangent."""
    function, inputs = probed_function_inputs(cell, zero_probes)
    assert torch.autograd.gradcheck(lambda *x: function.apply(*x), inputs, eps=1e-6,
                                    atol=1e-8, rtol=1e-6)
