"""Gradient flossing against independent values."""

from __future__ import annotations

import copy
import io
import itertools
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf
from rich.console import Console

from rnnlab import gradflow
from rnnlab.config import ConfigError, compose_config
from rnnlab.flossing import lyapunov_exponents, prefloss
from rnnlab.lyapunov import LYAPUNOV_SEED, lyapunov
from rnnlab.report import write_report
from rnnlab.tasks import Adding
from rnnlab.train import build, build_model, train

from .conftest import CONF, FAST, float64_model


def rnn(gain: float, H: int = 8):
    cell = {"_target_": "rnnlab.cells.rnn.ElmanRNN", "hidden_size": H, "init": "normal",
            "gain": gain}
    return float64_model(cell, encoder_size=4)


def batches(T: int):
    task, generator = Adding(seq_len=T, batch_size=4), torch.Generator().manual_seed(0)
    return ({k: v.double() for k, v in task.generate(4, generator).items()}
            for _ in itertools.count())


def test_differentiable_exponents_equal_the_monitors_with_qr_every_step():
    model, batch = rnn(1.5), next(batches(25))
    measured = lyapunov(model, batch, k=3, ons_every=1)
    # The monitor leaves the first tenth of the steps out; with T = 25 that is 2 steps, so
    # compare the sums over every step instead: the flossing exponents average all 24.
    exponents = lyapunov_exponents(model, batch["x"], k=3).detach()
    assert exponents.shape == (4, 3)
    assert torch.isfinite(exponents).all()
    top = exponents[:, 0].mean()
    assert float(top) == pytest.approx(float(measured.lyapunov[0]), abs=0.05)


def test_preflossing_brings_the_top_exponent_and_the_measured_decay_near_zero():
    model, stream = rnn(0.5), batches(20)
    batch = next(stream)
    before = gradflow.grad_flow(model, batch, lyapunov_k=2)
    losses = prefloss(model, stream, k=2, steps=80, lr=2e-2)
    after = gradflow.grad_flow(model, batch, lyapunov_k=2)
    assert before.lyapunov.lyapunov[0] < -0.2  # vanishing: a decade every 5 steps or faster
    assert losses[-1] < losses[0] / 10
    assert abs(after.lyapunov.lyapunov[0]) < 0.03  # the tolerance: 0.6 decades over T = 20
    assert abs(after.summary.decay_rate) < 0.05  # and the profile follows


# --- switched on from the config: model.flossing ------------------------------------------------
# A tanh RNN whose gradient vanishes by a third of a decade per step (W ~ N(0, 0.5²/H)).
VANISHING = ["task.seq_len=20", "cell.init=normal", "cell.gain=0.5", "model.flossing.k=2",
             "model.flossing.lr=0.02", "monitor.lyapunov_k=2", "monitor.lyapunov_ons_every=1",
             "monitor.profile_dtype=float64", "trainer.max_steps=1"]


def first_record(make_cfg, tmp_path: Path, *overrides: str) -> dict[str, np.ndarray]:
    cfg = make_cfg(*VANISHING, *overrides, output_dir=tmp_path / "_".join(overrides))
    train(cfg)
    GlobalHydra.instance().clear()
    records = gradflow.load(cfg.paths.output_dir)
    return {key: records[key][0] for key in ("lyapunov", "decay_rate")}


def test_preflossing_from_the_config_sets_the_top_exponent_near_zero_and_the_decay_follows(
        make_cfg, tmp_path):
    # The monitor's record of step 0 is taken after preflossing, before the first update.
    before = first_record(make_cfg, tmp_path, "model.flossing.pre_steps=0")
    after = first_record(make_cfg, tmp_path, "model.flossing.pre_steps=80")
    assert before["lyapunov"][0] < -0.2
    assert abs(after["lyapunov"][0]) < 0.03  # the tolerance: 0.6 decades over T = 20
    # The measured profile's decay follows the top exponent, before and after (measured
    # differences: 0.004 and 0.008 decades per step).
    for record in (before, after):
        assert record["decay_rate"] == pytest.approx(record["lyapunov"][0], abs=0.02)


def reference_flossing_loss(model, batch: dict, k: int) -> float:
    """mean_b Σ_{i ≤ k} λ_i², the exponents from exact float64 Jacobians J_t = ∂z_t/∂z_{t−1}
    (torch.autograd.functional.jacobian) and NumPy QR of J_tᵀ Q, t = T−1 … 1, every step,
    from the same start vectors."""
    model = copy.deepcopy(model).double()
    u = model.encoder(batch["x"].double()).detach()
    B, T = u.shape[:2]
    H = model.cell.hidden_size
    # the same start for every sequence: k orthonormal columns of a seeded Gaussian (H, k)
    start = torch.randn(H, k, generator=torch.Generator().manual_seed(LYAPUNOV_SEED),
                        dtype=torch.float64).numpy()
    total = 0.0
    for b in range(B):
        states = [torch.zeros(1, H, dtype=torch.float64)]
        for t in range(T):
            states.append(model.cell.step(u[b, t:t + 1], (states[-1],), None)[0].detach())
        Q, logs = np.linalg.qr(start)[0], np.zeros(k)
        for t in range(T - 1, 0, -1):
            J = torch.autograd.functional.jacobian(
                lambda z, u_t=u[b, t:t + 1]: model.cell.step(u_t, (z,), None)[0], states[t])
            Q, R = np.linalg.qr(J[0, :, 0].numpy().T @ Q)
            logs += np.log10(np.abs(np.diag(R)))
        total += np.sum((logs / (T - 1)) ** 2)
    return total / B


def fit(make_cfg, *overrides: str, steps: int = 3):
    """Model and task built from the config, trained ``steps`` steps from seed 0; returns the
    initial model, the trained one, the task and the logged flossing losses."""
    cfg = make_cfg("task.seq_len=12", *overrides)
    GlobalHydra.instance().clear()
    pl.seed_everything(0)
    task = build(cfg.task)
    model = build_model(cfg, task)
    initial = copy.deepcopy(model)
    logged: list[float | None] = [None] * steps  # train/flossing_loss as logged, per step
    log = model.log

    def capture(name, value, *args, **kwargs):
        if name == "train/flossing_loss":
            logged[model.global_step] = float(value.detach())
        log(name, value, *args, **kwargs)

    model.log = capture
    trainer = pl.Trainer(max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=task)
    return initial, model, task, logged


def test_flossing_term_is_logged_on_every_nth_step_and_equals_an_exact_jacobian_reference(
        make_cfg):
    initial, _, task, logged = fit(make_cfg, "model.flossing.weight=0.5", "model.flossing.k=3",
                                   "model.flossing.every_n_steps=2")
    assert [v is not None for v in logged] == [True, False, True]
    batch = task.train_dataloader().dataset[0]  # the first step's batch
    expected = reference_flossing_loss(initial, batch, k=3)
    assert logged[0] == pytest.approx(expected, rel=1e-4)  # float32 against float64


def test_flossing_term_changes_the_trained_parameters_and_weight_zero_does_not(make_cfg):
    _, plain, _, none_logged = fit(make_cfg)
    _, zero, _, _ = fit(make_cfg, "model.flossing.weight=0")
    _, flossed, _, logged = fit(make_cfg, "model.flossing.weight=1")
    assert none_logged == [None] * 3 and all(v is not None for v in logged)
    for name, p in plain.state_dict().items():
        assert torch.equal(p, zero.state_dict()[name]), name
    moved = max(float((p - flossed.state_dict()[name]).abs().max())
                for name, p in plain.state_dict().items())
    assert moved > 1e-4


def test_preflossing_is_not_run_again_when_a_run_resumes(tmp_path):
    flossing = ["model.flossing.pre_steps=5", "model.flossing.weight=0.5",
                "model.flossing.every_n_steps=2", "task.seq_len=8", "trainer.max_steps=4",
                "callbacks.model_checkpoint.every_n_train_steps=1",
                "callbacks.model_checkpoint.save_top_k=-1"]

    def run(run_dir: Path, *overrides: str) -> dict[str, torch.Tensor]:
        try:
            train(compose_config([*FAST, *flossing, *overrides], run_dir))
        finally:
            GlobalHydra.instance().clear()
        return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]

    whole = run(tmp_path / "whole")
    resumed = run(tmp_path / "resumed",
                  f"ckpt_path={tmp_path / 'whole' / 'checkpoints' / 'step_0000002.ckpt'}")
    for name, p in whole.items():
        assert torch.equal(p, resumed[name]), name  # preflossing again would move them


@pytest.mark.parametrize("override, key", [
    ("model.flossing.k=0", "model.flossing.k"),
    ("model.flossing.weight=-1", "model.flossing.weight"),
    ("model.flossing.weight=nan", "model.flossing.weight"),
    ("model.flossing.pre_steps=-1", "model.flossing.pre_steps"),
    ("model.flossing.pre_steps=1.5", "model.flossing.pre_steps"),
    ("model.flossing.every_n_steps=0", "model.flossing.every_n_steps"),
    ("model.flossing.lr=0", "model.flossing.lr"),
    ("+model.flossing.steps=3", "model.flossing.steps"),
    ("~model.flossing.k", "model.flossing.k"),
    ("model.flossing=3", "model.flossing"),
])
def test_bad_flossing_settings_are_refused_before_training_naming_the_key(make_cfg, override,
                                                                          key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as error:
        train(make_cfg(override))
    assert "=...)" in str(error.value) or f"~{key}" in str(error.value)


# --- experiment=flossing ----------------------------------------------------------------------
FIXES = ("none", "flossing", "critical")


def preset_job(make_cfg, fix: str, *overrides: str, fast: bool = False, output_dir=None):
    return make_cfg("experiment=flossing", f"experiment/flossing_fix@_global_={fix}", *overrides,
                    fast=fast, output_dir=output_dir)


def test_flossing_preset_sweeps_no_fix_flossing_and_critical_init_of_a_tanh_rnn_on_adding(
        make_cfg):
    assert OmegaConf.load(CONF / "experiment" / "flossing.yaml").hydra.sweeper.params[
        "experiment/flossing_fix@_global_"].split(",") == list(FIXES)
    jobs = {fix: preset_job(make_cfg, fix) for fix in FIXES}
    for cfg in jobs.values():
        assert cfg.cell._target_.endswith("ElmanRNN") and cfg.cell.nonlinearity == "tanh"
        assert cfg.task._target_.endswith("Adding") and cfg.task.seq_len == 100
        assert cfg.monitor.lyapunov_k > 0 and cfg.monitor.lyapunov_every_n_steps > 0
    none, flossing, critical = (jobs[fix] for fix in FIXES)
    assert none.model.flossing.weight == 0 and none.model.flossing.pre_steps == 0
    assert none.cell.init == flossing.cell.init == "default" and critical.cell.init == "critical"
    assert flossing.model.flossing.weight > 0 and flossing.model.flossing.pre_steps > 0
    assert critical.model.flossing == none.model.flossing


def test_a_tiny_flossing_preset_runs_every_job_and_reports_spectra(make_cfg, tmp_path):
    runs = []
    for fix in FIXES:
        tiny = ["task.seq_len=10", "trainer.max_steps=2", "monitor.lyapunov_k=2"]
        if fix == "flossing":
            tiny.append("model.flossing.pre_steps=2")
        cfg = preset_job(make_cfg, fix, *tiny, fast=True, output_dir=tmp_path / fix)
        metrics = train(cfg)
        GlobalHydra.instance().clear()
        assert metrics["step"] == 2
        runs.append(tmp_path / fix)
    page = write_report(runs, tmp_path / "report", console=Console(file=io.StringIO()))
    assert (tmp_path / "report" / "spectra.png").is_file() and page.is_file()
    for run in runs:  # every monitored step measured the spectrum
        assert np.isfinite(gradflow.load(run)["lyapunov"]).all()
