"""A run stopped at any step of any epoch and resumed ends exactly where the uninterrupted run
ends: the same parameters bit for bit (CPU), the same validation steps, the same records."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from rnnlab import gradflow
from rnnlab.config import ConfigError, compose_config
from rnnlab.model import RecurrentModel
from rnnlab.resume import find_checkpoint
from rnnlab.train import train

from .conftest import ROOT

# --- in-process runs: 3 batches an epoch, 10 steps = 3 epochs and a step -------------------------
EPOCHS = ["trainer.max_steps=10", "task.seq_len=6", "task.batch_size=4", "cell.hidden_size=4",
          "model.encoder_size=3", "task.train_batches=3", "task.val_batches=1",
          "monitor.every_n_steps=1", "monitor.figure_every_n_records=100",
          "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
          "callbacks.progress_bar=null", "trainer.num_sanity_val_steps=0"]
EVERY_STEP = ["callbacks.model_checkpoint.every_n_train_steps=1",
              "callbacks.model_checkpoint.save_top_k=-1"]  # step_<n>.ckpt of every step


def run_in_process(run_dir: Path, *overrides: str) -> dict[str, float]:
    try:
        return train(compose_config([*EPOCHS, *overrides], run_dir))
    finally:
        GlobalHydra.instance().clear()


def parameters(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(run), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


def assert_same_run(whole: Path, resumed: Path) -> None:
    """Parameters bit for bit, every record, and the validations at the same steps."""
    a, b = parameters(whole), parameters(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    records_a, records_b = gradflow.load(whole), gradflow.load(resumed)
    assert records_a["step"].tolist() == records_b["step"].tolist() == list(range(10))
    for key in records_a:
        np.testing.assert_array_equal(records_a[key], records_b[key], err_msg=key)
    val_a, val_b = scalars(whole)["val/loss"], scalars(resumed)["val/loss"]
    assert len(val_a) == 4  # after epochs 0, 1 and 2, and of the final weights
    assert val_b == val_a


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """The uninterrupted run, with a checkpoint of every step."""
    run = tmp_path_factory.mktemp("epochs") / "whole"
    run_in_process(run, *EVERY_STEP)
    return run


# Mid-epoch in epochs 0, 1 and 2 (2, 5, 8), and at the ends of epochs 0, 1 and 2 (3, 6, 9):
# written at the last batch, before the epoch's validation.
@pytest.mark.parametrize("step", [2, 3, 5, 6, 8, 9])
def test_resume_from_any_step_of_any_epoch_is_exact(whole, tmp_path, step):
    resumed = tmp_path / "resumed"
    run_in_process(resumed, f"ckpt_path={whole / 'checkpoints' / f'step_{step:07d}.ckpt'}")
    assert_same_run(whole, resumed)


def test_two_resumes_in_a_row_from_a_validation_and_from_a_last_step_are_exact(whole,
                                                                                tmp_path):
    # First to step 6, the end of epoch 1: last.ckpt is written after its validation. Then on
    # to step 8, mid-epoch, where training stops: last.ckpt of its last step. Then to the end.
    first, second, third = tmp_path / "first", tmp_path / "second", tmp_path / "third"
    run_in_process(first, "trainer.max_steps=6")
    assert torch.load(first / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    run_in_process(second, "trainer.max_steps=8", f"ckpt_path={first}")
    assert torch.load(second / "checkpoints" / "last.ckpt", weights_only=False)[
        "global_step"] == 8
    run_in_process(third, f"ckpt_path={second}")
    assert_same_run(whole, third)


def test_a_finished_runs_last_checkpoint_is_at_its_final_step(whole):
    state = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["global_step"] == 10 == json.loads((whole / "metrics.json").read_text())["step"]


def test_resume_records_the_settings_it_was_allowed_to_change(whole, tmp_path):
    run_in_process(tmp_path / "resumed", "trainer.max_steps=11", "monitor.every_n_steps=2",
                   f"ckpt_path={whole / 'checkpoints' / 'step_0000009.ckpt'}")
    resumed = json.loads((tmp_path / "resumed" / "resumed.json").read_text())
    assert resumed["step"] == 9 and resumed["from_run"] == str(whole.resolve())
    assert resumed["changed"]["trainer.max_steps"] == {"was": 10, "now": 11}
    assert resumed["changed"]["monitor.every_n_steps"] == {"was": 1, "now": 2}
    assert "callbacks.model_checkpoint.every_n_train_steps" in resumed["changed"]


REFUSED = [("cell.hidden_size=5", "cell.hidden_size: 4 → 5"),
           ("cell.nonlinearity=relu", "cell.nonlinearity: 'tanh' → 'relu'"),
           ("task.seq_len=7", "task.seq_len: 6 → 7"),
           ("model.optimizer.name=sgd", "model.optimizer.name: 'adam' → 'sgd'"),
           ("model.optimizer.lr=0.1", "model.optimizer.lr: 0.003 → 0.1"),
           ("seed=1", "seed: 0 → 1"),
           ("trainer.gradient_clip_val=1.0", "trainer.gradient_clip_val: None → 1.0"),
           ("cell=gru", "cell._target_: 'rnnlab.cells.rnn.ElmanRNN' → 'rnnlab.cells.gated.GRU'")]


@pytest.mark.parametrize(("override", "message"), REFUSED, ids=[r[0] for r in REFUSED])
def test_resume_with_changed_model_optimizer_or_data_is_refused_naming_the_keys(
        whole, tmp_path, override, message):
    group_first = sorted([override, f"ckpt_path={whole}"], key=lambda o: "." in o.split("=")[0])
    with pytest.raises(ConfigError) as error:
        run_in_process(tmp_path / "resumed", "trainer.max_steps=12", *group_first)
    assert message in str(error.value) and str(whole) in str(error.value)
    assert not (tmp_path / "resumed").exists()  # refused before anything was built


def test_resume_that_would_train_nothing_is_refused(whole, tmp_path):
    with pytest.raises(ConfigError, match=r"trainer.max_steps must be more than the checkpoint's "
                                          r"10 steps to train on from it, got 10"):
        run_in_process(tmp_path / "resumed", f"ckpt_path={whole}")


def test_resume_skips_a_record_it_cannot_read_with_a_warning(whole, tmp_path, caplog):
    broken = tmp_path / "broken"
    for path in whole.rglob("*"):  # a copy of the run, one record cut short
        if path.is_file():
            target = broken / path.relative_to(whole)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    record = broken / "grad_flow" / "step_0000001.npz"
    record.write_bytes(record.read_bytes()[:100])
    run_in_process(tmp_path / "resumed", f"ckpt_path={broken / 'checkpoints/step_0000005.ckpt'}")
    assert f"skipped the record {record}, which cannot be read" in caplog.text
    steps = gradflow.load(tmp_path / "resumed")["step"].tolist()
    assert steps == [0, *range(2, 10)]


def test_resume_names_an_unreadable_run_config(whole, tmp_path):
    copy = tmp_path / "copy"
    (copy / "checkpoints").mkdir(parents=True)
    (copy / "checkpoints" / "last.ckpt").write_bytes((whole / "checkpoints/last.ckpt")
                                                     .read_bytes())
    (copy / ".hydra").mkdir()
    (copy / ".hydra" / "config.yaml").write_text("cell: {hidden_size: [4\n")
    with pytest.raises(ConfigError, match=rf"the resumed run's config {copy}/.hydra/config.yaml "
                                          r"cannot be read"):
        run_in_process(tmp_path / "resumed", "trainer.max_steps=12", f"ckpt_path={copy}")


def test_a_checkpoint_without_its_run_is_checked_against_the_model_settings(whole, tmp_path):
    alone = tmp_path / "alone" / "checkpoints"
    alone.mkdir(parents=True)
    (alone / "last.ckpt").write_bytes((whole / "checkpoints/last.ckpt").read_bytes())
    with pytest.raises(ConfigError, match="cell.hidden_size: 4 → 5"):
        run_in_process(tmp_path / "resumed", "trainer.max_steps=12", "cell.hidden_size=5",
                       f"ckpt_path={alone / 'last.ckpt'}")


def test_a_run_directory_that_holds_a_run_is_refused(whole):
    with pytest.raises(ConfigError, match=rf"paths.output_dir: {whole} holds another run"):
        run_in_process(whole)


# --- real processes: killed, stopped by signals, requeued on SLURM ------------------------------
SETTINGS = ["trainer.max_steps=9", "task.seq_len=8", "task.batch_size=4", "cell.hidden_size=6",
            "model.encoder_size=3", "task.train_batches=4", "task.val_batches=1",
            "monitor.every_n_steps=2", "trainer.enable_progress_bar=false",
            "callbacks.model_checkpoint.every_n_train_steps=3", "trainer.num_sanity_val_steps=0"]
FAULT = "+callbacks.fault._target_=tests.helpers.faults.SignalAt"


def run_script(cwd: Path, run_dir: Path, *overrides: str, env: dict | None = None
               ) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *SETTINGS,
                           f"hydra.run.dir={run_dir}", *overrides],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    whole, killed, resumed = tmp / "whole", tmp / "killed", tmp / "resumed"
    assert run_script(tmp, whole).returncode == 0
    killing = run_script(tmp, killed, FAULT, "+callbacks.fault.step=5")  # SIGKILL
    assert killing.returncode == -9, killing.stderr[-2000:]  # after the validation at step 4
    before = digest(killed)
    result = run_script(tmp, resumed, f"ckpt_path={killed}")
    assert result.returncode == 0, result.stderr[-3000:]
    return whole, killed, resumed, before


def test_resumed_run_ends_with_the_uninterrupted_runs_parameters(runs):
    whole, _, resumed, _ = runs
    a = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 9
    for name, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][name]), name


def test_resumed_run_holds_the_same_grad_flow_records(runs):
    whole, _, resumed, _ = runs
    a, b = gradflow.load(whole), gradflow.load(resumed)
    assert a["step"].tolist() == b["step"].tolist() == [0, 2, 4, 6, 8]
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_resumed_run_has_the_same_tensorboard_points_without_duplicates(runs):
    whole, _, resumed, _ = runs
    a, b = scalars(whole), scalars(resumed)
    assert a.keys() == b.keys()
    for tag in a:
        assert [s for s, _ in b[tag]] == [s for s, _ in a[tag]], tag  # no step twice or missing
        if tag in ("final/train_seconds_per_step", "final/train_peak_memory_mb"):
            continue  # what the machine took, not what the model computed
        np.testing.assert_allclose([v for _, v in b[tag]], [v for _, v in a[tag]], rtol=1e-6,
                                   err_msg=tag)


def test_resuming_leaves_the_killed_runs_files_untouched(runs):
    _, killed, resumed, before = runs
    assert digest(killed) == before
    assert not (killed / "metrics.json").exists()  # it never finished, and still says so
    assert not list(killed.rglob("*.tmp"))  # no checkpoint was being written when it died


def test_load_from_checkpoint_alone_rebuilds_the_model(runs):
    whole, *_ = runs
    model = RecurrentModel.load_from_checkpoint(whole / "checkpoints" / "last.ckpt")
    state = torch.load(whole / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, state[name])
    assert model(torch.zeros(2, 8, 2)).shape == (2, 1, 1)


@pytest.mark.parametrize(("send", "status"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_checkpoints_the_current_step_and_exits_non_zero(runs, tmp_path, send, status):
    whole, *_ = runs
    stopped, resumed = tmp_path / "stopped", tmp_path / "resumed"
    result = run_script(tmp_path, stopped, FAULT, "+callbacks.fault.step=5",
                        f"+callbacks.fault.send={send}")
    assert result.returncode == status, result.stderr[-3000:]
    assert f"Interrupted: {send} received: training stopped after step 5" in result.stderr
    assert "Traceback" not in result.stderr
    interrupted = json.loads((stopped / "interrupted.json").read_text())
    assert interrupted["signal"] == send and interrupted["step"] == 5
    assert interrupted["checkpoint"] == str(stopped / "checkpoints" / "last.ckpt")
    assert torch.load(stopped / "checkpoints" / "last.ckpt", weights_only=False)[
        "global_step"] == 5
    assert not (stopped / "metrics.json").exists()
    assert run_script(tmp_path, resumed, f"ckpt_path={stopped}").returncode == 0
    for name, value in parameters(whole).items():
        assert torch.equal(value, parameters(resumed)[name]), name


def test_slurm_requeue_saves_through_lightning_and_continues_in_the_same_directory(runs,
                                                                                    tmp_path):
    """Lightning's SLURM support: the requeue signal (SIGUSR1) saves hpc_ckpt_1.ckpt and calls
    `scontrol requeue <job>`; SLURM's SIGTERM then stops the job at a checkpoint; the requeued
    job (SLURM_RESTART_COUNT=1) continues in its directory from the newest checkpoint."""
    whole, *_ = runs
    bin_dir, log = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    (bin_dir / "scontrol").chmod(0o755)
    slurm = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_NTASKS": "1",
             "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "localhost",
             "SLURM_LOCALID": "0", "SLURM_PROCID": "0", "SLURM_NODEID": "0"}
    job = tmp_path / "job"
    first = run_script(tmp_path, job, FAULT, "+callbacks.fault.step=[3,5]",
                       "+callbacks.fault.send=[SIGUSR1,SIGTERM]", env=slurm)
    assert first.returncode == 143, first.stderr[-3000:]
    assert log.read_text().split() == ["requeue", "4242"]
    assert torch.load(job / "hpc_ckpt_1.ckpt", weights_only=False)["global_step"] == 3
    assert json.loads((job / "interrupted.json").read_text())["slurm_job_id"] == "4242"
    again = run_script(tmp_path, job, env={**slurm, "SLURM_RESTART_COUNT": "1"})
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming" in (job / "train.log").read_text()
    assert not (job / "interrupted.json").exists() and (job / "metrics.json").is_file()
    for name, value in parameters(whole).items():
        assert torch.equal(value, parameters(job)[name]), name


def test_an_explicit_run_dir_that_holds_a_run_is_refused_and_left_untouched(runs, tmp_path):
    whole, *_ = runs
    before = digest(whole)
    result = run_script(tmp_path, whole)
    assert result.returncode == 2
    assert f"Config error: hydra.run.dir: {whole} holds another run" in result.stderr
    assert "Traceback" not in result.stderr
    assert digest(whole) == before  # not even Hydra's config and log were rewritten


def test_missing_checkpoint_names_the_key_and_the_fix(make_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"ckpt_path: no checkpoint at .*nowhere"):
        train(make_cfg(f"ckpt_path={tmp_path / 'nowhere'}"))


def test_corrupt_checkpoint_is_refused_before_training(make_cfg, tmp_path):
    bad = tmp_path / "broken.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="is not a readable rnnlab checkpoint"):
        train(make_cfg(f"ckpt_path={bad}"))
    assert not (tmp_path / "run" / "grad_flow").exists()


def test_last_finds_the_newest_run_with_a_checkpoint(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        torch.save({"global_step": 3}, tmp_path / name / "checkpoints" / "last.ckpt")
    os.utime(tmp_path / "a" / "checkpoints" / "last.ckpt", (1, 1))
    assert find_checkpoint("last", tmp_path).run_dir == (tmp_path / "b").resolve()
    with pytest.raises(ConfigError, match="ckpt_path=last: no run under"):
        find_checkpoint("last", tmp_path / "empty")


def test_a_checkpoint_does_not_grow_with_the_monitors_history(whole):
    """The heatmaps' history stays on disk, in the records: the monitor's part of a checkpoint
    after 10 monitored steps is as big as after 2."""
    def monitor_state(step: int) -> dict:
        state = torch.load(whole / "checkpoints" / f"step_{step:07d}.ckpt", weights_only=True)
        return next(v for k, v in state["callbacks"].items() if k.startswith("GradFlowCallback"))

    early, late = monitor_state(2), monitor_state(9)
    assert set(early) == set(late) == {"last_record", "records_written", "summaries"}
    assert ({k: v.shape for k, v in early["last_record"].items()}
            == {k: v.shape for k, v in late["last_record"].items()})
    assert set(early["summaries"]) == set(late["summaries"])  # one float per summary
    assert (early["records_written"], late["records_written"]) == (2, 9)


def test_a_resumed_runs_heatmap_history_is_read_back_from_its_records(whole, tmp_path):
    from rnnlab.callbacks import GradFlowCallback

    records = gradflow.load(whole)
    callback = GradFlowCallback(whole / "grad_flow", every_n_steps=1)
    callback.restore_histories(6)
    history = callback.histories[""]
    assert history.steps == [0, 1, 2, 3, 4, 5]
    np.testing.assert_array_equal(np.array(history.log10), np.log10(records["dL_dz"][:6]))
