"""The benchmark's cases run (small T), a failing case is recorded instead of ending the run, and
``flush_denormal`` holds for a run only."""

from __future__ import annotations

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
