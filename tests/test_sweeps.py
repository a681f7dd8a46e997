"""Sweeps: job isolation, failure records, the summary, and real multiruns of scripts/train.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict, read_write
from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer

from rnnlab.config import ConfigError, safe_dirname
from rnnlab.sweep import (
    SweptNames,
    available_cpus,
    constant_keys,
    isolated_job,
    job_threads,
    main,
    run,
    write_summary,
)

from .conftest import ROOT

# Settings every job of the test sweeps shares (SweptNames keeps them out of the job names).
TINY = ["trainer.max_steps=2", "task.seq_len=8", "task.batch_size=4", "task.train_batches=2",
        "task.val_batches=1", "trainer.num_sanity_val_steps=0", "callbacks.progress_bar=null",
        "model.encoder_size=4", "monitor.every_n_steps=1", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false"]


def as_multirun_job(cfg):
    """Mark a composed config as one job of a multirun, as Hydra's launchers do."""
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
    HydraConfig.instance().set_config(cfg)
    return cfg


# --- job directory names -------------------------------------------------------------------------
def test_safe_dirname_keeps_plain_overrides_readable():
    assert safe_dirname("3_cell.gain=1.1,task.seq_len=200") == "3_cell.gain=1.1,task.seq_len=200"


def test_safe_dirname_shortens_nested_group_keys():
    name = "4_T=200,cell=gru,experiment/long_range_task@_global_=copy"
    assert safe_dirname(name) == "4_T=200,cell=gru,long_range_task=copy"
    assert safe_dirname("0_experiment/urnn_model@_global_=lstm") == "0_urnn_model=lstm"


def test_safe_dirname_replaces_path_separators_and_shell_characters():
    assert safe_dirname("0_ckpt_path=/a/b c,monitor.timesteps=[0,-1]") == \
        "0_ckpt_path=-a-b-c,monitor.timesteps=-0,-1"


def test_safe_dirname_cuts_a_long_name_between_overrides_never_in_a_value():
    name = "7_cell.gain=0.9,model.optimizer.lr=0.001,task.seq_len=200"
    assert safe_dirname(name, max_length=40) == "7_cell.gain=0.9,model.optimizer.lr=0.001"
    assert safe_dirname(name, max_length=39) == "7_cell.gain=0.9"
    assert safe_dirname("3_monitor.timesteps=[0,-1],cell=gru", max_length=30) == \
        "3_monitor.timesteps=-0,-1"  # a list's commas are not boundaries
    assert safe_dirname("1_" + "x" * 500) == "1"  # not even one fits: the job number alone
    assert len(safe_dirname("1_" + ",".join(["cell.gain=0.9"] * 40))) <= 120


def test_safe_dirname_of_a_job_without_overrides_is_its_number():
    assert safe_dirname("0_") == "0"


def sweep_config(task: list[str], params: dict[str, str] | None = None):
    return OmegaConf.create({"hydra": {
        "overrides": {"task": task, "hydra": ["hydra.sweep.dir=x"]},
        "sweeper": {"params": params},
        "job": {"config": {"override_dirname": {"exclude_keys": ["experiment", "threads"]}}}}})


def test_constant_keys_are_the_overrides_every_job_shares():
    config = sweep_config(["cell=rnn", "cell.gain=0.9,1.1", "task.seq_len=200", "+seed=3"])
    assert constant_keys(config) == ["cell", "seed", "task.seq_len"]
    # a preset's hydra.sweeper.params sweep too, unless the command line fixes the key
    preset = sweep_config(["experiment=gain_sweep", "task.seq_len=50", "cell.nonlinearity=tanh"],
                          {"cell.nonlinearity": "identity,tanh", "cell.gain": "0.8,1.2"})
    assert constant_keys(preset) == ["cell.nonlinearity", "experiment", "task.seq_len"]
    nested = sweep_config(["T=200"], {"experiment/long_range_task@_global_": "adding,copy"})
    assert constant_keys(nested) == ["T"]
    assert constant_keys(sweep_config(["cell.gain=0.9", "seed=1"])) == []  # nothing swept


def test_swept_names_adds_the_constant_keys_to_the_excluded_ones_as_a_hydra_override():
    config = sweep_config(["cell.gain=0.9,1.1", "task.seq_len=200", "experiment=gain_sweep"])
    SweptNames().on_multirun_start(config)
    assert list(config.hydra.overrides.hydra) == [
        "hydra.sweep.dir=x", "hydra.job.config.override_dirname.exclude_keys="
        "['experiment','threads','task.seq_len']"]
    lone = sweep_config(["cell.gain=0.9"])
    SweptNames().on_multirun_start(lone)
    assert list(lone.hydra.overrides.hydra) == ["hydra.sweep.dir=x"]


# --- torch threads and isolation -----------------------------------------------------------------
def test_threads_auto_shares_the_cpus_among_joblib_workers(make_cfg):
    make_cfg("hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert job_threads("auto") == max(available_cpus() // 2, 1)


def test_threads_auto_gives_one_thread_per_job_with_joblib_default_n_jobs(make_cfg):
    make_cfg("hydra/launcher=joblib")  # n_jobs=-1: as many workers as CPUs
    assert job_threads("auto") == 1


def test_threads_auto_follows_slurm_cpus_per_task(make_cfg, monkeypatch):
    make_cfg()
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert job_threads("auto") == 3


def test_threads_auto_leaves_a_lone_run_to_pytorch(make_cfg, monkeypatch):
    make_cfg()
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert job_threads("auto") is None
    assert job_threads(2) == 2


def test_isolated_job_restores_torch_state_even_when_the_job_fails():
    before = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
              torch.is_anomaly_enabled(), torch.get_default_dtype(), torch.is_grad_enabled())
    with pytest.raises(RuntimeError, match="job failed"), isolated_job(threads=1):
        assert torch.get_num_threads() == 1
        torch.use_deterministic_algorithms(not before[1])
        torch.set_anomaly_enabled(not before[2])
        torch.set_default_dtype(torch.float64 if before[3] != torch.float64 else torch.float32)
        torch.set_grad_enabled(not before[4])
        raise RuntimeError("job failed")
    after = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
             torch.is_anomaly_enabled(), torch.get_default_dtype(), torch.is_grad_enabled())
    assert after == before


def test_deterministic_job_does_not_leak_into_the_next_job(make_cfg, tmp_path):
    threads = torch.get_num_threads()
    run(as_multirun_job(make_cfg("trainer.deterministic=true", "threads=1",
                                 output_dir=tmp_path / "job0")))
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == threads


# --- what a job returns and records --------------------------------------------------------------
def test_run_returns_the_objective_written_to_metrics_json(make_cfg, tmp_path):
    value = run(make_cfg())
    assert value == json.loads((tmp_path / "run" / "metrics.json").read_text())["val/loss"]


def test_run_returns_the_configured_objective(make_cfg, tmp_path):
    value = run(make_cfg("sweep.objective=val/accuracy"))
    assert value == json.loads((tmp_path / "run" / "metrics.json").read_text())["val/accuracy"]


def test_single_run_raises_a_config_error(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match="cell.gain must be a finite number > 0"):
        run(make_cfg("cell.gain=0"))
    assert not (tmp_path / "run" / "failed.json").exists()


def test_failed_job_of_a_multirun_records_its_config_error_and_returns_the_penalty(make_cfg,
                                                                                    tmp_path):
    value = run(as_multirun_job(make_cfg("cell.gain=0", "sweep.failure_value=123.5")))
    assert value == 123.5
    failure = json.loads((tmp_path / "run" / "failed.json").read_text())
    assert failure["error_type"] == "ConfigError"
    assert failure["message"] == "cell.gain must be a finite number > 0, got 0 (set cell.gain=...)"
    assert "Traceback" in failure["traceback"]


def test_diverging_job_of_a_multirun_records_the_non_finite_loss(make_cfg, tmp_path):
    # A linear RNN with W = 50·Q over 30 steps: 50^30 ≈ 1e51 overflows float32 in the first step.
    cfg = make_cfg("cell.nonlinearity=identity", "cell.init=orthogonal", "cell.gain=50",
                   "task.seq_len=30")
    value = run(as_multirun_job(cfg))
    assert value == cfg.sweep.failure_value and math.isfinite(value)
    failure = json.loads((tmp_path / "run" / "failed.json").read_text())
    assert failure["error_type"] == "FloatingPointError"
    assert "non-finite training loss" in failure["message"] and "at step 0" in failure["message"]


BAD_SWEEP_SETTINGS = [
    ("threads=0", "threads must be auto or an integer >= 1, got 0"),
    ("sweep.objective=loss", "sweep.objective must be a validation metric such as val/loss"),
    ("sweep.failure_value=nan", "sweep.failure_value must be a finite number, got nan"),
]


@pytest.mark.parametrize(("override", "message"), BAD_SWEEP_SETTINGS,
                         ids=[b[0] for b in BAD_SWEEP_SETTINGS])
def test_bad_sweep_setting_names_key_and_fix_before_training(make_cfg, tmp_path, override,
                                                             message):
    with pytest.raises(ConfigError) as error:
        run(make_cfg(override))
    assert message in str(error.value)
    assert f"(set {override.split('=')[0]}=...)" in str(error.value)
    assert not (tmp_path / "run" / "grad_flow").exists()


def test_unknown_objective_lists_the_metrics_the_task_logs(make_cfg):
    with pytest.raises(ConfigError, match="val/accuracy, val/baseline, val/loss"):
        run(make_cfg("sweep.objective=val/f1"))


# --- the summary ---------------------------------------------------------------------------------
def fake_job(sweep: Path, name: str, num: int, overrides: list[str]) -> Path:
    job = sweep / name
    (job / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job / ".hydra" / "overrides.yaml")
    hydra = OmegaConf.create({"hydra": {"job": {"num": num}}})
    OmegaConf.save(hydra, job / ".hydra" / "hydra.yaml")
    return job


def test_summary_lists_every_job_with_its_status_in_job_order(tmp_path):
    done = fake_job(tmp_path, "10_cell.gain=1.0", 10, ["cell.gain=1.0"])
    (done / "metrics.json").write_text(json.dumps({"val/loss": 0.25, "val/baseline": 1 / 6,
                                                   "step": 7}))
    failed = fake_job(tmp_path, "2_cell.gain=0", 2, ["cell.gain=0"])
    (failed / "failed.json").write_text(json.dumps({"error_type": "ConfigError",
                                                    "message": "cell.gain must be …"}))
    fake_job(tmp_path, "3_cell.gain=2", 3, ["cell.gain=2"])  # killed: no record at all

    summary = write_summary(tmp_path)
    assert [(j["job"], j["num"], j["status"]) for j in summary["jobs"]] == [
        ("2_cell.gain=0", 2, "failed"), ("3_cell.gain=2", 3, "incomplete"),
        ("10_cell.gain=1.0", 10, "completed")]
    assert summary["counts"] == {"completed": 1, "failed": 1, "interrupted": 0, "incomplete": 1,
                                 "unreadable": 0}
    assert summary["jobs"][0]["error"] == "ConfigError: cell.gain must be …"
    assert summary["jobs"][2]["metrics"]["val/loss"] == 0.25
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    table = (tmp_path / "summary.md").read_text()
    assert "| 10_cell.gain=1.0 | cell.gain=1.0 | completed | 0.25 | 0.1667 | 7 |  |" in table
    assert "| 2_cell.gain=0 | cell.gain=0 | failed |  |  |  | ConfigError: cell.gain must be … |" \
        in table


def test_summary_command_rewrites_the_summary_of_an_interrupted_sweep(tmp_path, capsys):
    fake_job(tmp_path, "0_cell.gain=2", 0, ["cell.gain=2"])  # the sweep died before its summary
    main([str(tmp_path)])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(j["job"], j["status"]) for j in summary["jobs"]] == [("0_cell.gain=2", "incomplete")]
    assert "'incomplete': 1" in capsys.readouterr().out


# --- real multiruns of scripts/train.py ----------------------------------------------------------
def multirun(sweep_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "scripts" / "train.py"), "-m", *TINY,
               f"hydra.sweep.dir={sweep_dir}", *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}  # tests.helpers
    return subprocess.run(command, cwd=sweep_dir.parent, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def sweep_2x2(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """2 × 2 jobs in one process (basic launcher); cell.gain=0 is a bad config: two jobs fail."""
    sweep = tmp_path_factory.mktemp("sweep") / "multirun"
    return sweep, multirun(sweep, "cell.gain=0,1.0", "cell.hidden_size=4,8")


JOBS_2X2 = {"0_cell.gain=0,cell.hidden_size=4": "failed",
            "1_cell.gain=0,cell.hidden_size=8": "failed",
            "2_cell.gain=1.0,cell.hidden_size=4": "completed",
            "3_cell.gain=1.0,cell.hidden_size=8": "completed"}


def test_multirun_goes_on_after_failed_jobs_and_exits_cleanly(sweep_2x2):
    sweep, result = sweep_2x2
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Sweep: 2 completed, 2 failed, 0 incomplete" in result.stdout


def test_multirun_gives_each_job_a_readable_directory(sweep_2x2):
    sweep, _ = sweep_2x2
    assert {p.name for p in sweep.iterdir() if p.is_dir()} == set(JOBS_2X2)
    for job, status in JOBS_2X2.items():
        record = "metrics.json" if status == "completed" else "failed.json"
        assert (sweep / job / record).is_file(), job
        assert (sweep / job / ".hydra" / "overrides.yaml").is_file()


def test_multirun_failed_job_directory_holds_its_error(sweep_2x2):
    sweep, _ = sweep_2x2
    failure = json.loads((sweep / "0_cell.gain=0,cell.hidden_size=4" / "failed.json").read_text())
    assert failure["error_type"] == "ConfigError"
    assert failure["message"].startswith("cell.gain must be a finite number > 0, got 0")


def test_multirun_tensorboard_runs_are_named_after_the_jobs(sweep_2x2):
    sweep, _ = sweep_2x2
    runs = EventMultiplexer().AddRunsFromDirectory(str(sweep)).Runs()
    completed = {job for job, status in JOBS_2X2.items() if status == "completed"}
    assert set(runs) == completed  # the event files sit in the job directory itself


def test_multirun_jobs_write_their_overrides_for_the_tabs_short_labels(sweep_2x2):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    from rnnlab.tensorboard_plugin import summary
    from rnnlab.tensorboard_plugin.labels import short_labels

    sweep, _ = sweep_2x2
    infos = {}
    for job in ("2_cell.gain=1.0,cell.hidden_size=4", "3_cell.gain=1.0,cell.hidden_size=8"):
        events = EventAccumulator(str(sweep / job), size_guidance={"tensors": 0})
        events.Reload()
        (event,) = events.Tensors(summary.RUN_INFO_TAG)
        infos[job] = summary.parse_json(tensor_util.make_ndarray(event.tensor_proto))
        written = OmegaConf.load(sweep / job / ".hydra" / "overrides.yaml")
        assert event.step == 0 and infos[job]["overrides"] == list(written)
    assert short_labels(infos) == {"2_cell.gain=1.0,cell.hidden_size=4": "cell.hidden_size=4",
                                   "3_cell.gain=1.0,cell.hidden_size=8": "cell.hidden_size=8"}


def test_multirun_summary_lists_every_job_with_its_status(sweep_2x2):
    sweep, _ = sweep_2x2
    summary = json.loads((sweep / "summary.json").read_text())
    assert {j["job"]: j["status"] for j in summary["jobs"]} == JOBS_2X2
    for job in summary["jobs"]:
        metrics_file = sweep / job["job"] / "metrics.json"
        if job["status"] == "completed":
            assert job["metrics"] == json.loads(metrics_file.read_text())
        else:
            assert job["error"].startswith("ConfigError: cell.gain must be a finite number > 0")
    table = (sweep / "summary.md").read_text()
    assert all(f"| {job} |" in table for job in JOBS_2X2)


def test_report_aggregates_the_sweep(sweep_2x2, tmp_path):
    if not (ROOT / "src" / "rnnlab" / "report.py").is_file():
        pytest.skip("src/rnnlab/report.py does not exist yet")
    sweep, _ = sweep_2x2
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), str(sweep),
                             "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert any(p.is_file() for p in out.rglob("*")), "the report wrote nothing"


def test_joblib_multirun_runs_jobs_in_workers_with_shared_out_threads(tmp_path):
    sweep = tmp_path / "multirun"
    result = multirun(sweep, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                      "cell.hidden_size=4,8")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((sweep / "summary.json").read_text())
    assert {j["job"]: j["status"] for j in summary["jobs"]} == {
        "0_cell.hidden_size=4": "completed", "1_cell.hidden_size=8": "completed"}
    expected = max(available_cpus() // 2, 1)
    for job in ("0_cell.hidden_size=4", "1_cell.hidden_size=8"):
        assert f"torch threads: {expected}" in (sweep / job / "train.log").read_text()


def test_joblib_job_killed_from_outside_is_recorded_failed_and_the_sweep_goes_on(tmp_path):
    # As the out-of-memory killer would: job 0 gets SIGKILL after 1 step, while job 1 runs
    # beside it and job 2 still waits for a worker.
    sweep = tmp_path / "multirun"
    result = multirun(sweep, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                      "+callbacks.fault._target_=tests.helpers.faults.SignalAt",
                      "+callbacks.fault.step=1,100,100", "trainer.max_steps=3")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((sweep / "summary.json").read_text())
    assert [j["status"] for j in summary["jobs"]] == ["failed", "completed", "completed"]
    assert summary["jobs"][0]["error"].startswith(
        "JobDied: the job's process was killed by SIGKILL before it finished")
    assert "Sweep: 2 completed, 1 failed, 0 incomplete" in result.stdout


def test_an_explicit_sweep_dir_that_holds_runs_is_refused(sweep_2x2):
    sweep, _ = sweep_2x2
    before = sorted(p.name for p in sweep.iterdir())
    result = multirun(sweep, "cell.gain=1.0")
    assert result.returncode == 2
    assert f"Config error: hydra.sweep.dir: {sweep} holds another run" in result.stderr
    assert sorted(p.name for p in sweep.iterdir()) == before


def test_optuna_study_goes_on_past_failed_trials_and_reports_the_best_finished_one(tmp_path):
    sweep = tmp_path / "multirun"
    result = multirun(sweep, "hparams_search=optuna", "hydra.sweeper.n_trials=4",
                      "hydra.sweeper.n_jobs=2", "cell.hidden_size=4", "cell.gain=choice(0,1.0)")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["counts"]["completed"] + summary["counts"]["failed"] == 4
    assert summary["counts"]["failed"] >= 1 and summary["counts"]["completed"] >= 1
    best = OmegaConf.load(sweep / "optimization_results.yaml").best_value
    assert best == min(j["metrics"]["val/loss"] for j in summary["jobs"]
                       if j["status"] == "completed")


def test_slurm_launcher_config_composes_with_the_submitit_plugin(make_cfg, tmp_path):
    # An explicit sweep dir: resolving the default one would create it under ./outputs.
    launcher = make_cfg("hydra/launcher=slurm", f"hydra.sweep.dir={tmp_path}").hydra.launcher
    assert launcher._target_ == \
        "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.cpus_per_task == 4
    assert launcher.submitit_folder == f"{tmp_path}/.submitit/%j"
