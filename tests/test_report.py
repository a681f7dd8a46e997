"""scripts/report.py and rnnlab.report: finding runs, what the figures draw, the page, the table."""

from __future__ import annotations

import base64
import json
import math
import os
import re
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest
from omegaconf import OmegaConf

from rnnlab.figures import at_least_one_decade, draw_heatmap, semilogy_positive
from rnnlab.records import Lyapunov, Record
from rnnlab.report import (
    NoRunsError,
    decay_vs_gain_figure,
    find_runs,
    legend_names,
    load_runs,
    loss_figure,
    profiles_by_step_figure,
    profiles_figure,
    spectra_figure,
)

from .conftest import ROOT

PNG = b"\x89PNG\r\n\x1a\n"
T = 8


def fake_run(path, gain: float, steps=(0, 10, 20), val_loss: float = 0.1, overrides=(),
             spectra: dict | None = None):
    """A run directory as scripts/train.py leaves it, with a geometric profile gain^(T−1−t)
    whose amplitude grows with the step, and training loss 1/(1 + step); ``spectra``: step →
    the Lyapunov spectrum recorded at that step."""
    for step in steps:
        profile = (1 + step) * gain ** (T - 1 - np.arange(T))
        record = Record(step, {"dL_dz": profile}, loss=1 / (1 + step))
        if spectra and step in spectra:
            exponents = np.asarray(spectra[step])
            record.lyapunov = Lyapunov(exponents, exponents[None], profile, 0.0)
        record.save(path / "grad_flow")
    (path / "metrics.json").write_text(json.dumps(
        {"val/loss": val_loss, "val/baseline": 1 / 6, "step": steps[-1] + 1}))
    (path / ".hydra").mkdir()
    OmegaConf.save({"cell": {"_target_": "rnnlab.cells.rnn.ElmanRNN", "gain": gain,
                             "nonlinearity": "identity"}}, path / ".hydra" / "config.yaml")
    OmegaConf.save(list(overrides) or [f"cell.gain={gain}", "task.seq_len=8"],
                   path / ".hydra" / "overrides.yaml")
    return path


@pytest.fixture
def sweep(tmp_path):
    """A multirun directory with jobs 0, 1, 2 at gains 0.5, 1.0, 2.0."""
    root = tmp_path / "multirun"
    for job, gain in enumerate((0.5, 1.0, 2.0)):
        fake_run(root / str(job), gain, val_loss=0.1 * (job + 1))
    return root


def run_script(script: str, *args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=600)


def test_report_script_on_a_hydra_multirun_writes_every_figure_into_one_self_contained_page(
        tmp_path):
    trained = run_script(
        "train.py", "-m", "cell.gain=0.9,1.1", "cell.nonlinearity=identity", "cell.init=orthogonal",
        "task.seq_len=10", "trainer.max_steps=2", "task.train_batches=1", "task.val_batches=1",
        "task.batch_size=4", "cell.hidden_size=8", "trainer.enable_progress_bar=false",
        "monitor.every_n_steps=1", f"hydra.sweep.dir={tmp_path / 'sweep'}", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    result = run_script("report.py", str(tmp_path / "sweep"), "--out", str(tmp_path / "report"),
                        cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = tmp_path / "report"
    assert f"Report: {out / 'report.html'}" in result.stdout
    assert "cell.gain=0.9" in result.stdout and "cell.gain=1.1" in result.stdout  # the table
    page = (out / "report.html").read_text()
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    names = ("profiles", "profiles_by_step", "heatmaps", "decay_vs_gain", "spectra", "loss")
    assert [base64.b64decode(e) for e in embedded] == [(out / f"{n}.png").read_bytes()
                                                       for n in names]
    assert all((out / f"{n}.png").read_bytes().startswith(PNG) for n in names)
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing loaded from elsewhere
    assert page.count("<tr>") == 3 and "cell.gain=0.9" in page and "cell.gain=1.1" in page


def test_report_script_names_a_directory_without_runs_and_exits_2(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_script("report.py", str(tmp_path / "empty"), "--out", str(tmp_path / "report"),
                        cwd=tmp_path)
    assert result.returncode == 2
    assert f"no runs under {tmp_path / 'empty'}" in result.stderr
    assert not (tmp_path / "report").exists()


def test_find_runs_takes_a_run_a_list_of_runs_or_a_multirun_directory(sweep):
    assert find_runs([sweep / "1"]) == [sweep / "1"]
    assert find_runs([sweep / "2", sweep / "0"]) == [sweep / "2", sweep / "0"]
    assert find_runs([sweep]) == [sweep / "0", sweep / "1", sweep / "2"]


def test_find_runs_orders_multirun_jobs_numerically(tmp_path):
    for job in (10, 2, 1):
        fake_run(tmp_path / str(job), 1.0)
    assert [p.name for p in find_runs([tmp_path])] == ["1", "2", "10"]


def test_find_runs_puts_runs_given_in_a_shell_globs_order_in_natural_order(tmp_path):
    for job in (0, 2, 10, 12):
        fake_run(tmp_path / f"{job}_cell=rnn", 1.0)
    glob = sorted(str(p) for p in tmp_path.glob("*_cell=rnn"))  # the shell's: 0, 10, 12, 2
    assert [p.name.split("_")[0] for p in find_runs(glob)] == ["0", "2", "10", "12"]
    chosen = [tmp_path / "12_cell=rnn", tmp_path / "0_cell=rnn"]  # an order of the user's own
    assert find_runs(chosen) == chosen


def test_find_runs_names_a_path_that_holds_no_run(tmp_path, sweep):
    (tmp_path / "other").mkdir()
    with pytest.raises(NoRunsError, match=f"no runs under {re.escape(str(tmp_path / 'other'))}"):
        find_runs([sweep, tmp_path / "other"])


def test_a_run_without_records_is_skipped_and_the_others_reported(sweep):
    for record in (sweep / "1" / "grad_flow").iterdir():
        record.unlink()
    assert [run.label for run in load_runs([sweep])] == ["0", "2"]


def test_table_row_holds_final_metrics_and_the_last_records_summary(sweep):
    run = load_runs([sweep / "2"])[0]
    row = run.final()
    profile = 21 * 2.0 ** (T - 1 - np.arange(T))  # the last record, step 20
    assert row["run"] == "2" and row["cell"] == "ElmanRNN(identity)" and row["gain"] == 2.0
    assert row["T"] == T and row["steps"] == 21
    assert row["val/loss"] == pytest.approx(0.3) and row["val/baseline"] == 1 / 6
    assert row["decay_rate"] == pytest.approx(math.log10(2.0), abs=1e-12)
    assert row["log10_first_last"] == pytest.approx(math.log10(profile[0] / profile[-1]))
    assert row["horizon"] == T - 1
    assert math.isnan(row["jacobian_rate"])  # not measured in these runs


def test_overrides_shared_by_every_run_are_left_out(sweep):
    runs = load_runs([sweep])
    assert [run.overrides for run in runs] == [["cell.gain=0.5"], ["cell.gain=1.0"],
                                               ["cell.gain=2.0"]]


def test_profiles_figure_draws_each_runs_profile_at_the_chosen_steps(sweep):
    runs = load_runs([sweep])
    fig = profiles_figure(runs, steps=[0, 20])
    for ax, run in zip(fig.axes, runs):
        assert [line.get_label() for line in ax.lines] == ["step 0", "step 20"]
        for line, row in zip(ax.lines, (0, 2)):
            np.testing.assert_allclose(line.get_ydata(), run.record["dL_dz"][row])
        assert ax.get_yscale() == "log"


def test_decay_vs_gain_figure_draws_the_measured_decay_rate_against_the_configured_gain(sweep):
    fig = decay_vs_gain_figure(load_runs([sweep]))
    first, last, reference = fig.axes[0].lines[:3]
    np.testing.assert_allclose(first.get_xdata(), [0.5, 1.0, 2.0])
    np.testing.assert_allclose(last.get_ydata(), np.log10([0.5, 1.0, 2.0]), atol=1e-12)
    np.testing.assert_allclose(reference.get_ydata(), np.log10(reference.get_xdata()))


def test_loss_figure_draws_training_loss_final_validation_loss_and_the_baseline(sweep):
    runs = load_runs([sweep])
    ax = loss_figure(runs).axes[0]
    curves = [line for line in ax.lines if line.get_linestyle() == "-"]
    finals = [line for line in ax.lines if line.get_marker() == "*"]
    baselines = [line for line in ax.lines if line.get_linestyle() == "--"]
    assert len(curves) == len(runs) == 3
    for curve in curves:  # fake_run's training loss 1/(1 + step) at steps 0, 10, 20
        np.testing.assert_allclose(curve.get_xdata(), [0, 10, 20])
        np.testing.assert_allclose(curve.get_ydata(), [1, 1 / 11, 1 / 21])
    assert [float(line.get_ydata()[0]) for line in finals] == pytest.approx([0.1, 0.2, 0.3])
    assert {float(line.get_ydata()[0]) for line in baselines} == {1 / 6}


def test_profile_axes_show_every_curve_even_when_the_first_is_flat():
    flat = np.full(20, 0.3)  # gain 1 at step 0; training then drops the norm tenfold
    lower = np.linspace(0.03, 0.06, 20)
    fig, ax = plt.subplots()
    semilogy_positive(ax, flat, "step 0")
    semilogy_positive(ax, lower, "step 50")
    at_least_one_decade(ax)
    low, high = ax.get_ylim()
    assert low <= lower.min() and high >= flat.max()
    plt.close(fig)


def test_heatmap_rows_are_centred_on_their_training_steps():
    steps = [0, 50, 100]
    fig, ax = plt.subplots()
    mesh = draw_heatmap(ax, steps, np.log10(np.ones((3, 4))))
    row_edges = mesh.get_coordinates()[:, 0, 1]
    np.testing.assert_allclose(row_edges, [-25, 25, 75, 125])
    np.testing.assert_allclose((row_edges[:-1] + row_edges[1:]) / 2, steps)
    plt.close(fig)


def test_profiles_by_step_draws_every_run_in_one_panel_per_training_step(sweep):
    runs = load_runs([sweep])
    fig = profiles_by_step_figure(runs, steps=[0, 20])
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["training step 0", "training step 20"]
    for ax, row in zip(visible, (0, 2)):  # the sweep records steps 0, 10, 20
        assert len(ax.lines) == len(runs)
        for line, run in zip(ax.lines, runs):
            np.testing.assert_allclose(line.get_ydata(), run.record["dL_dz"][row])


def test_nested_group_overrides_are_shortened_in_labels(tmp_path):
    fake_run(tmp_path / "a", 1.0, overrides=["experiment/urnn_model@_global_=lstm", "seed=1"])
    fake_run(tmp_path / "b", 1.0, overrides=["experiment/urnn_model@_global_=tanh_rnn", "seed=1"])
    assert [run.overrides for run in load_runs([tmp_path])] == [["urnn_model=lstm"],
                                                                 ["urnn_model=tanh_rnn"]]


def test_legends_name_runs_by_the_overrides_that_tell_them_apart_unless_two_share_them(
        tmp_path):
    fake_run(tmp_path / "s1" / "0", 1.0, overrides=["cell=rnn", "seed=1"])
    fake_run(tmp_path / "s1" / "1", 1.0, overrides=["cell=gru", "seed=1"])
    apart = load_runs([tmp_path / "s1"])
    assert legend_names(apart) == ["cell=rnn", "cell=gru"]
    fake_run(tmp_path / "s2" / "0", 1.0, overrides=["cell=rnn", "seed=1"])
    shared = load_runs([tmp_path / "s1", tmp_path / "s2"])  # two runs named cell=rnn
    assert legend_names(shared) == ["s1/0 cell=rnn", "s1/1 cell=gru", "s2/0 cell=rnn"]


def test_table_status_tells_a_failed_job_and_an_unfinished_one_from_a_completed_one(sweep):
    (sweep / "1" / "failed.json").write_text(json.dumps(
        {"error_type": "FloatingPointError", "message": "loss is nan at step 20"}))
    (sweep / "1" / "metrics.json").unlink()
    (sweep / "2" / "metrics.json").unlink()
    rows = [run.final() for run in load_runs([sweep])]
    assert [row["status"] for row in rows] == ["completed", "failed (FloatingPointError)",
                                               "incomplete"]
    assert math.isnan(rows[1]["val/loss"]) and rows[1]["steps"] == 20  # its last record


def test_spectra_figure_draws_the_first_and_last_recorded_spectrum_and_the_top_exponent(
        tmp_path):
    spectra = {10: [-0.1, -0.3], 20: [-0.02, -0.2]}  # none at step 0
    run = load_runs([fake_run(tmp_path / "run", 0.5, spectra=spectra)])[0]
    fig = spectra_figure([run])
    left, right = fig.axes
    lines = [line for line in left.get_lines() if line.get_gid() in ("first", "last")]
    assert [line.get_gid() for line in lines] == ["first", "last"]
    assert [list(line.get_ydata()) for line in lines] == [spectra[10], spectra[20]]
    assert [list(line.get_xdata()) for line in lines] == [[1, 2], [1, 2]]
    (top,) = [line for line in right.get_lines() if not line.get_label().startswith("_")]
    assert list(top.get_xdata()) == [10, 20] and list(top.get_ydata()) == [-0.1, -0.02]
    plt.close(fig)
