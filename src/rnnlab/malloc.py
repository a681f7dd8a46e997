"""glibc's malloc settings for a training process: `tune_malloc`.

glibc serves a block of at least M_MMAP_THRESHOLD bytes (128 KiB at start, raised as mapped
blocks are freed, to 32 MiB at most) with a fresh mapping that it returns to the kernel when the
block is freed, and gives back the heap's free top once it passes M_TRIM_THRESHOLD. Memory the
kernel hands out anew costs a page fault and the zeroing of a 4 KiB page on its first write. A
training step allocates and frees the same large buffers every step (a probed chunk's states,
gates and gradients: C × B × H values, 1.6 MB for 50 steps of B = 64, H = 128), and with the
defaults many of them come back as fresh pages: measured here, a monitored IndRNN backward pass
took 1500–2000 page faults, a GRU's 1536, a tanh RNN's 512, and none once blocks up to 32 MiB
stay in the heap, which keeps 256 MiB free before it shrinks (``tuned``); the peak resident
memory moved within a run's spread (`scripts/bench.py --memory`, T = 1000 and 10,000).

A block above 32 MiB is always mapped anew unless mapping is turned off altogether (``heap``):
oneDNN's LSTM kernel takes a workspace of ~50 MB at T = 100 (B = 64, H = 128) every step, 8,000
page faults a forward and backward pass, which then stay in the heap too. The price is memory:
a freed block in the middle of the heap stays resident until a request fits it.

Fixed thresholds turn off glibc's own adjustment of them, for the rest of the process. Elsewhere
than glibc (macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # <malloc.h>
MMAP_THRESHOLD = 32 * 2**20  # blocks below it come from the heap: glibc's own ceiling (64-bit)
TRIM_THRESHOLD = 256 * 2**20  # free heap kept before it is returned to the kernel
MMAP_MAX = 65536  # glibc's default number of mapped blocks; 0: none (``heap``)
MODES = ("tuned", "heap", "glibc")

_applied: str | None = None  # the mode set in this process


def tune_malloc(mode: str = "tuned") -> bool:
    """Set glibc's malloc for this process (`mallopt`): ``tuned`` M_MMAP_THRESHOLD 32 MiB and
    M_TRIM_THRESHOLD 256 MiB; ``heap`` those and no mapped blocks at all (M_MMAP_MAX 0);
    ``glibc`` nothing (glibc's defaults, where nothing was set before: a fixed threshold cannot
    return to glibc's adaptive one). True where the mode holds.

    `rnnlab.train.train` calls it with the config's ``malloc``; a training script of one's own,
    monitored with `rnnlab.watching`, can call it first thing (``rnnlab.tune_malloc()``)."""
    global _applied
    if mode not in MODES:
        raise ValueError(f"malloc mode {mode!r}: one of {', '.join(MODES)}")
    if mode == _applied:
        return True
    if mode == "glibc":  # holds only where nothing was set
        return _applied is None
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((M_MMAP_THRESHOLD, MMAP_THRESHOLD), (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                (M_MMAP_MAX, 0 if mode == "heap" else MMAP_MAX))
    if not all(mallopt(option, value) == 1 for option, value in settings):
        log.warning("mallopt refused rnnlab's malloc settings (%s); glibc's stay", mode)
        return False
    _applied = mode
    return True
