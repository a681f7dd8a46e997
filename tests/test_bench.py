"""The benchmark's cases run (small T), a failing case is recorded instead of ending the run, and
``flush_denormal`` holds for a run only."""

from __future__ import annotations

import json
import math

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
