"""monitor.on_nonfinite=skip: a run stops after max_skipped_steps skipped in a row (auto: 10% of
its steps, at least 10), and a run whose every step was skipped is reported as such."""

from __future__ import annotations

import json
import math

import pytest

from rnnlab.config import ConfigError
from rnnlab.nonfinite import auto_max_skipped
from rnnlab.rundir import RunDir
from rnnlab.sweep import job_status
from rnnlab.train import build, train

from .test_nonfinite import POISON, poisoned_rnn  # noqa: F401  (the fixture)


def test_auto_limit_is_a_tenth_of_the_run_at_least_ten():
    assert [auto_max_skipped(n) for n in (2, 100, 101, 1000, 1001)] == [10, 10, 11, 100, 101]
    assert auto_max_skipped(math.inf) == 100  # max_steps=-1 and max_epochs=-1


@pytest.mark.parametrize("value", [0, -3, 1.5, "sometimes", True])
def test_max_skipped_steps_is_checked_naming_the_key(make_cfg, value):
    with pytest.raises(ConfigError, match=r"monitor.max_skipped_steps must be auto, null or an "
                                          r"integer >= 1"):
        build(make_cfg(f"monitor.max_skipped_steps={value}").monitor)


def test_a_run_skipping_every_step_stops_after_the_auto_limit(make_cfg, tmp_path,
                                                              poisoned_rnn):  # noqa: F811
    # 25 steps, every one poisoned: auto = max(10, 2.5) = 10 skipped in a row, then it stops.
    with pytest.raises(FloatingPointError, match=r"^10 steps in a row skipped .*the last at step "
                                                 r"9\).*monitor.max_skipped_steps=10"):
        train(make_cfg(*POISON, "trainer.max_steps=25", "monitor.on_nonfinite=skip"))
    outcome = RunDir(tmp_path / "run").outcome()
    assert outcome.status == "failed" and outcome.failure["error_type"] == "FloatingPointError"


def test_a_short_run_whose_every_step_was_skipped_is_reported(make_cfg, tmp_path,
                                                              poisoned_rnn):  # noqa: F811
    metrics = train(make_cfg(*POISON, "monitor.on_nonfinite=skip"))  # 2 steps, both skipped
    assert (metrics["train/skipped_steps"], metrics["train/steps_trained"]) == (2.0, 2.0)
    run = RunDir(tmp_path / "run")
    assert json.loads(run.metrics.read_text())["train/skipped_steps"] == 2.0
    outcome = run.outcome()
    assert outcome.status == "completed" and outcome.every_step_skipped
    assert outcome.label == "completed, every step skipped"
    (run.path / ".hydra" / "overrides.yaml").write_text("[]\n")
    (run.path / ".hydra" / "hydra.yaml").write_text("hydra: {job: {num: 0}}\n")
    row = job_status(run.path)
    assert row["status"] == "completed"
    assert row["error"] == ("every step skipped for non-finite values (2 of them): the "
                            "parameters never moved")


def test_a_run_that_trained_reports_no_skipped_steps(make_cfg, tmp_path):
    metrics = train(make_cfg("trainer.max_steps=3"))
    assert (metrics["train/skipped_steps"], metrics["train/steps_trained"]) == (0.0, 3.0)
    outcome = RunDir(tmp_path / "run").outcome()
    assert not outcome.every_step_skipped and outcome.label == "completed"
