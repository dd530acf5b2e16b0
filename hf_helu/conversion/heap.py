"""The C heap of a calibrating process: freed pages handed back where calibration chooses, and kept otherwise.

glibc serves allocations below its mmap threshold from its heap, and raises that threshold (up to 32 MiB) each time
a larger block is freed, so the megabyte-sized tensors of a calibration soon all come from the heap. Caching the
first block's inputs batch by batch leaves each batch's hidden states between the freed intermediates of the
forward that made them: converting SmolLM2-135M, the process held 350 MB more than its live tensors after that
step (BENCHMARKS.md, "Calibration"). :func:`release_freed_memory` (``malloc_trim``) hands the free pages back, after
the caching and after each layer; calibration also keeps its long-lived tensors where they are (it updates the
hidden states in place), so the transients of the next layer reuse the holes.

Between those points glibc by default also hands back a freed heap top and maps large blocks afresh, and every
page it takes again is faulted in and zeroed by the kernel: 8.5 million faults in one ``hf-helu convert`` of
SmolLM2-135M. :func:`keep_freed_memory`, which the command sets for its own process, turns that off.
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


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
MMAP_THRESHOLD = 32 << 20  # the largest glibc accepts; its adaptive threshold's own ceiling


def keep_freed_memory() -> bool:
    """For a process that calibrates (``hf-helu convert``): blocks below 32 MiB come from the heap from the start,
    and ``free`` never hands pages back to the system, so the next layer's transients reuse the same pages instead
    of faulting in fresh zeroed ones. Only :func:`release_freed_memory` returns pages, where calibration chooses.

    Process-wide and for good (glibc cannot go back to its adaptive thresholds), so the CLI sets it for its own
    process and library calls never do. False where the C library has no ``mallopt`` (nothing changes)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (AttributeError, OSError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
