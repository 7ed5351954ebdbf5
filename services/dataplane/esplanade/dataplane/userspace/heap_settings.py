"""glibc heap settings for a worker process: batch buffers stay mapped.

The compiled datapath reuses its batch buffers (bytearrays of 0.1-4 MiB) from wake-up to
wake-up, but the batch functions trim each output to what it holds, and the next wake-up grows
it again. With glibc's defaults a block above the mmap threshold (128 KiB) lives in its own
mapping: every trim and regrowth is an mremap, and the regrown pages fault in zeroed (perf: 4-5 %
of the encrypting worker's CPU in page faults, page clearing and unmapping). Raising the mmap
threshold to its maximum (32 MiB on 64-bit) and the trim threshold well above it keeps those
blocks in the heap, whose pages stay mapped: a trim splits a chunk, a regrowth takes it back.

The price is that a worker keeps the heap high-water mark of its largest wake-up (a few tens
of MiB at most: the buffers are bounded by the batch limits).
"""

from __future__ import annotations

import ctypes
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_THRESHOLD = 256 << 20


def keep_batch_buffers_mapped() -> bool:
    """Apply the settings above (glibc only); False when the C library has no mallopt."""
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    ok = bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not ok:
        log.info("mallopt refused the batch-buffer heap settings; keeping glibc's defaults")
    return ok
