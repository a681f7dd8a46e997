"""Any set of overrides either trains or fails with a message naming the key, never a traceback
from deep inside: random override sets from a grammar of keys × valid and invalid values."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hydra.errors import ConfigCompositionException, MissingConfigException
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rnnlab.config import ConfigError
from rnnlab.train import train

# key → (valid values, invalid values of various types: zero, negative, nan, text, bool, list)
GRAMMAR = {
    "task.seq_len": (["4", "8"], ["0", "-3", "abc", "1.5", "[1]"]),
    "task.batch_size": (["2", "4"], ["0", "-1", "nan", "true"]),
    "cell.hidden_size": (["4", "8"], ["0", "-2", "abc", "2.5"]),
    "cell.gain": (["0.9", "1.0"], ["0", "-1", "nan", "inf", "abc"]),
    "cell.nonlinearity": (["tanh", "relu"], ["foo", "1", "null"]),
    "model.encoder_size": (["2", "4"], ["0", "abc", "-4"]),
    "model.optimizer.lr": (["0.001", "0.1"], ["0", "-1", "nan", "inf", "abc", "null"]),
    "model.optimizer.name": (["adam", "sgd"], ["adagrad", "1"]),
    "monitor.every_n_steps": (["1", "2"], ["0", "-1", "abc"]),
    "monitor.timesteps": (["[0,-1]", "null"], ["[100]", "[a]", "[-50]"]),
    "monitor.on_nonfinite": (["stop", "skip"], ["ignore", "true"]),
    "trainer.gradient_clip_val": (["null", "1.0"], ["-1", "abc", "nan"]),
    "trainer.gradient_clip_algorithm": (["norm", "value"], ["foo"]),
    "trainer.devices": (["1"], ["0", "abc", "-2"]),
    "seed": (["0", "3"], ["-1", "abc"]),
    "cell": (["rnn", "gru", "lstm"], ["foo"]),
    "task": (["adding", "temporal_order"], ["bar"]),
}

override = st.sampled_from(sorted(GRAMMAR)).flatmap(
    lambda key: st.sampled_from(GRAMMAR[key][0] + GRAMMAR[key][1]).map(lambda v: f"{key}={v}"))


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.lists(override, min_size=1, max_size=4, unique_by=lambda o: o.split("=")[0]))
def test_random_overrides_train_or_fail_naming_the_key(make_cfg, tmp_path, overrides):
    # Group choices first, as on a command line: a group's keys are set after it is chosen.
    ordered = sorted(overrides, key=lambda o: "." in o.split("=")[0])
    keys = [o.split("=")[0] for o in ordered]
    try:
        cfg = make_cfg(*ordered, "trainer.max_steps=1", "monitor.jacobian_iterations=1",
                       output_dir=Path(tempfile.mkdtemp(dir=tmp_path)))  # a run per example
    except (MissingConfigException, ConfigCompositionException) as error:
        assert any(key.split(".")[0] in str(error) for key in keys), str(error)
        return
    try:
        train(cfg)
    except ConfigError as error:
        assert any(key in str(error) for key in keys), str(error)
