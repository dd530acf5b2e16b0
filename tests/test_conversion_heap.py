"""Calibration hands freed heap pages back to the system after caching its inputs (hf_helu.conversion.heap),
measured on the resident set of a process that leaves freed blocks between live ones."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap

import pytest

_PROBE = textwrap.dedent(
    """
    import ctypes, sys
    from hf_helu.conversion.heap import release_freed_memory
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.mallopt(-3, 64 << 20)  # M_MMAP_THRESHOLD: blocks below 64 MiB come from the heap, as in a long calibration
    blocks, pinned = [], []
    for _ in range(40):
        blocks.append(libc.malloc(2 << 20))
        ctypes.memset(blocks[-1], 1, 2 << 20)  # resident
        pinned.append(libc.malloc(64 << 10))  # a live block after each: the heap cannot shrink from its top
    for block in blocks:
        libc.free(block)
    def resident():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * 4096
    before = resident()
    if sys.argv[1] == "release":
        assert release_freed_memory()
    print((before - resident()) >> 20)
    """
)


def _glibc() -> bool:
    try:
        ctypes.CDLL(None).malloc_trim  # noqa: B018
    except AttributeError:
        return False
    return True


@pytest.mark.skipif(not _glibc() or not sys.platform.startswith("linux"), reason="malloc_trim is glibc's")
def test_freed_blocks_between_live_ones_go_back_to_the_system():
    """80 MiB freed between small live blocks stay resident by default; release_freed_memory returns them."""
    freed = {}
    for mode in ("keep", "release"):
        done = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        freed[mode] = int(done.stdout.split()[-1])
    assert freed["keep"] == 0 and freed["release"] >= 60, freed


_REUSE_PROBE = textwrap.dedent(
    """
    import ctypes, resource, sys
    from hf_helu.conversion.heap import keep_freed_memory
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    if sys.argv[1] == "keep":
        assert keep_freed_memory()
    def one_layer():  # 40 transients of 2 MiB, written and freed, as a calibrated layer's are
        blocks = [libc.malloc(2 << 20) for _ in range(40)]
        for block in blocks:
            ctypes.memset(block, 1, 2 << 20)
        for block in blocks:
            libc.free(block)
    one_layer()
    one_layer()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    one_layer()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    """
)


@pytest.mark.skipif(not _glibc() or not sys.platform.startswith("linux"), reason="mallopt is glibc's")
def test_kept_freed_memory_is_reused_without_page_faults():
    """By default glibc hands a freed heap top back and the next 80 MiB of transients fault in fresh pages (20,480
    of 4 KiB); after keep_freed_memory (what hf-helu convert sets) they reuse the same pages."""
    faults = {}
    for mode in ("default", "keep"):
        done = subprocess.run([sys.executable, "-c", _REUSE_PROBE, mode], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        faults[mode] = int(done.stdout.split()[-1])
    assert faults["default"] >= 10_000 and faults["keep"] < 1_000, faults
