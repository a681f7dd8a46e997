"""`rnnlab.malloc.tune_malloc`: glibc's malloc thresholds set for the process, so that the large
buffers a probed step allocates and frees every step come back from the heap instead of as fresh
pages from the kernel (a page fault each on first write); and `train` sets them from its config."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

import rnnlab
import rnnlab.train
from rnnlab import malloc
from rnnlab.train import train

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")

# Page faults over 20 probed IndRNN steps (forward, backward, profile) after 5 of warm-up.
FAULTS = """
import resource, sys, warnings
warnings.filterwarnings("ignore")
from rnnlab import bench
from rnnlab.malloc import tune_malloc
from rnnlab.probing import ProbeRequest
tuned = tune_malloc() if sys.argv[1] == "tuned" else False
model, x, y = bench.instrument_case("indrnn", 100, "cpu")
model.hparams.fast_path = "auto"
def step():
    model.zero_grad(set_to_none=True)
    with model.probing(ProbeRequest()) as passes:
        loss = model.loss_fn(model(x), y)
    loss.backward()
    passes[0].profiles()
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    step()
print(tuned, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> tuple[str, int]:
    done = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True,
                          check=True)
    tuned, faults = done.stdout.split()[-2:]
    return tuned, int(faults)


@glibc
def test_tuned_thresholds_keep_a_probed_steps_buffers_in_the_heap():
    default_tuned, default = page_faults("default")
    tuned, faults = page_faults("tuned")
    assert (default_tuned, tuned) == ("False", "True")
    # glibc's defaults: ~1600 faults a step here (its buffers of 1.6 MB returned and mapped
    # anew); tuned: ~90
    assert default > 5000
    assert faults * 4 < default


def test_the_package_exports_it():
    assert rnnlab.tune_malloc is malloc.tune_malloc


def test_elsewhere_than_glibc_nothing_is_set(monkeypatch):
    monkeypatch.setattr(malloc, "_tuned", False)
    monkeypatch.setattr(malloc.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(malloc.ctypes, "CDLL", lambda *a: pytest.fail("libc loaded"))
    assert malloc.tune_malloc() is False


class FakeLibc:
    """libc with a ``mallopt`` that records its calls and returns ``result`` (1: accepted)."""

    def __init__(self, result: int = 1):
        self.calls: list[tuple[int, int]] = []
        libc = self

        class Mallopt:  # a function object: ctypes' argtypes/restype can be set on it
            def __call__(self, option: int, value: int) -> int:
                libc.calls.append((option, value))
                return result

        self.mallopt = Mallopt()


@glibc
def test_thresholds_are_set_once(monkeypatch):
    libc = FakeLibc()
    monkeypatch.setattr(malloc, "_tuned", False)
    monkeypatch.setattr(malloc.ctypes, "CDLL", lambda *a: libc)
    assert malloc.tune_malloc() and malloc.tune_malloc()
    assert libc.calls == [(malloc.M_MMAP_THRESHOLD, 32 * 2**20),
                          (malloc.M_TRIM_THRESHOLD, 256 * 2**20)]


@glibc
def test_a_refused_threshold_leaves_the_process_untuned(monkeypatch, caplog):
    libc = FakeLibc(result=0)
    monkeypatch.setattr(malloc, "_tuned", False)
    monkeypatch.setattr(malloc.ctypes, "CDLL", lambda *a: libc)
    assert malloc.tune_malloc() is False and not malloc._tuned
    assert "mallopt refused" in caplog.text


@pytest.mark.parametrize("tune", [True, False])
def test_train_sets_the_thresholds_from_its_config(make_cfg, monkeypatch, tune):
    calls = []
    monkeypatch.setattr(rnnlab.train, "tune_malloc", lambda: calls.append(True))
    train(make_cfg(f"tune_malloc={str(tune).lower()}"))
    assert calls == ([True] if tune else [])
