"""scripts/measure_prediction.py trains, measures and prints the prediction's error per length."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "measure_prediction.py"


def test_prints_measured_and_predicted_rates_and_their_errors():
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--cells", "rnn", "--steps", "20", "--hidden-size", "8",
         "--eval-lens", "30", "40", "--seeds", "1"], capture_output=True, text=True, check=True)
    header, *lines = result.stdout.splitlines()
    assert header.split() == ["cell", "T", "seed", "measured", "predicted", "error", "lambda_1",
                              "error"]
    assert [line.split()[:3] for line in lines] == [["rnn", "30", "1"], ["rnn", "40", "1"]]
    for line in lines:
        measured, predicted, error, lambda_1, lambda_error = line.split()[3:]
        measured, predicted, lambda_1 = float(measured), float(predicted), float(lambda_1)
        assert float(error.rstrip("%")) == pytest.approx(100 * (predicted / measured - 1),
                                                         abs=0.05)
        assert float(lambda_error.rstrip("%")) == pytest.approx(
            100 * (lambda_1 / measured - 1), abs=0.05)
        # an untrained-ish tanh RNN's top exponent is well separated: the prediction holds
        assert measured < 0 and predicted == pytest.approx(measured, rel=0.05)
