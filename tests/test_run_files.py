"""A run's files damaged by a kill, a full disk or an editor: the report and the sweep summary
name the file and what to do (exit 2); an unwritable ``--out`` is named before any work."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from rnnlab import gradflow
from rnnlab.sweep import main as summarise
from rnnlab.sweep import write_summary

from .conftest import ROOT


def make_run(path: Path, num: int = 0) -> Path:
    """A finished job directory: one record, metrics.json, Hydra's files."""
    profile = 0.9 ** (7 - np.arange(8))
    gradflow.save(path / "grad_flow", 0, {"dL_dz": profile, "loss": 0.5,
                                          **gradflow.summarize(profile)})
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
