"""glibc's malloc thresholds for a training process: `tune_malloc`.

glibc serves a block of at least M_MMAP_THRESHOLD bytes (128 KiB at start, raised as mapped
blocks are freed, to 32 MiB at most) with a fresh mapping that it returns to the kernel when the
block is freed, and gives back the heap's free top once it passes M_TRIM_THRESHOLD. Memory the
kernel hands out anew costs a page fault and the zeroing of a 4 KiB page on its first write. A
training step allocates and frees the same large buffers every step (a probed chunk's states,
gates and gradients: C × B × H values, 1.6 MB for 50 steps of B = 64, H = 128), and with the
defaults many of them come back as fresh pages: measured here, a monitored IndRNN backward pass
took 1500–2000 page faults, a GRU's 1536, a tanh RNN's 512, and none once blocks up to 32 MiB
stay in the heap, which keeps 256 MiB free before it shrinks.

Fixed thresholds turn off glibc's own adjustment of them, for the rest of the process; the peak
resident memory is what the step needs either way (`scripts/bench.py --memory`). Elsewhere than
glibc (macOS, musl) nothing changes.
"""

from __future__ import annotations

import ctypes
import logging
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
MMAP_THRESHOLD = 32 * 2**20  # blocks below it come from the heap: glibc's own ceiling (64-bit)
TRIM_THRESHOLD = 256 * 2**20  # free heap kept before it is returned to the kernel

_tuned = False


def tune_malloc() -> bool:
    """Set glibc's M_MMAP_THRESHOLD to 32 MiB and M_TRIM_THRESHOLD to 256 MiB for this process
    (`mallopt`), once. True where they are set (glibc), False elsewhere. `rnnlab.train.train`
    calls it (``tune_malloc: true``, the default); a training script of one's own, monitored
    with `rnnlab.watching`, can call it first thing (``rnnlab.tune_malloc()``)."""
    global _tuned
    if _tuned:
        return True
    if platform.libc_ver()[0] != "glibc":
        return False
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1 or mallopt(M_TRIM_THRESHOLD,
                                                                 TRIM_THRESHOLD) != 1:
        log.warning("mallopt refused rnnlab's thresholds; glibc's defaults stay")
        return False
    _tuned = True
    return True
