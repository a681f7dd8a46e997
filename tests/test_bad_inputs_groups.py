"""The bad-input corpus, group by group: every case fails before training with a message that
names the key (or the file) and says what to do, and leaves no run behind.

Together with tests/test_bad_inputs.py, tests/test_bad_inputs_property.py and tests/test_errors.py
this is the project's corpus of bad settings.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException

from rnnlab.config import ConfigError
from rnnlab.train import train

from .conftest import ROOT

FILE = "{file}"  # replaced by a path under a regular file: a directory that cannot be made

# (overrides, the key the message must name); group choices come first, as on a command line.
TOP_LEVEL = [
    (["seed=-1"], "seed"),
    (["seed=1.5"], "seed"),
    (["seed=true"], "seed"),
    (["threads=-2"], "threads"),
    (["threads=1.5"], "threads"),
    (["flush_denormal=maybe"], "flush_denormal"),
    (["flush_denormal=1"], "flush_denormal"),
    (["malloc=maybe"], "malloc"),
    (["malloc=true"], "malloc"),
    (["ckpt_path="], "ckpt_path"),
    (["ckpt_path=' '"], "ckpt_path"),
    (["+cel=rnn"], "cel"),
    (["+sed=3"], "sed"),
    (["+trainr.max_steps=3"], "trainr"),
    (["+max_step=3"], "max_step"),
    (["+monitr.every_n_steps=2"], "monitr"),
]
CELL = [
    (["cell.hidden_size=0"], "cell.hidden_size"),
    (["cell.hidden_size=1.5"], "cell.hidden_size"),
    (["cell.hidden_size=true"], "cell.hidden_size"),
    (["cell.nonlinearity=null"], "cell.nonlinearity"),
    (["cell.init=null"], "cell.init"),
    (["cell.gain=-1"], "cell.gain"),
    (["cell.gain=inf"], "cell.gain"),
    (["cell.gain=abc"], "cell.gain"),
    (["cell.constraint=null"], "cell.constraint"),
    (["+cell.foo=1"], "cell.foo"),
    (["+cell.hidden=4"], "cell.hidden"),
    (["cell._target_=nowhere.Cell"], "cell._target_"),
    (["cell._target_=rnnlab.cells.rnn.NoSuchCell"], "cell._target_"),
    (["cell=gru", "cell.hidden_size=0"], "cell.hidden_size"),
    (["cell=gru", "cell.init=identity"], "cell.init"),
    (["cell=gru", "+cell.gain=1.0"], "cell.gain"),
    (["cell=gru", "cell.hidden_size=abc"], "cell.hidden_size"),
    (["cell=lstm", "cell.forget_bias=inf"], "cell.forget_bias"),
    (["cell=lstm", "cell.forget_bias=abc"], "cell.forget_bias"),
    (["cell=lstm", "cell.init=xavier"], "cell.init"),
    (["cell=lstm", "+cell.nonlinearity=relu"], "cell.nonlinearity"),
    (["cell=node", "cell.width=-1"], "cell.width"),
    (["cell=node", "cell.depth=0"], "cell.depth"),
    (["cell=node", "cell.activation=foo"], "cell.activation"),
    (["cell=node", "cell.dt=-0.1"], "cell.dt"),
    (["cell=node", "cell.dt=inf"], "cell.dt"),
    (["cell=node", "cell.solver=rk5"], "cell.solver"),
    (["cell=node", "cell.solver=dopri5", "cell.rtol=-1"], "cell.rtol"),
    (["cell=node", "cell.solver=dopri5", "cell.atol=0"], "cell.atol"),
    (["cell=node", "cell.adjoint=maybe"], "cell.adjoint"),
    (["cell=node", "cell.adjoint=true"], "cell.adjoint"),  # manual_euler has no adjoint
    (["cell=node", "cell.whole_sequence=maybe"], "cell.whole_sequence"),
    (["cell=node", "cell.whole_sequence=true"], "cell.whole_sequence"),  # not for manual Euler
    (["cell=node", "cell.solver=euler", "cell.adjoint=true", "cell.adjoint_segment=-1"],
     "cell.adjoint_segment"),
    (["cell=node", "cell.hidden_size=0"], "cell.hidden_size"),
    (["cell=node", "+cell.gain=2"], "cell.gain"),
]
TASK = [
    (["task.seq_len=1"], "task.seq_len"),
    (["task.seq_len=abc"], "task.seq_len"),
    (["task.batch_size=-1"], "task.batch_size"),
    (["task.train_batches=-1"], "task.train_batches"),
    (["task.val_batches=0"], "task.val_batches"),
    (["task.num_workers=1.5"], "task.num_workers"),
    (["+task.foo=1"], "task.foo"),
    (["+task.seqlen=100"], "task.seqlen"),
    (["task._target_=rnnlab.tasks.adding.Nothing"], "task._target_"),
    (["task=copy", "task.delay=-1"], "task.delay"),
    (["task=copy", "task.delay=abc"], "task.delay"),
    (["task=copy", "+task.blank=3"], "task.blank"),
    (["task=temporal_order", "task.seq_len=9"], "task.seq_len"),
    (["task=temporal_order", "task.batch_size=0"], "task.batch_size"),
    (["task=selective_copy", "task.num_tokens=0"], "task.num_tokens"),
    (["task=selective_copy", "task.vocab_size=2"], "task.vocab_size"),
    (["task=selective_copy", "task.num_tokens=40"], "task.num_tokens"),
    (["task=associative_recall", "task.num_pairs=0"], "task.num_pairs"),
    (["task=associative_recall", "task.num_keys=2"], "task.num_keys"),
    (["task=associative_recall", "task.num_values=2"], "task.num_values"),
    (["task=associative_recall", "task.multi_query=maybe"], "task.multi_query"),
    (["task=associative_recall", "task.power_a=-1"], "task.power_a"),
    (["task=associative_recall", "task.seq_len=8", "task.multi_query=true"], "task.num_pairs"),
    (["task=oscillator", "task.force=foo"], "task.force"),
    (["task=oscillator", "task.omega=0"], "task.omega"),
    (["task=oscillator", "task.damping=-1"], "task.damping"),
    (["task=oscillator", "task.damping=3"], "task.damping"),
    (["task=oscillator", "task.dt_min=0"], "task.dt_min"),
    (["task=oscillator", "task.dt_max=0.05"], "task.dt_max"),
    (["task=oscillator", "task.amplitude=0"], "task.amplitude"),
    (["task=oscillator", "task.n_out=0"], "task.n_out"),
    (["task=oscillator", "task.n_out=200"], "task.n_out"),
]
MODEL = [
    (["model.encoder_size=0"], "model.encoder_size"),
    (["model.encoder_size=1.5"], "model.encoder_size"),
    (["model.fast_path=1"], "model.fast_path"),
    (["model.compile=maybe"], "model.compile"),
    (["model.checkpoint_steps=abc"], "model.checkpoint_steps"),
    (["model.optimizer.lr=0"], "model.optimizer.lr"),
    (["model.optimizer.lr=abc"], "model.optimizer.lr"),
    (["model.optimizer.lr=inf"], "model.optimizer.lr"),
    (["model.optimizer.name=null"], "model.optimizer.name"),
    (["+model.optimizer.betas=[0.9]"], "model.optimizer.betas"),
    (["+model.optimizer.betas=[0.9,1.5]"], "model.optimizer.betas"),
    (["+model.optimizer.eps=-1"], "model.optimizer.eps"),
    (["+model.optimizer.weight_decay=-1"], "model.optimizer.weight_decay"),
    (["model.optimizer.name=sgd", "+model.optimizer.momentum=-0.5"], "model.optimizer.momentum"),
    (["model.optimizer.name=sgd", "+model.optimizer.nesterov=true"],
     "model.optimizer.nesterov"),
    (["model.optimizer.name=rmsprop", "+model.optimizer.alpha=-1"], "model.optimizer.alpha"),
    (["model.optimizer.name=adamw", "+model.optimizer.betas=[0.9,0.999,0.5]"],
     "model.optimizer.betas"),
    (["+model.foo=1"], "model.foo"),
    (["+model.encoder=8"], "model.encoder"),
    (["model._target_=nowhere.Model"], "model._target_"),
]
MONITOR = [
    (["monitor.every_n_steps=abc"], "monitor.every_n_steps"),
    (["monitor.num_timesteps=-1"], "monitor.num_timesteps"),
    (["monitor.figure_every_n_records=-1"], "monitor.figure_every_n_records"),
    (["monitor.param_contributions=maybe"], "monitor.param_contributions"),
    (["monitor.jacobian_every_n_steps=-1"], "monitor.jacobian_every_n_steps"),
    (["monitor.jacobian_iterations=0"], "monitor.jacobian_iterations"),
    (["monitor.on_nonfinite=null"], "monitor.on_nonfinite"),
    (["monitor.profile_dtype=float16"], "monitor.profile_dtype"),
    (["monitor.timesteps=5"], "monitor.timesteps"),
    (["+monitor.foo=1"], "monitor.foo"),
    (["+monitor.every_n_step=2"], "monitor.every_n_step"),
    ([f"monitor.dirpath={FILE}"], "monitor.dirpath"),
    (["monitor=profile", "monitor.every_n_steps=0"], "monitor.every_n_steps"),
    (["monitor.max_skipped_steps=0"], "monitor.max_skipped_steps"),
    (["monitor.max_skipped_steps=often"], "monitor.max_skipped_steps"),
]
TRAINER = [
    (["trainer.max_epochs=0"], "trainer.max_epochs"),
    (["trainer.max_steps=1.5"], "trainer.max_steps"),
    (["trainer.devices=[]"], "trainer.devices"),
    (["trainer.devices=abc"], "trainer.devices"),
    (["trainer.devices=3"], "task.batch_size"),  # 4 sequences cannot be split over 3
    (["trainer.accelerator=gpu", "trainer.devices=1000"], "trainer.devices"),
    (["+trainer.num_nodes=0"], "trainer.num_nodes"),
    (["trainer.gradient_clip_val=inf"], "trainer.gradient_clip_val"),
    (["trainer.log_every_n_steps=-1"], "trainer.log_every_n_steps"),
    (["trainer.check_val_every_n_epoch=abc"], "trainer.check_val_every_n_epoch"),
    (["trainer.num_sanity_val_steps=abc"], "trainer.num_sanity_val_steps"),
    (["trainer.enable_progress_bar=maybe"], "trainer.enable_progress_bar"),
    (["trainer.enable_model_summary=1"], "trainer.enable_model_summary"),
    (["+trainer.detect_anomaly=maybe"], "trainer.detect_anomaly"),
    (["+trainer.benchmark=maybe"], "trainer.benchmark"),
    (["+trainer.accumulate_grad_batches=0"], "trainer.accumulate_grad_batches"),
    (["+trainer.fast_dev_run=-1"], "trainer.fast_dev_run"),
    (["+trainer.precision=8"], "trainer.precision"),
    (["+trainer.limit_train_batches=0"], "trainer.limit_train_batches"),
    (["+trainer.limit_train_batches=1.5"], "trainer.limit_train_batches"),
    (["+trainer.limit_val_batches=-1"], "trainer.limit_val_batches"),
    (["+trainer.overfit_batches=-1"], "trainer.overfit_batches"),
    (["+trainer.val_check_interval=0"], "trainer.val_check_interval"),
    (["+trainer.val_check_interval=5"], "trainer.val_check_interval"),  # 2 batches an epoch
    (["+trainer.limit_train_batches=1", "+trainer.val_check_interval=2"],
     "trainer.val_check_interval"),
    (["+trainer.foo=1"], "trainer.foo"),
    (["+trainer.max_step=5"], "trainer.max_step"),
    ([f"trainer.default_root_dir={FILE}"], "trainer.default_root_dir"),
    (["trainer._target_=nowhere.Trainer"], "trainer._target_"),
]
LOGGER_CALLBACKS_PATHS = [
    ([f"logger.tensorboard.save_dir={FILE}"], "logger.tensorboard.save_dir"),
    (["logger.tensorboard._target_=nowhere.Logger"], "logger.tensorboard._target_"),
    (["logger.tensorboard=5"], "logger.tensorboard"),
    ([f"callbacks.model_checkpoint.dirpath={FILE}"], "callbacks.model_checkpoint.dirpath"),
    (["callbacks.model_checkpoint.every_n_train_steps=0"],
     "callbacks.model_checkpoint.every_n_train_steps"),
    (["callbacks.model_checkpoint.save_top_k=-5"], "callbacks.model_checkpoint.save_top_k"),
    (["+callbacks.model_checkpoint.mode=up"], "callbacks.model_checkpoint.mode"),
    (["callbacks.model_checkpoint.filename=a/b"], "callbacks.model_checkpoint.filename"),
    (["+callbacks.model_checkpoint.foo=1"], "callbacks.model_checkpoint.foo"),
    (["callbacks.run_cost._target_=nowhere.Cost"], "callbacks.run_cost._target_"),
    (["callbacks.progress_bar=3"], "callbacks.progress_bar"),
    (["+callbacks.extra._target_=rnnlab.cost.RunCost", "+callbacks.extra.every=2"],
     "callbacks.extra.every"),
]
COMPOSITION = [  # Hydra refuses these while composing; its message names the group or key
    (["experiment=nope"], "experiment"),
    (["debug=nope"], "debug"),
    (["hparams_search=nope"], "hparams_search"),
    (["monitor=nope"], "monitor"),
    (["trainer=nope"], "trainer"),
    (["logger=nope"], "logger"),
    (["task=copy", "task.seq_len=3"], "task.seq_len"),
    (["cell.hidden_sise=4"], "cell.hidden_sise"),
]
CASES = [*TOP_LEVEL, *CELL, *TASK, *MODEL, *MONITOR, *TRAINER, *LOGGER_CALLBACKS_PATHS]
FIXES = ("(set ", "remove it", "did you mean", "choose", "fix", "write ", "or trainer.")


def with_file(overrides: list[str], tmp_path) -> list[str]:
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    return [o.replace(FILE, str(blocker / "x")) for o in overrides]


@pytest.mark.parametrize(("overrides", "key"), CASES, ids=[" ".join(o) for o, _ in CASES])
def test_bad_setting_fails_before_training_naming_the_key_and_the_fix(make_cfg, tmp_path,
                                                                      overrides, key):
    with pytest.raises(ConfigError) as error:
        train(make_cfg(*with_file(overrides, tmp_path)))
    message = str(error.value)
    assert key in message, message
    assert any(fix in message for fix in FIXES), message
    run = tmp_path / "run"
    assert not (run / "metrics.json").exists() and not (run / "grad_flow").exists()
    assert not (run / "checkpoints").exists()


@pytest.mark.parametrize(("overrides", "key"), COMPOSITION,
                         ids=[" ".join(o) for o, _ in COMPOSITION])
def test_bad_group_or_key_is_refused_by_hydra_naming_it(make_cfg, overrides, key):
    with pytest.raises((MissingConfigException, ConfigCompositionException)) as error:
        make_cfg(*overrides)
    assert key in str(error.value)


def script(tmp_path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *overrides],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)


def test_an_empty_log_dir_is_refused_before_anything_is_written(tmp_path):
    result = script(tmp_path, "paths.log_dir=")
    assert result.returncode == 2
    assert "Config error: paths.log_dir must be a directory, relative to where you launch " \
           "(default outputs) or absolute; empty would write runs at the filesystem's root, " \
           "got '' (set paths.log_dir=...)" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_yaml_error_in_a_users_config_directory_names_the_file_and_line(tmp_path):
    (tmp_path / "conf" / "cell").mkdir(parents=True)
    broken = tmp_path / "conf" / "cell" / "mine.yaml"
    broken.write_text("_target_: rnnlab.cells.rnn.ElmanRNN\nhidden_size: [8\n")
    result = script(tmp_path, "--config-dir", str(tmp_path / "conf"), "cell=mine")
    assert result.returncode == 2
    assert f"Config error: {broken} is not valid YAML" in result.stderr
    assert "at line 3, column 1; fix the file" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_stray_top_level_key_is_refused_on_the_command_line(tmp_path):
    """The command's config has no ``hydra`` node (``@hydra.main`` removes it): the overrides are
    read from Hydra's own record of the run."""
    result = script(tmp_path, "+cel=rnn", f"paths.log_dir={tmp_path / 'outputs'}")
    assert result.returncode == 2
    assert ("Config error: cel is not a setting (did you mean cell? write cell=rnn)"
            in result.stderr)
    assert not any((tmp_path / "outputs").rglob("train.log"))  # no run left behind
