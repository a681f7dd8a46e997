"""A logdir of synthetic gradflow runs and a real TensorBoard server over it, for the tab's tests.

The synthetic records are closed forms: a linear orthogonal RNN's ||dL/dz_t|| = gain^(T-1-t)
(times the last step's norm), with a vanished (0) and a non-finite value placed where the tests
can see them, so every number the tab serves can be checked against them.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from rnnlab.tensorboard_plugin import summary


def synthetic_record(step: int, T: int, gain: float) -> dict:
    """A record of a linear orthogonal RNN with ``gain`` at training ``step``: on odd steps
    ||dL/dz_0|| has underflowed to 0; at step 0 ||dL/dW_cell|| is NaN at T // 2 and inf after."""
    t = np.arange(T, dtype=np.float64)
    dL_dz = (1.0 + step / 100) * gain ** (T - 1 - t)
    if step % 2:
        dL_dz[0] = 0.0
    dL_dW = 0.1 * dL_dz
    if step == 0:
        dL_dW[T // 2], dL_dW[T // 2 + 1] = np.nan, np.inf
    decay_rate = np.log10(gain)
    return {"dL_dz": dL_dz, "dL_dW_cell": dL_dW, "step": step, "T": T, "loss": 1.0 / (1 + step),
            "decay_rate": decay_rate, "predicted_decay_rate": decay_rate,
            "log10_first_last": (T - 1) * decay_rate, "horizon": float(T)}


def write_run(run_dir: Path, overrides: list[str], records: dict[int, dict]) -> None:
    """An event file in ``run_dir`` with the run_info and each record (step → record)."""
    writer = SummaryWriter(str(run_dir))
    summary.write(writer, 0, summary.run_info_summary(overrides))
    for step, record in records.items():
        summary.write_record(writer, step, record)
    writer.close()


def sweep(logdir: Path, gains: list[float], steps: list[int], T: int) -> dict[str, dict]:
    """One run per gain, ``<i>_cell.gain=<gain>``; returns run → step → record."""
    runs = {}
    for i, gain in enumerate(gains):
        run = f"{i}_cell.gain={gain}"
        records = {s: synthetic_record(s, T, gain) for s in steps}
        write_run(logdir / run, ["cell=rnn", f"cell.gain={gain}"], records)
        runs[run] = records
    return runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str, **query):
    """GET ``path``: the decoded JSON, or the body's bytes."""
    url = f"http://127.0.0.1:{port}{path}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    with urllib.request.urlopen(url, timeout=60) as response:
        body = response.read()
        return json.loads(body) if "json" in response.headers.get("Content-Type", "") else body


def has_records(count: int, runs: int) -> Callable[[dict], bool]:
    """Whether /runs lists ``runs`` runs whose ``dL_dz`` has ``count`` records: loaded."""
    return lambda body: (len(body["runs"]) == runs and all(
        len(r["tags"].get("dL_dz", {}).get("steps", [])) == count for r in body["runs"]))


@contextmanager
def tensorboard(logdir: Path, *flags: str,
                ready: Callable[[dict], bool] = lambda body: bool(body["runs"])) -> Iterator[int]:
    """A ``tensorboard`` process serving ``logdir``; yields its port once /runs is ``ready``
    (TensorBoard loads event files in the background, a run at a time)."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1",
         "--port", str(port), "--reload_interval=1", *flags],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):  # the server starts, then loads the events (seconds on 2 cores)
            try:
                if ready(get(port, "/data/plugin/gradflow/runs")):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError(f"tensorboard did not serve the gradflow runs of {logdir} in 120 s")
        yield port
    finally:
        server.terminate()
        server.wait(timeout=30)
