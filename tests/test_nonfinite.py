"""Non-finite loss or gradients: monitor.on_nonfinite=stop raises, =skip skips the step."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from rnnlab import gradflow
from rnnlab.cells.rnn import ElmanRNN
from rnnlab.config import ConfigError
from rnnlab.nonfinite import NonFinitePolicy
from rnnlab.records import record_of
from rnnlab.train import build, build_model, train

T = 12
POISONED = 7  # the backward pass turns nan at step 7: dL/dz_t is nan for every t < 7
DIVERGE = ["cell.nonlinearity=identity", "cell.init=orthogonal", "cell.gain=1.0",
           "task.seq_len=30", "model.optimizer.lr=1e6"]
POISON = [f"task.seq_len={T}", "monitor=profile", "monitor.every_n_steps=1", "trainer.max_steps=2"]


class NanGradient(torch.autograd.Function):
    """Identity forward; backward returns nan: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, z):
        return z.clone()

    @staticmethod
    def backward(ctx, grad):
        return torch.full_like(grad, float("nan"))


@pytest.fixture
def poisoned_rnn(monkeypatch):
    """ElmanRNN whose step POISONED of every differentiated unroll has a nan gradient. Its input
    projection is taken away, so that every loop (probed or not) runs the poisoned `step`."""
    plain_step, t = ElmanRNN.step, [0]

    def step(self, u_t, state, dt):
        t[0] = 0 if not state[0].requires_grad else t[0] + 1  # the zero initial state: t = 0
        out = plain_step(self, u_t, state, dt)
        if torch.is_grad_enabled() and t[0] == POISONED:
            return tuple(NanGradient.apply(s) for s in out)
        return out

    monkeypatch.setattr(ElmanRNN, "step", step)
    monkeypatch.setattr(ElmanRNN, "input_projection", None)


def test_on_nonfinite_must_be_stop_or_skip(make_cfg):
    with pytest.raises(ConfigError, match=r"monitor.on_nonfinite must be one of stop, skip, got "
                                          r"'maybe' \(set monitor.on_nonfinite=...\)"):
        train(make_cfg("monitor.on_nonfinite=maybe"))


def test_diverging_run_stops_naming_step_and_last_finite_profile(make_cfg, tmp_path):
    # Step 0 is finite (its record is written); the huge step Adam takes makes step 1 overflow.
    with pytest.raises(FloatingPointError) as error:
        train(make_cfg(*DIVERGE, "trainer.max_steps=5"))
    message = str(error.value)
    assert "non-finite training loss" in message and "at step 1;" in message
    record = record_of(tmp_path / "run" / "grad_flow", 0)  # written when training raised
    summary = gradflow.summarize(record.main_profile)  # recomputed from the written profile
    assert (f"last finite gradient profile: step 0, decay_rate {summary['decay_rate']:.4g}, "
            f"log10_first_last {summary['log10_first_last']:.4g}, its record in "
            f"{tmp_path / 'run' / 'grad_flow'}") in message
    assert "monitor.on_nonfinite=skip" in message
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_nonfinite_gradient_reports_the_offending_timesteps_of_an_independent_profile(
        make_cfg, poisoned_rnn):
    cfg = make_cfg(*POISON)
    pl.seed_everything(cfg.seed, workers=True)
    task = build(cfg.task)
    task.setup("fit")
    batch = next(iter(task.train_dataloader()))
    # Independently: the poisoned model's profile on the first batch, by autograd on the probes.
    model = build_model(cfg, task)
    x = batch["x"]
    probes = model.make_probes(x.shape[0], T)
    loss = model.loss_fn(model(x, None, probes), batch["y"])
    (dL_dz,) = torch.autograd.grad(loss, probes)
    expected = np.nonzero(~torch.isfinite(dL_dz.norm(dim=(1, 2))).numpy())[0].tolist()
    assert torch.isfinite(loss) and expected == list(range(POISONED))

    with pytest.raises(FloatingPointError) as error:
        train(cfg)
    message = str(error.value)
    assert "non-finite gradients" in message and "with a finite loss at step 0;" in message
    assert f"non-finite at timesteps {expected} of T = {T}" in message
    assert "last finite gradient profile: none yet" in message


def test_unmonitored_nonfinite_step_says_how_to_see_the_timesteps(make_cfg, poisoned_rnn,
                                                                  caplog):
    # Step 0 is monitored, step 1 is not; both are poisoned (the loop runs `step` on both).
    with caplog.at_level(logging.WARNING, logger="rnnlab.nonfinite"):
        train(make_cfg(*POISON, "monitor.every_n_steps=2", "model.fast_path=false",
                       "monitor.on_nonfinite=skip"))
    first, second = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert "at step 0;" in first and f"timesteps {list(range(POISONED))}" in first
    assert "at step 1;" in second
    assert "this step was not monitored (set monitor.every_n_steps=1" in second


def test_skip_leaves_parameters_unchanged_counts_and_finishes(make_cfg, tmp_path, poisoned_rnn,
                                                              caplog):
    cfg = make_cfg(*POISON, "monitor.on_nonfinite=skip")
    pl.seed_everything(cfg.seed, workers=True)
    initial = build_model(cfg, build(cfg.task)).state_dict()  # the run builds the same weights
    with caplog.at_level(logging.WARNING, logger="rnnlab.nonfinite"):
        metrics = train(cfg)
    assert metrics["step"] == 2  # both optimizer steps were skipped, and training went on
    final = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    for name, value in initial.items():
        torch.testing.assert_close(final["state_dict"][name], value, rtol=0, atol=0)
    warnings = [r.getMessage() for r in caplog.records if "skipped this step" in r.getMessage()]
    assert len(warnings) == 2
    assert f"non-finite at timesteps {list(range(POISONED))}" in warnings[0]
    assert (tmp_path / "run" / "metrics.json").exists()


def test_skip_counts_skipped_steps_in_tensorboard(make_cfg, tmp_path, poisoned_rnn):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(make_cfg(*POISON, "monitor.on_nonfinite=skip"))
    paths = sorted((tmp_path / "run").rglob("events.out.tfevents.*"))
    events = EventAccumulator(str(paths[0].parent)).Reload()
    assert [e.value for e in events.Scalars("train/skipped_steps")] == [1.0, 2.0]


def test_a_skipped_step_leaves_parameters_and_adam_state_as_they_were(make_cfg):
    # A skipped step still runs its backward pass (under DDP every process takes part in the
    # all-reduce); the policy then drops the gradients and the optimizer finds none.
    cfg = make_cfg()
    model = build_model(cfg, build(cfg.task))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.full((2, 5, 2), float("nan"))
    loss = model.loss_fn(model(x), torch.zeros(2, 1, 1))
    trainer = SimpleNamespace(world_size=1, global_step=3)
    model.log = lambda *args, **kwargs: None  # no trainer to log to
    policy = NonFinitePolicy("skip")
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())  # every parameter took part
    norms = gradflow.GradNorms(model)
    vector = norms.take()
    loss_finite, gradients_finite = policy.finite(trainer, loss, vector)
    assert not loss_finite and not gradients_finite
    policy.nonfinite(trainer, model, loss, loss_finite, norms.named(vector), None, "none yet")
    assert policy.skipped_steps == policy.skipped_in_a_row == 1
    optimizer.step()
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)
    assert not optimizer.state  # Adam took no step: no moments, no step count


def test_one_check_after_backward_tells_the_loss_from_the_gradients_and_agrees_across_processes():
    policy = NonFinitePolicy("stop")
    one = SimpleNamespace(world_size=1, global_step=4)
    finite = {"grad_norm_cell": torch.tensor(2.0, dtype=torch.float64)}
    nan = {"grad_norm_cell": torch.tensor(float("nan"), dtype=torch.float64),
           "grad_norm_decoder": torch.tensor(1.0, dtype=torch.float64)}
    def vector(named):  # the norms as `GradNorms.take` gives them: one tensor
        return torch.stack(list(named.values()))

    policy.skipped_in_a_row = 3
    assert policy.finite(one, torch.tensor(0.5), vector(finite)) == (True, True)
    assert policy.skipped_in_a_row == 0  # a good step ends a run of skipped ones
    assert policy.finite(one, torch.tensor(float("inf")), vector(finite)) == (False, True)
    assert policy.finite(one, torch.tensor(-float("inf")), vector(finite)) == (False, True)
    assert policy.finite(one, torch.tensor(0.5), vector(nan)) == (True, False)
    assert policy.finite(one, torch.tensor(float("nan")), vector(nan)) == (False, False)
    inf = torch.tensor([1.0, float("inf")], dtype=torch.float64)
    assert policy.finite(one, torch.tensor(-float("inf")), inf) == (False, False)  # no cancelling
    largest = torch.tensor([torch.finfo(torch.float32).max] * 2, dtype=torch.float64)
    assert policy.finite(one, torch.tensor(3e38), largest) == (True, True)  # nothing overflows
    assert policy.finite(one, None, vector(finite)) == (True, True)  # the gradients alone
    assert policy.finite(one, None, vector(nan)) == (True, False)
    assert policy.finite(one, torch.tensor(0.5, dtype=torch.bfloat16), vector(finite)) == (
        True, True)
    assert policy.finite(one, torch.tensor(0.5), torch.zeros(0, dtype=torch.float64)) == (
        True, True)  # a model without gradients

    # Under data parallelism the loss's finiteness is agreed on by every process: another
    # process's non-finite loss makes this one's finite loss count as not finite.
    votes = []
    others_nan = SimpleNamespace(reduce_boolean_decision=lambda d, all: (votes.append(d), False)[1])
    two = SimpleNamespace(world_size=2, global_step=4, strategy=others_nan)
    assert policy.finite(two, torch.tensor(0.5), vector(finite)) == (False, True)
    assert votes == [True]
    model = ElmanRNN(2, 4)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss on another process "
                                                 r"\(this one's: 0\.5\) at step 4"):
        policy.nonfinite(two, model, torch.tensor(0.5), False, finite, None, "none yet")
    with pytest.raises(FloatingPointError, match=r"non-finite training loss inf at step 4; the "
                                                 r"forward pass overflowed"):
        policy.nonfinite(one, model, torch.tensor(float("inf")), False, finite, None, "none yet")
    with pytest.raises(FloatingPointError,
                       match=r"non-finite gradients \(norms: cell nan, decoder 1\) with a finite "
                             r"loss at step 4; \|\|dL/dz_t\|\| is non-finite at timesteps "
                             r"\[0, 2\]"):
        policy.nonfinite(one, model, torch.tensor(0.5), True, nan,
                         np.array([np.nan, 1.0, np.inf, 2.0]), "none yet")
