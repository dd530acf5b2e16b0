"""Freed memory back to the system after calibration caches its inputs: peak memory is live tensors, not heap holes.

glibc serves allocations below its mmap threshold from its heap, and raises that threshold (up to 32 MiB) each time
a larger block is freed, so the megabyte-sized tensors of a calibration soon all come from the heap. Caching the
first block's inputs batch by batch leaves each batch's hidden states between the freed intermediates of the
forward that made them: converting SmolLM2-135M, the process held 350 MB more than its live tensors after that
step (BENCHMARKS.md, "Calibration"). ``malloc_trim`` hands the free pages back, after the caching and after each
layer; calibration also keeps its long-lived tensors where they are (it updates the hidden states in place), so
the transients of the next layer reuse the holes.
"""

from __future__ import annotations

import ctypes


def release_freed_memory() -> bool:
    """Return the C heap's free pages to the system (glibc ``malloc_trim(0)``); False where the C library has no
    ``malloc_trim`` (musl, macOS, Windows), where nothing happens."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True
