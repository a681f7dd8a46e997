"""Bad input gets a clear error naming the config key, before training starts."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.errors import MissingConfigException

from rnnlab.config import ConfigError
from rnnlab.train import train

from .conftest import ROOT

BAD = [
    ("task.seq_len=0", "task.seq_len must be an integer >= 2, got 0"),
    ("task.seq_len=-5", "task.seq_len must be an integer >= 2, got -5"),
    ("cell.hidden_size=-3", "cell.hidden_size must be an integer >= 1, got -3"),
    ("cell.nonlinearity=foo", "cell.nonlinearity must be one of tanh, relu, sigmoid, identity"),
    ("cell.init=xavier", "cell.init must be one of default, orthogonal, identity, normal"),
    ("cell.gain=0", "cell.gain must be a finite number > 0, got 0"),
    ("task.batch_size=0", "task.batch_size must be an integer >= 1, got 0"),
    ("model.optimizer.lr=nan", "model.optimizer.lr must be a finite number > 0, got nan"),
    ("model.optimizer.name=adagrad", "model.optimizer.name must be one of adam, adamw, sgd"),
    ("monitor.every_n_steps=0", "monitor.every_n_steps must be an integer >= 1, got 0"),
    ("trainer.max_steps=0", "trainer.max_steps must be -1 (no limit) or an integer >= 1"),
]


@pytest.mark.parametrize(("override", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_setting_names_key_and_fix_before_training(make_cfg, tmp_path, override, message):
    with pytest.raises(ConfigError) as error:
        train(make_cfg(override))
    key = override.split("=")[0]
    assert message in str(error.value)
    assert f"(set {key}=...)" in str(error.value)
    assert not (tmp_path / "run" / "metrics.json").exists()
    assert not (tmp_path / "run" / "grad_flow").exists()  # failed before the first step


def test_unknown_group_option_lists_the_available_ones(make_cfg):
    with pytest.raises(MissingConfigException) as error:
        make_cfg("cell=foo")
    assert "cell/foo" in str(error.value) and "rnn" in str(error.value)


def test_train_script_prints_config_error_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), "cell.gain=0"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    assert "Config error: cell.gain must be a finite number > 0, got 0" in result.stderr
    assert "Traceback" not in result.stderr
