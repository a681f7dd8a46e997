"""`rnnlab.malloc.tune_malloc`: glibc's malloc set for the process, so that the large buffers a
training step allocates and frees every step come back from the heap instead of as fresh pages
from the kernel (a page fault each on first write); and `train` sets it from its config."""

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

# Page faults over 10 passes after a few of warm-up, in a fresh process with the given mode:
# four blocks of 8 MB from malloc written and freed together (glibc's defaults: the first block
# mapped and freed raises its mapping threshold to 8 MB and its trim threshold to 16 MB, so the
# 32 MB freed at the heap's top go back to the kernel every pass), or a fused LSTM's forward and
# backward (oneDNN's workspace, ~50 MB at T = 100, B = 64, H = 128: above any mapping threshold).
FAULTS = """
import ctypes, resource, sys
from rnnlab.malloc import tune_malloc
mode, case = sys.argv[1:]
holds = tune_malloc(mode)
if case == "blocks":
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    def step():
        blocks = [libc.malloc(8 << 20) for _ in range(4)]
        for block in blocks:
            ctypes.memset(block, 1, 8 << 20)
        for block in blocks:
            libc.free(block)
else:
    import torch
    lstm, x = torch.nn.LSTM(32, 128), torch.randn(100, 64, 32)
    def step():
        lstm(x)[0].sum().backward()
for _ in range(5):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(holds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str, case: str) -> int:
    done = subprocess.run([sys.executable, "-c", FAULTS, mode, case], capture_output=True,
                          text=True, check=True)
    holds, faults = done.stdout.split()[-2:]
    assert holds == "True"
    return int(faults)


@glibc
def test_tuned_thresholds_keep_freed_blocks_in_the_heap():
    # glibc's defaults: 32 MB come back as 8192 fresh pages every pass; tuned, from the heap
    assert page_faults("glibc", "blocks") > 10 * 8000
    assert page_faults("tuned", "blocks") < 100


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="oneDNN's LSTM")
@glibc
def test_heap_keeps_the_fused_lstms_workspace():
    # mapped anew every pass above 32 MB whatever the thresholds: ~8000 faults a pass
    assert page_faults("tuned", "fused_lstm") > 10 * 5000
    assert page_faults("heap", "fused_lstm") < 1000


def test_the_package_exports_it():
    assert rnnlab.tune_malloc is malloc.tune_malloc


def test_elsewhere_than_glibc_nothing_is_set(monkeypatch):
    monkeypatch.setattr(malloc, "_applied", None)
    monkeypatch.setattr(malloc.platform, "libc_ver", lambda: ("", ""))
    monkeypatch.setattr(malloc.ctypes, "CDLL", lambda *a: pytest.fail("libc loaded"))
    assert malloc.tune_malloc() is False
    assert malloc.tune_malloc("glibc") is True  # glibc's (the platform's) own, untouched


class FakeLibc:
    """libc with a ``mallopt`` that records its calls and returns ``result`` (1: accepted)."""

    def __init__(self, result: int = 1):
        self.calls: list[tuple[int, int]] = []

        def mallopt(option: int, value: int) -> int:  # takes ctypes' argtypes/restype too
            self.calls.append((option, value))
            return result

        self.mallopt = mallopt


@pytest.fixture
def libc(monkeypatch) -> FakeLibc:
    fake = FakeLibc()
    monkeypatch.setattr(malloc, "_applied", None)
    monkeypatch.setattr(malloc.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(malloc.ctypes, "CDLL", lambda *a: fake)
    return fake


TUNED = [(malloc.M_MMAP_THRESHOLD, 32 * 2**20), (malloc.M_TRIM_THRESHOLD, 256 * 2**20)]


def test_each_mode_is_set_once_and_heap_stops_mapping(libc):
    assert malloc.tune_malloc() and malloc.tune_malloc("tuned")
    assert libc.calls == [*TUNED, (malloc.M_MMAP_MAX, 65536)]
    assert malloc.tune_malloc("heap")
    assert libc.calls[3:] == [*TUNED, (malloc.M_MMAP_MAX, 0)]
    assert malloc.tune_malloc("tuned")  # mapping again, above 32 MB
    assert libc.calls[6:] == [*TUNED, (malloc.M_MMAP_MAX, 65536)]
    assert malloc.tune_malloc("glibc") is False  # a fixed threshold stays fixed
    assert len(libc.calls) == 9


def test_glibc_mode_sets_nothing(libc):
    assert malloc.tune_malloc("glibc") is True and libc.calls == []


def test_a_refused_setting_leaves_the_mode_unset(monkeypatch, libc, caplog):
    monkeypatch.setattr(malloc.ctypes, "CDLL", lambda *a: FakeLibc(result=0))
    assert malloc.tune_malloc() is False and malloc._applied is None
    assert "mallopt refused" in caplog.text


def test_an_unknown_mode_is_refused(libc):
    with pytest.raises(ValueError, match="one of tuned, heap, glibc"):
        malloc.tune_malloc("jemalloc")
    assert libc.calls == []


@pytest.mark.parametrize("mode", malloc.MODES)
def test_train_sets_the_config_mode(make_cfg, monkeypatch, mode):
    calls = []
    monkeypatch.setattr(rnnlab.train, "tune_malloc", calls.append)
    train(make_cfg(f"malloc={mode}"))
    assert calls == [mode]
