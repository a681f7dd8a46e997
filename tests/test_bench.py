"""The benchmark's cases run (small T), a failing case is recorded instead of ending the run, and
``flush_denormal`` holds for a run only."""

from __future__ import annotations

import json
import math
import re

import pytest
import pytorch_lightning as pl
import torch

from rnnlab import bench
from rnnlab.train import train


@pytest.mark.parametrize("mode", ["raw", "off", "monitor", "probed"])
def test_each_benchmark_mode_measures_a_rate(mode):
    case = {"cell": "gru", "T": 5, "mode": mode, "warmup": 1, "steps": 2, "every": 2,
            "device": "cpu", "threads": 1}
    result = bench.run_case(case)
    if mode == "probed":
        assert result["plain_s"] > 0 and result["probed_s"] > 0
    else:
        assert math.isfinite(result["steps_per_s"]) and result["steps_per_s"] > 0


def test_a_paired_case_times_raw_steps_between_its_own(monkeypatch):
    """``paired``: one raw step after each timed rnnlab step but the last, timed apart; the
    rnnlab rate leaves their time out, and ``over_raw`` is the ratio of the two rates."""
    raw_steps = []
    step = bench.RawLoop.step
    monkeypatch.setattr(bench.RawLoop, "step", lambda self: (raw_steps.append(1), step(self)))
    case = {"cell": "gru", "T": 5, "mode": "off", "warmup": 2, "steps": 4, "device": "cpu",
            "threads": 1, "paired": True}
    result = bench.run_case(case)
    assert len(raw_steps) == 2 + 3  # its warm-up, then between the four timed steps
    assert result["raw_steps_per_s"] > 0 and result["steps_per_s"] > 0
    assert result["over_raw"] == pytest.approx(result["steps_per_s"] / result["raw_steps_per_s"])


def test_each_timed_step_is_kept_and_they_add_up_to_the_rate():
    """``step_ms``: each timed step from the end of the one before (the raw step beside it left
    out), so the window's rate is their count over their sum; ``raw_step_ms``: the raw steps."""
    case = {"cell": "gru", "T": 5, "mode": "off", "warmup": 1, "steps": 3, "device": "cpu",
            "threads": 1, "paired": True}
    result = bench.run_case(case)
    assert len(result["step_ms"]) == 3 and len(result["raw_step_ms"]) == 2
    assert all(ms > 0 for ms in result["step_ms"] + result["raw_step_ms"])
    assert result["steps_per_s"] == pytest.approx(3000 / sum(result["step_ms"]), rel=1e-9)
    assert result["raw_steps_per_s"] == pytest.approx(2000 / sum(result["raw_step_ms"]),
                                                      rel=1e-9)


def test_a_long_runs_monitored_rate_is_composed_for_the_default_period():
    """Window steps 1..8 at every 4, Jacobians every 8 (step 0, in the warm-up, had them): after
    the Jacobian step, two unmonitored, monitored, after it, two unmonitored, Jacobian. A period
    of 500 steps every 50: 480 unmonitored, 9 monitored and 9 after them, 1 Jacobian step and 1
    after it."""
    case = {"warmup": 1, "steps": 8, "every": 4, "jacobian_every": 8,
            "compose": {"every": 50, "period": 500}}
    assert [bench.step_kind(s, 4, 8) for s in range(1, 9)] == [
        "after_jacobian", "unmonitored", "unmonitored", "monitored", "after_monitored",
        "unmonitored", "unmonitored", "jacobian"]
    result = {"steps_per_s": 30.0, "over_raw": 0.5,
              "step_ms": [40.0, 10.0, 12.0, 30.0, 15.0, 11.0, 13.0, 100.0],
              "raw_step_ms": [8.0, 9.0, 10.0, 9.0, 9.0, 8.0, 10.0]}
    composed = bench.compose_period(case, result)
    total_ms = 480 * 11.5 + 9 * 30.0 + 9 * 15.0 + 100.0 + 40.0  # 6065
    assert composed["steps_per_s"] == pytest.approx(500_000 / 6065)
    assert composed["over_raw"] == pytest.approx(500 * 9.0 / total_ms)
    assert composed["window_steps_per_s"] == 30.0 and composed["window_over_raw"] == 0.5
    assert {kind: composed[f"{kind}_step_ms"] for kind in bench.STEP_KINDS} == {
        "unmonitored": 11.5, "monitored": 30.0, "after_monitored": 15.0, "jacobian": 100.0,
        "after_jacobian": 40.0}
    unpaired = bench.compose_period(case, {"steps_per_s": 30.0, "step_ms": result["step_ms"]})
    assert unpaired["steps_per_s"] == pytest.approx(500_000 / 6065) and "over_raw" not in unpaired
    with pytest.raises(ValueError, match="no jacobian step"):
        bench.compose_period({**case, "steps": 7}, {**result, "step_ms": result["step_ms"][:7]})


def test_the_full_plan_times_the_fused_three_at_ten_thousand_steps_and_quick_does_not():
    lengths = {cell: sorted({c["T"] for c in bench.plan(False, [cell], [100, 1000])})
               for cell in ("rnn", "gru", "lstm", "node", "mingru")}
    assert lengths == {"rnn": [100, 1000, 10_000], "gru": [100, 1000, 10_000],
                       "lstm": [100, 1000, 10_000], "node": [100, 1000], "mingru": [100, 1000]}
    assert {c["T"] for c in bench.plan(True, ["rnn", "gru", "lstm"], [100])} == {100}


def test_the_long_plan_holds_each_kind_of_step_once_per_window_and_runs():
    cases = bench.plan(False, ["lstm"], [10_000], paired=True)
    assert [(c["T"], c["mode"]) for c in cases] == [(10_000, m) for m in
                                                    ("raw", "off", "monitor", "probed")]
    monitor = cases[2]
    steps = range(monitor["warmup"], monitor["warmup"] + monitor["steps"])
    kinds = {bench.step_kind(s, monitor["every"], monitor["jacobian_every"]) for s in steps}
    assert kinds == set(bench.STEP_KINDS)
    assert (f"monitor.jacobian_every_n_steps={monitor['jacobian_every']}"
            in monitor["monitor_overrides"])
    # the same window at small T, in-process: a rate composed from its own steps
    small = {**monitor, "T": 5, "device": "cpu", "threads": 1,
             "monitor_overrides": [o for o in monitor["monitor_overrides"]
                                   if "checkpoint" not in o]}
    result = bench.run_case(small)
    assert result["over_raw"] == pytest.approx(bench.compose_period(small, result)["over_raw"])
    assert result["window_over_raw"] == pytest.approx(
        result["window_steps_per_s"] / result["raw_steps_per_s"])
    _, (row,) = bench.cell_table(["lstm"], [
        {"cell": "lstm", "T": 5, "mode": "off", "steps_per_s": 9.0, "over_raw": 0.9,
         "peak_mb": 1.0},
        {**small, **result, "mode": "monitor", "cell": "lstm", "peak_mb": 1.0},
        {"cell": "lstm", "T": 5, "mode": "probed", "plain_s": 1.0, "probed_s": 1.0}], "t")
    assert row["composed"] == {"every": 50, "period": 500}
    assert row["monitor_over_off"] == pytest.approx(result["over_raw"] / 0.9)


def test_paired_ratios_come_from_each_modes_own_raw_steps():
    def case(mode, steps_per_s, over_raw=None, **more):
        paired = {} if over_raw is None else {"over_raw": over_raw}
        return {"cell": "gru", "T": 5, "mode": mode, "steps_per_s": steps_per_s,
                "peak_mb": 100.0, **paired, **more}

    results = [case("raw", 50.0), case("off", 8.0, 0.9), case("monitor", 6.0, 0.8, every=2),
               case("every_step", 4.0, 0.6), case("probed", None, plain_s=1.0, probed_s=1.5)]
    _, (row,) = bench.cell_table(["gru"], results, "t")
    assert row["paired"] and row["raw_steps_per_s"] == 50.0
    assert row["off_over_raw"] == 0.9 and row["monitor_over_raw"] == 0.8
    assert row["monitor_over_off"] == pytest.approx(0.8 / 0.9)
    assert row["every_step_over_off"] == pytest.approx(0.9 / 0.6)
    _, (unpaired,) = bench.cell_table(["gru"], [{k: v for k, v in r.items() if k != "over_raw"}
                                                 for r in results], "t")
    assert not unpaired["paired"] and unpaired["off_over_raw"] == 8.0 / 50.0


def test_a_cell_without_a_raw_loop_is_measured_against_its_own_unmonitored_run():
    modes = [c["mode"] for c in bench.plan(True, ["lru"], [100], paired=True)]
    assert modes == ["off", "monitor", "every_step", "probed"]
    results = [{"cell": "lru", "T": 100, "mode": "off", "steps_per_s": 10.0, "peak_mb": 100.0},
               {"cell": "lru", "T": 100, "mode": "monitor", "steps_per_s": 9.0, "every": 50,
                "peak_mb": 120.0},
               {"cell": "lru", "T": 100, "mode": "probed", "plain_s": 1.0, "probed_s": 1.2,
                "peak_mb": 100.0}]
    _, (row,) = bench.cell_table(["lru"], results, "t")
    assert row["raw_steps_per_s"] is None and row["off_over_raw"] is None
    assert row["monitor_over_off"] == 0.9 and row["monitor_memory_over_off"] == 1.2
    # Paired with its reference loop: each mode over the reference steps beside it.
    results[0]["over_raw"], results[1]["over_raw"] = 0.96, 0.84
    _, (row,) = bench.cell_table(["lru"], results, "t")
    assert row["paired"] and row["off_over_raw"] is None and row["monitor_over_raw"] is None
    assert row["monitor_over_off"] == pytest.approx(0.84 / 0.96)


def test_a_cell_without_a_raw_loop_is_paired_with_its_own_model_in_a_bare_loop(monkeypatch):
    loops = []
    init = bench.RawLoop.__init__
    monkeypatch.setattr(bench.RawLoop, "__init__",
                        lambda self, *a, **k: (loops.append(self), init(self, *a, **k))[1])
    steps = []
    step = bench.RawLoop.step
    monkeypatch.setattr(bench.RawLoop, "step", lambda self: (steps.append(1), step(self)))
    case = {"cell": "lru", "T": 5, "mode": "monitor", "every": 2, "warmup": 1, "steps": 3,
            "device": "cpu", "threads": 1, "paired": True}
    result = bench.run_case(case)
    assert result["over_raw"] == pytest.approx(result["steps_per_s"] / result["raw_steps_per_s"])
    (loop,) = loops
    model = loop.model
    assert type(model).__name__ == "RecurrentModel" and type(model.cell).__name__ == "LRU"
    assert len(steps) == 1 + 2  # its warm-up, then between the three timed steps
    assert all(p.grad is not None for p in model.parameters())  # it trained


@pytest.mark.parametrize("cell", ["lru", "cornn"])
def test_the_probed_mode_runs_for_the_new_cells(cell):
    result = bench.run_case({"cell": cell, "T": 5, "mode": "probed", "steps": 1,
                             "device": "cpu", "threads": 1})
    assert result["plain_s"] > 0 and result["probed_s"] > 0


def test_a_failing_case_is_recorded_with_its_error():
    result = bench.measure({"cell": "gru", "T": 5, "mode": "monitor", "warmup": 1, "steps": 2,
                            "every": 2, "device": "cpu",
                            "monitor_overrides": ["monitor.every_n_steps=0"]})
    assert result["error"] == "exit code 1"
    assert "monitor.every_n_steps" in result["stderr"]


def subnormal_survives() -> bool:
    return bool(torch.tensor([1e-39]) * 1.0 != 0)


class RecordFlush(pl.Callback):
    """Records, as training starts, whether a float32 subnormal survives arithmetic."""

    seen: list[bool] = []

    def on_train_start(self, trainer, pl_module) -> None:
        RecordFlush.seen.append(subnormal_survives())


@pytest.mark.parametrize("flush", [True, False])
def test_flush_denormal_holds_during_the_run_and_is_restored_after(make_cfg, flush):
    RecordFlush.seen.clear()
    train(make_cfg(f"flush_denormal={str(flush).lower()}",
                   f"+callbacks.flush._target_={__name__}.RecordFlush"))
    assert RecordFlush.seen == [not flush]
    assert subnormal_survives()  # PyTorch's default again


def test_ode_benchmark_times_every_solver_path_against_manual_euler(tmp_path, monkeypatch):
    cases = bench.ode_plan(list(bench.ODE_PATHS), [4, 8], steps=1)
    assert {c["path"] for c in cases} == set(bench.ODE_PATHS) and len(cases) == 2 * 9
    # in-process (a fresh process per case is what the script does; the numbers are the same kind)
    monkeypatch.setattr(bench, "measure", lambda case: {**bench.run_case({**case, "threads": 1}),
                                                        "peak_mb": 100.0 + case["T"]})
    out = tmp_path / "ode.json"
    bench.main(["--ode", "--ode-lengths", "4,8", "--ode-steps", "1", "--out", str(out),
                "--ode-paths", "manual Euler,euler,rk4 adjoint"])
    summary = {(r["path"], r["T"]): r for r in json.loads(out.read_text())["summary"]}
    assert set(summary) == {(p, T) for p in ("manual Euler", "euler", "rk4 adjoint")
                            for T in (4, 8)}
    for (path, T), row in summary.items():
        assert row["s_per_step"] > 0
        manual = summary[("manual Euler", T)]
        assert row["over_manual_euler"] == pytest.approx(row["s_per_step"] / manual["s_per_step"])
        assert row["time_over_shortest"] == pytest.approx(
            row["s_per_step"] / summary[(path, 4)]["s_per_step"])
        assert row["memory_over_shortest"] == pytest.approx((100.0 + T) / 104.0)
        stages = 4 if path == "rk4 adjoint" else 1  # evaluations of g per interval
        assert row["nfe_forward"] == stages * T
        assert row["nfe_backward"] == (stages * T if path == "rk4 adjoint" else 0)


def test_ode_benchmark_names_an_unknown_path(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--ode", "--ode-paths", "euler,leapfrog"])
    assert "--ode-paths: unknown ['leapfrog']" in capsys.readouterr().err


def test_job_times_read_the_jobs_log_and_clock(tmp_path):
    (tmp_path / "train.log").write_text("[2026-12-05 23:46:54,250][rnnlab.sweep][INFO] - x\n")
    from datetime import datetime
    started = datetime(2026, 12, 5, 23, 46, 54, 250000).timestamp()
    (tmp_path / "job_clock.json").write_text(json.dumps(
        {"first_step": started + 1.5, "last_step_end": started + 4.0, "teardown": started + 4.25}))
    times = bench.job_times(tmp_path)
    assert times == pytest.approx({"startup_s": 1.5, "train_s": 2.5, "winddown_s": 0.25})


def test_the_sweep_benchmark_times_every_job_of_a_joblib_sweep():
    result = bench.run_sweep(n_jobs=1, jobs=2, T=5, steps=2, device="cpu")
    assert result["jobs"] == 2 and result["wall_s"] > 0
    assert result["jobs_per_hour"] == pytest.approx(3600 * 2 / result["wall_s"])
    assert 0 < result["startup_s"] < result["wall_s"] and 0 < result["train_s"] < result["wall_s"]
    table, summary = bench.sweep_table([result, {**result, "n_jobs": 2,
                                                 "jobs_per_hour": 1.5 * result["jobs_per_hour"]}],
                                       "t")
    assert [row["speedup"] for row in summary] == pytest.approx([1.0, 1.5])


def test_rounds_of_a_case_combine_into_their_medians_and_a_failure_stays():
    def result(mode, round_, **measured):
        case = {"cell": "gru", "T": 5, "mode": mode, "round": round_}
        return case, {**case, **measured}

    combined = bench.combine_rounds([
        result("raw", 0, steps_per_s=10.0, peak_mb=100.0),
        result("off", 0, steps_per_s=9.0, peak_mb=90.0),
        result("raw", 1, steps_per_s=30.0, peak_mb=300.0),
        result("off", 1, error="exit code 1"),
        result("raw", 2, steps_per_s=20.0, peak_mb=400.0),
    ])
    by_mode = {r["mode"]: r for r in combined}
    assert by_mode["raw"]["steps_per_s"] == 20.0 and by_mode["raw"]["peak_mb"] == 300.0
    assert by_mode["raw"]["rounds"] == 3
    assert by_mode["off"]["error"] == "exit code 1"


def test_the_benchmark_runs_its_cases_in_rounds_and_tables_the_medians(tmp_path, monkeypatch):
    rates = iter([10.0, 8.0, 30.0, 6.0, 20.0, 7.0])  # raw, off alternating over three rounds
    monkeypatch.setattr(bench, "plan", lambda quick, cells, lengths, paired: [
        {"cell": "gru", "T": 5, "mode": m} for m in ("raw", "off")])
    monkeypatch.setattr(bench, "cell_table", lambda cells, results, title: (
        "", [{r["mode"]: r["steps_per_s"] for r in results}]))
    monkeypatch.setattr(bench, "measure", lambda case: {"steps_per_s": next(rates)})
    out = tmp_path / "bench.json"
    bench.main(["--cells", "gru", "--lengths", "5", "--repeats", "3", "--out", str(out)])
    written = json.loads(out.read_text())
    assert written["summary"] == [{"raw": 20.0, "off": 7.0}]
    assert [c["round"] for c in written["cases"]] == [0, 0, 1, 1, 2, 2]


def test_the_jacobian_benchmark_times_both_paths_and_compares_their_norms(capsys):
    bench.main(["--jacobians", "--cells", "gru,cornn", "--lengths", "4", "--repeats", "1"])
    gru, cornn = capsys.readouterr().out.strip().splitlines()
    assert gru.startswith("Jacobian norms, gru") and "own" in gru and "autograd" in gru
    difference = float(re.search(r"largest relative difference (\S+)", gru).group(1))
    assert difference < 1e-5  # float32 rounding: the same norms by two computations
    assert cornn.startswith("Jacobian norms, cornn") and "own" not in cornn  # autograd only


def test_the_memory_benchmark_tables_each_cells_monitored_peak_over_its_unmonitored(tmp_path,
                                                                                   monkeypatch):
    cases = bench.memory_plan(["mingru", "rnn"], [6, 2000])
    assert [(c["cell"], c["T"], c["mode"]) for c in cases[:2]] == [("mingru", 6, "off"),
                                                                   ("mingru", 6, "monitor")]
    assert all(("model.checkpoint_steps=100" in c["monitor_overrides"]) == (c["T"] > 1000)
               for c in cases)
    peaks = {"off": 400.0, "monitor": 500.0}
    # in-process (the script runs each case in a fresh process for its own peak)
    monkeypatch.setattr(bench, "measure", lambda case: {**bench.run_case({**case, "threads": 1}),
                                                        "peak_mb": peaks[case["mode"]]})
    out = tmp_path / "memory.json"
    bench.main(["--memory", "--cells", "mingru,rnn", "--lengths", "6", "--out", str(out)])
    summary = json.loads(out.read_text())["summary"]
    assert [(r["cell"], r["T"]) for r in summary] == [("mingru", 6), ("rnn", 6)]
    for row in summary:
        assert row["monitor_memory_over_off"] == pytest.approx(1.25)
        assert row["s_per_step"]["off"] > 0 and row["s_per_step"]["monitor"] > 0


def test_the_instrument_benchmark_times_each_part_and_composes_a_default_period(capsys,
                                                                                tmp_path):
    row = bench.instrument_costs("gru", 6, repeats=1, device="cpu")
    assert set(row["seconds"]) == set(bench.INSTRUMENT_PARTS)
    assert all(math.isfinite(s) and s > 0 for s in row["seconds"].values())
    assert row == {**row, **bench.period_shares(row["seconds"], 50, 500)}
    bench.main(["--instruments", "--cells", "rnn", "--lengths", "5", "--repeats", "1",
                "--out", str(tmp_path / "out.json")])
    (written,) = json.loads((tmp_path / "out.json").read_text())["instruments"]
    assert written["cell"] == "rnn" and written["T"] == 5
    assert f"{written['predicted_over_off']:.3f}" in capsys.readouterr().out


def test_a_default_periods_shares_add_each_parts_cost_to_the_unmonitored_steps():
    """500 steps of 10 ms; 10 monitored ones each 4 ms longer and 6 ms of contributions after;
    one Jacobian (200 ms) and one spectrum (50 ms): 40 + 60 + 200 + 50 = 350 ms over 5000 ms."""
    seconds = {"unmonitored step": 0.010, "probed step": 0.012,
               "probed step, contributions": 0.014, "contributions": 0.006,
               "Jacobians": 0.200, "Lyapunov": 0.050}
    result = bench.period_shares(seconds, every=50, period=500)
    assert result["period"] == pytest.approx({"probed steps": 0.008, "contributions": 0.012,
                                              "Jacobians": 0.040, "Lyapunov": 0.010})
    assert result["predicted_over_off"] == pytest.approx(1 / 1.07)
