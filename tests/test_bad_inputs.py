"""A corpus of bad settings and files: each fails before training with the key (or file) named
and the fix, and leaves no run directory that looks finished (no metrics.json, no grad_flow/).

tests/test_errors.py holds the first per-key cases; this corpus covers the rest of the config.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException

from rnnlab.cells.rnn import ElmanRNN
from rnnlab.config import ConfigError
from rnnlab.model import RecurrentModel
from rnnlab.train import train

from .conftest import ROOT

# (overrides, fragment of the message); each message also names the key in "(set <key>=...)".
BAD = [
    (["trainer.gradient_clip_algorithm=foo"], "trainer.gradient_clip_algorithm must be one of"),
    (["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val must be null (no clipping)"),
    (["trainer.devices=0"], "trainer.devices must be auto, -1 (all), an integer >= 1"),
    (["trainer.accelerator=foo"], "trainer.accelerator must be one of cpu, gpu"),
    (["trainer.max_steps=-5"], "trainer.max_steps must be -1 (no limit) or an integer >= 1"),
    (["trainer.max_steps=abc"], "trainer.max_steps must be -1 (no limit) or an integer >= 1"),
    (["trainer.max_epochs=-3"], "trainer.max_epochs must be null, -1 (no limit)"),
    (["trainer.log_every_n_steps=0"], "trainer.log_every_n_steps must be an integer >= 1"),
    (["trainer.check_val_every_n_epoch=0"], "trainer.check_val_every_n_epoch must be an integer"),
    (["trainer.num_sanity_val_steps=-2"], "trainer.num_sanity_val_steps must be an integer >= -1"),
    (["trainer.deterministic=sometimes"], "trainer.deterministic must be true or false"),
    (["threads=0"], "threads must be auto or an integer >= 1"),
    (["threads=abc"], "threads must be auto or an integer >= 1"),
    (["seed=abc"], "seed must be an integer >= 0"),
    (["cell.hidden_size=abc"], "cell.hidden_size must be an integer >= 1, got 'abc'"),
    (["cell.gain=nan"], "cell.gain must be a finite number > 0, got nan"),
    (["cell.constraint=foo"], "cell.constraint must be one of none, orthogonal"),
    (["cell=gru", "cell.init=foo"], "cell.init must be one of default, orthogonal"),
    (["cell=lstm", "cell.forget_bias=nan"], "cell.forget_bias must be a finite number"),
    (["cell=node", "cell.solver=foo"], "cell.solver must be one of manual_euler"),
    (["cell=node", "cell.solver=dopri5", "cell.rtol=0"], "cell.rtol must be a finite number > 0"),
    (["cell=node", "cell.solver=dopri5", "cell.atol=-1"], "cell.atol must be a finite number > 0"),
    (["cell=node", "cell.width=0"], "cell.width must be an integer >= 1, got 0"),
    (["cell=node", "cell.dt=0"], "cell.dt must be a finite number > 0, got 0"),
    (["cell=node", "cell.solver=scipy_solver"], "cell.adjoint must be true with cell.solver="),
    (["model.encoder_size=abc"], "model.encoder_size must be an integer >= 1"),
    (["model.fast_path=maybe"], "model.fast_path must be auto, true or false"),
    (["model.checkpoint_steps=-1"], "model.checkpoint_steps must be 0 (keep every step's"),
    (["model.optimizer.lr=-1"], "model.optimizer.lr must be a finite number > 0, got -1"),
    (["model.optimizer=null"], "model.optimizer.lr must be a finite number > 0, got None"),
    (["monitor.timesteps=[100]"], "monitor.timesteps must be timesteps in [-10, 9] for the task's"),
    (["monitor.timesteps=[-11]"], "out of range: [-11]"),
    (["monitor.timesteps=[a]"], "monitor.timesteps must be null or a list of integers"),
    (["monitor.num_timesteps=-1"], "monitor.num_timesteps must be an integer >= 0"),
    (["monitor.every_n_steps=2", "monitor.jacobian_every_n_steps=3"],
     "monitor.jacobian_every_n_steps must be 0 (off) or a multiple of monitor.every_n_steps"),
    (["monitor.on_nonfinite=ignore"], "monitor.on_nonfinite must be one of stop, skip"),
    (["task.train_batches=0"], "task.train_batches must be an integer >= 1"),
    (["task.num_workers=-1"], "task.num_workers must be an integer >= 0"),
    (["task=temporal_order", "task.seq_len=3"], "task.seq_len must be an integer >= 10, got 3"),
    (["task=selective_copy", "task.seq_len=3"], "task.num_tokens must be at most task.seq_len"),
    (["task=associative_recall", "task.seq_len=3"], "task.num_pairs must be at most"),
    (["task=copy", "task.delay=0"], "task.delay must be an integer >= 1, got 0"),
]


def assert_no_finished_run(run_dir) -> None:
    assert not (run_dir / "metrics.json").exists()
    assert not (run_dir / "grad_flow").exists()  # failed before the first step


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_setting_fails_before_training_naming_key_and_fix(make_cfg, tmp_path, overrides,
                                                              message):
    with pytest.raises(ConfigError) as error:
        train(make_cfg(*overrides) if overrides[0].startswith("task=")
              else make_cfg("task.seq_len=10", *overrides))
    assert message in str(error.value)
    assert "(set " in str(error.value) and "=...)" in str(error.value)
    assert_no_finished_run(tmp_path / "run")


def test_unknown_optimizer_argument_names_it_and_how_to_remove_it(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"model.optimizer.foo is not an argument of "
                                          r"torch.optim.Adam .*remove it \(~model.optimizer.foo\)"):
        train(make_cfg("+model.optimizer.foo=1"))
    assert_no_finished_run(tmp_path / "run")


def test_derived_task_key_cannot_be_overridden(make_cfg):
    # The copy task's T is delay + 20; Hydra names the key it cannot set.
    with pytest.raises(ConfigCompositionException, match="task.seq_len"):
        make_cfg("task=copy", "task.seq_len=3")


def test_missing_checkpoint_is_named_before_training(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"ckpt_path: no checkpoint at .*missing.ckpt"):
        train(make_cfg(f"ckpt_path={tmp_path / 'missing.ckpt'}"))
    assert_no_finished_run(tmp_path / "run")


def test_corrupt_checkpoint_is_named_before_training(make_cfg, tmp_path):
    corrupt = tmp_path / "corrupt.ckpt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="corrupt.ckpt"):
        train(make_cfg(f"ckpt_path={corrupt}"))
    assert_no_finished_run(tmp_path / "run")


def test_unwritable_output_dir_is_named_before_training(make_cfg, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    with pytest.raises(ConfigError, match=r"paths.output_dir: cannot write to .*file/run .*"
                                          r"\(set paths.log_dir=...\)"):
        train(make_cfg(output_dir=blocker / "run"))


def test_train_script_names_an_unwritable_log_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"),
                             f"paths.log_dir={blocker}"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    assert f"Config error: paths.log_dir: cannot create {blocker}" in result.stderr
    assert "(set paths.log_dir=...)" in result.stderr
    assert "Traceback" not in result.stderr


def test_report_on_an_empty_dir_says_no_runs(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), str(tmp_path),
                             "--out", str(tmp_path / "report")], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2
    assert f"Report error: no runs under {tmp_path}" in result.stderr
    assert "Traceback" not in result.stderr


class WrongShapeRNN(ElmanRNN):
    def step(self, u_t, state, dt):
        return (super().step(u_t, state, dt)[0][:, :-1],)


class WrongDtypeRNN(ElmanRNN):
    def step(self, u_t, state, dt):
        return (super().step(u_t, state, dt)[0].long(),)


class WrongArityRNN(ElmanRNN):
    def step(self, u_t, state, dt):
        return super().step(u_t, state, dt)[0]  # a tensor, not a tuple of states


class FailingRNN(ElmanRNN):
    def step(self, u_t, state, dt):
        return (u_t @ state[0],)  # (B, input) @ (B, hidden): a shape error inside the step


CELL_FAULTS = [
    (WrongShapeRNN, "must return state h of shape (B, hidden_size) = (2, 8), got (2, 7)"),
    (WrongDtypeRNN, "must return state h as a floating-point tensor (gradients flow through "
                    "it), got dtype torch.int64"),
    (WrongArityRNN, "must return a tuple of 1 tensor(s) (h) as `state_names` says, got Tensor"),
    (FailingRNN, "failed on a probe batch u_t (2, 4): RuntimeError"),
]


@pytest.mark.parametrize(("cell_class", "message"), CELL_FAULTS,
                         ids=[c.__name__ for c, _ in CELL_FAULTS])
def test_cell_with_a_wrong_step_output_is_refused_at_construction(cell_class, message):
    target = f"{__name__}.{cell_class.__name__}"
    with pytest.raises(ConfigError) as error:
        RecurrentModel({"_target_": target, "hidden_size": 8}, input_size=3, output_size=1,
                       encoder_size=4)
    assert f"cell._target_={target}: {cell_class.__name__}.step" in str(error.value)
    assert message in str(error.value)


def test_param_contributions_that_cannot_fit_are_refused_before_training(make_cfg, tmp_path,
                                                                        monkeypatch):
    from rnnlab import callbacks

    monkeypatch.setattr(callbacks, "memory_bytes", lambda device: 2**12)  # a 4 KiB machine
    with pytest.raises(ConfigError, match=r"monitor.param_contributions=true needs about .* "
                                          r"at T = 10 .*set monitor.param_contributions=false"):
        train(make_cfg("task.seq_len=10"))
    assert_no_finished_run(tmp_path / "run")
    make_cfg("task.seq_len=10", "monitor.param_contributions=false")  # the fix composes …
    monkeypatch.setattr(callbacks, "memory_bytes", lambda device: 2**40)
    assert train(make_cfg("task.seq_len=10"))["step"] > 0  # … and a machine that fits trains


def test_param_probe_estimate_covers_the_probes_and_their_gradients():
    from rnnlab.callbacks import param_probe_bytes

    model = RecurrentModel({"_target_": "rnnlab.cells.LSTM", "hidden_size": 8}, input_size=3,
                           output_size=1, encoder_size=4)
    probes = model.make_param_probes(20)
    probe_bytes = sum(q.numel() * q.element_size() for qs in probes.values() for q in qs.values())
    assert param_probe_bytes(model, 20) >= 3 * probe_bytes  # probe, gradient, W + q_t
