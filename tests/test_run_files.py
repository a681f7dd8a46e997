"""A run's files damaged by a kill, a full disk or an editor: the report and the sweep summary
name the file and what to do (exit 2); an unwritable ``--out`` is named before any work."""

from __future__ import annotations

import errno
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from rnnlab import records
from rnnlab.records import Record
from rnnlab.rundir import BackgroundWriter, DiskFullError, RunFileError
from rnnlab.sweep import main as summarise
from rnnlab.sweep import write_summary

from .conftest import ROOT


def make_run(path: Path, num: int = 0) -> Path:
    """A finished job directory: one record, metrics.json, Hydra's files."""
    profile = 0.9 ** (7 - np.arange(8))
    Record(0, {"dL_dz": profile}, loss=0.5).save(path / "grad_flow")
    (path / "metrics.json").write_text(json.dumps({"val/loss": 0.2, "val/baseline": 1 / 6,
                                                   "step": 1}))
    (path / ".hydra").mkdir()
    OmegaConf.save({"cell": {"gain": 0.9}}, path / ".hydra" / "config.yaml")
    OmegaConf.save(["cell.gain=0.9"], path / ".hydra" / "overrides.yaml")
    OmegaConf.save({"hydra": {"job": {"num": num}}}, path / ".hydra" / "hydra.yaml")
    return path


def report(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "report.py"), *args],
                          capture_output=True, text=True, timeout=300)


DAMAGE = {
    "metrics.json cut short": ("metrics.json", '{"val/loss": 0.2, "val/ba'),
    "metrics.json empty": ("metrics.json", ""),
    "failed.json cut short": ("failed.json", '{"error_type": "Floating'),
    "config.yaml corrupt": (".hydra/config.yaml", "cell: {gain: [0.9\n"),
    "record of zero bytes": ("grad_flow/step_0000000.npz", ""),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_report_names_a_damaged_file_and_exits_2(tmp_path, damage):
    name, content = DAMAGE[damage]
    run = make_run(tmp_path / "run")
    (run / name).write_text(content)
    result = report(str(run), "--out", str(tmp_path / "report"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"Report error: {run / name} cannot be read" in result.stderr
    assert "Traceback" not in result.stderr


def test_report_names_an_unwritable_out_before_reading_any_run(tmp_path):
    run = make_run(tmp_path / "run")
    blocker = tmp_path / "file"
    blocker.write_text("a file where --out should go")
    result = report(str(run), "--out", str(blocker / "report"))
    assert result.returncode == 2
    assert (f"Report error: --out {blocker / 'report'}: cannot write there ({blocker} is a "
            "file, not a directory); choose another --out") in result.stderr
    assert "Traceback" not in result.stderr


def test_report_reads_null_metrics(tmp_path):
    run = make_run(tmp_path / "run")
    (run / "metrics.json").write_text(json.dumps({"val/loss": None, "val/baseline": 1 / 6,
                                                  "step": 1, "not_finite": {"val/loss": "nan"}}))
    result = report(str(run), "--out", str(tmp_path / "report"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "report" / "report.html").is_file()


OUTCOME_DAMAGE = [d for d, (name, _) in DAMAGE.items() if name.endswith(".json")]


@pytest.mark.parametrize("damage", OUTCOME_DAMAGE)
def test_summary_lists_a_job_with_a_damaged_file_as_unreadable_and_goes_on(tmp_path, damage,
                                                                            capsys):
    name, content = DAMAGE[damage]
    make_run(tmp_path / "0_cell.gain=0.9", num=0)
    make_run(tmp_path / "1_cell.gain=1.0", num=1)
    (tmp_path / "1_cell.gain=1.0" / name).write_text(content)
    summary = write_summary(tmp_path)
    assert [row["status"] for row in summary["jobs"]] == ["completed", "unreadable"]
    assert f"{tmp_path / '1_cell.gain=1.0' / name} cannot be read" in summary["jobs"][1]["error"]
    with pytest.raises(SystemExit) as exit_:
        summarise([str(tmp_path)])
    assert exit_.value.code == 2
    assert f"Summary error: {tmp_path / '1_cell.gain=1.0' / name}" in capsys.readouterr().err


def test_summary_names_a_damaged_hydra_file(tmp_path):
    job = make_run(tmp_path / "0_x", num=0)
    (job / ".hydra" / "hydra.yaml").write_text("hydra: {job: {num: [0\n")
    row = write_summary(tmp_path)["jobs"][0]
    assert row["status"] == "unreadable"
    assert f"{job / '.hydra' / 'hydra.yaml'} cannot be read" in row["error"]


def test_summary_of_a_missing_directory_exits_2_naming_it(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        summarise([str(tmp_path / "nowhere")])
    assert exit_.value.code == 2
    assert f"Summary error: {tmp_path / 'nowhere'} is not a directory" in capsys.readouterr().err


# --- gradient-flow records ------------------------------------------------------------------------
def saved_records(directory: Path, steps=(0, 5, 10), T: int = 8) -> list[Path]:
    return [Record(step, {"dL_dz": np.linspace(1, 2, T)}, loss=0.5).save(directory)
            for step in steps]


def test_a_record_cut_short_is_named_with_what_to_do(tmp_path):
    paths = saved_records(tmp_path / "grad_flow")
    whole = paths[1].read_bytes()
    paths[1].write_bytes(whole[: len(whole) // 2])  # what a kill mid-copy leaves
    for load in (lambda: records.load(tmp_path), lambda: Record.load(paths[1])):
        with pytest.raises(RunFileError, match=rf"^{paths[1]} cannot be read .*cut short.*"
                                               r"delete it"):
            load()
    paths[1].unlink()  # what the message says to do: the others load
    assert records.load(tmp_path)["step"].tolist() == [0, 10]


def test_a_record_of_zero_bytes_is_named(tmp_path):
    paths = saved_records(tmp_path / "grad_flow")
    paths[0].write_bytes(b"")
    with pytest.raises(RunFileError, match=rf"^{paths[0]} cannot be read"):
        records.load(tmp_path)


def test_a_record_without_step_is_named(tmp_path):
    paths = saved_records(tmp_path / "grad_flow")
    np.savez(paths[2], dL_dz=np.ones(8), T=8)
    with pytest.raises(RunFileError, match=rf"^{paths[2]} holds no 'step' \(keys: T, dL_dz\)"):
        records.load(tmp_path)


def test_a_record_with_another_T_is_named(tmp_path):
    saved_records(tmp_path / "grad_flow", steps=(0, 5), T=8)
    other = saved_records(tmp_path / "grad_flow", steps=(10,), T=12)[0]
    first = tmp_path / "grad_flow" / "step_0000000.npz"
    with pytest.raises(RunFileError, match=rf"^{other} holds T = 12, but {first} T = 8: records "
                                           r"of runs with different task.seq_len"):
        records.load(tmp_path)


def test_a_step_held_twice_is_named(tmp_path):
    path = saved_records(tmp_path / "grad_flow", steps=(0, 5))[1]
    copy = path.with_name("step_0000005 (copy).npz")
    copy.write_bytes(path.read_bytes())
    with pytest.raises(RunFileError, match=r"both hold step 5"):
        records.load(tmp_path)


def test_loading_a_directory_of_several_runs_is_refused_naming_them(tmp_path):
    for run in ("adding/rnn/a", "adding/rnn/b", "adding/gru/c"):
        saved_records(tmp_path / run / "grad_flow")
    with pytest.raises(RunFileError, match=r"is not a run directory: it holds 3 runs \(adding/gru/c"
                                           r", adding/rnn/a, adding/rnn/b\); load one run per "
                                           r"directory"):
        records.load(tmp_path)
    assert records.load(tmp_path / "adding/rnn/a")["step"].tolist() == [0, 5, 10]  # one is fine


def test_a_full_disk_while_a_record_is_written_names_it_and_keeps_the_previous(tmp_path,
                                                                               monkeypatch):
    directory = tmp_path / "grad_flow"
    path = saved_records(directory, steps=(5,))[0]
    before = path.read_bytes()

    def disk_full(file, **arrays):
        file.write(b"PK half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(records.np, "savez", disk_full)
    with pytest.raises(DiskFullError, match=rf"^disk full: could not write {path} \(no space"):
        Record(5, {"dL_dz": np.zeros(8)}).save(directory)
    assert path.read_bytes() == before and [p.name for p in directory.iterdir()] == [path.name]


def test_background_writes_run_in_order_and_wait_raises_the_first_failure():
    writer = BackgroundWriter("test")
    done: list[int] = []
    for i in range(5):
        writer.submit(done.append, i)
    writer.wait()
    assert done == [0, 1, 2, 3, 4]

    def fail(message):
        raise OSError(errno.ENOSPC, message)

    writer.submit(fail, "first")
    writer.submit(fail, "second")
    writer.submit(done.append, 5)  # still written: a failure does not drop the writes after it
    with pytest.raises(OSError, match="first"):
        writer.wait()
    assert done[-1] == 5
    writer.submit(fail, "third")
    while writer._pending and not writer._pending[0].done():
        pass
    with pytest.raises(OSError, match="third"):  # surfaces at the next write
        writer.submit(done.append, 6)
    writer.close()


def test_a_full_disk_while_training_writes_a_record_stops_the_run_naming_it(make_cfg, tmp_path,
                                                                            monkeypatch):
    from rnnlab.train import train

    def disk_full(file, **arrays):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(records.np, "savez", disk_full)
    with pytest.raises(DiskFullError,
                       match=r"could not write .*grad_flow/steps_0000000-\d{7}\.npz"):
        train(make_cfg("trainer.max_steps=4", "monitor.every_n_steps=1"))


def test_a_record_killed_mid_write_leaves_the_previous_and_no_temp_file(tmp_path):
    """SIGKILL in the middle of np.savez: the record on disk is the previous one, whole, and the
    next process's write of it removes the killed writer's temporary file."""
    directory = tmp_path / "grad_flow"
    path = saved_records(directory, steps=(5,))[0]
    script = f"""
import os, signal
import numpy as np
from rnnlab import records
from rnnlab.records import Record
real = np.savez
def savez(file, **arrays):
    file.write(b"PK half a zip")
    file.flush()
    os.kill(os.getpid(), signal.SIGKILL)
records.np.savez = savez
Record(5, {{"dL_dz": np.zeros(8)}}).save({str(directory)!r})
"""
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert killed.returncode == -9
    orphans = [p for p in directory.iterdir() if p.name.startswith(".")]
    assert len(orphans) == 1  # the killed writer's, beside the record
    np.testing.assert_array_equal(Record.load(path).profiles["dL_dz"], np.linspace(1, 2, 8))
    # the next write of a later process (a resumed run) cleans up
    next_write = (f"import numpy as np; from rnnlab.records import Record; "
                  f"Record(5, {{'dL_dz': np.zeros(8)}}).save({str(directory)!r})")
    assert subprocess.run([sys.executable, "-c", next_write], timeout=300).returncode == 0
    assert [p.name for p in directory.iterdir()] == [path.name]
    np.testing.assert_array_equal(Record.load(path).profiles["dL_dz"], np.zeros(8))
