"""scripts/measure_adjoint_memory.py runs every path and compares its gradient with the discrete
one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "measure_adjoint_memory.py"


def test_every_path_runs_and_segments_of_one_interval_give_the_stepping_adjoint():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--seq-lens", "12", "--batch-size", "4", "--input-size", "3",
         "--hidden-size", "5", "--width", "8", "--segments", "1", "T"],
        capture_output=True, text=True, check=True)
    rows = {}
    for line in result.stdout.splitlines()[2:]:
        name = line[7:52].strip()
        peak, process, seconds, nfe, diff = line[52:].split()
        rows[name] = {"peak": float(peak), "process": float(process), "nfe": nfe,
                      "diff": float(diff)}
    assert list(rows) == ["direct, manual Euler (step)", "direct, odeint per interval (step)",
                          "direct, one odeint (sequence)",
                          "adjoint, odeint_adjoint per interval (step)",
                          "adjoint, whole grid, segments of 1",
                          "adjoint, whole grid, segments of T"]
    assert rows["direct, manual Euler (step)"]["diff"] == 0  # the reference
    for name in ("direct, odeint per interval (step)", "direct, one odeint (sequence)"):
        assert rows[name]["diff"] < 1e-6  # torchdiffeq's euler is manual Euler, in float32
    stepping = rows["adjoint, odeint_adjoint per interval (step)"]
    assert stepping["diff"] > 1e-4  # the continuous ODE's gradient, not the discrete one
    assert rows["adjoint, whole grid, segments of 1"]["diff"] == stepping["diff"]
    assert stepping["nfe"] == "12/12"
    assert all(row["process"] >= row["peak"] >= 0 for row in rows.values())
