"""Freed tensor memory goes back to the system: a conversion's peak memory is its live tensors, not a fragmented heap.

glibc serves allocations below its mmap threshold from its heap, and raises that threshold (up to 32 MiB) each time
a larger block is freed, so the megabyte-sized tensors of a calibration soon all come from the heap, where a few
long-lived ones (the cached hidden states of every batch) pin the freed space between them. Converting
SmolLM2-135M, the process grew by 350 MB of freed memory while caching its calibration inputs alone (BENCHMARKS.md,
"Calibration"). A fixed threshold maps every larger block on its own and returns it to the system when freed.
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
LARGE_ALLOCATION = 1 << 20  # bytes: blocks of at least this size get their own mapping


def map_large_allocations(threshold: int = LARGE_ALLOCATION) -> bool:
    """Serve allocations of at least ``threshold`` bytes by their own mapping for the rest of the process (glibc's
    ``mallopt(M_MMAP_THRESHOLD)``, which also stops the threshold from rising); False where the C library has no
    ``mallopt`` (musl, macOS, Windows), where nothing changes."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, threshold) == 1
