"""The benchmark's cases run (small T), and a failing case is recorded instead of ending the run."""

from __future__ import annotations

import math

import pytest

from rnnlab import bench


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
