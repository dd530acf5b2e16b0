"""hf-helu convert returns freed tensor memory to the system (hf_helu.cli.heap), checked on glibc's own counters."""

from __future__ import annotations

import ctypes
import subprocess
import sys
import textwrap

import pytest

_PROBE = textwrap.dedent(
    """
    import ctypes, sys
    libc = ctypes.CDLL(None)
    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    if sys.argv[1] == "set":
        from hf_helu.cli.heap import map_large_allocations
        assert map_large_allocations()
    libc.free(libc.malloc(16 << 20))  # freeing a mapped 16 MiB block lifts glibc's dynamic threshold above 2 MiB
    before = libc.mallinfo2().hblks
    block = libc.malloc(2 << 20)
    print(libc.mallinfo2().hblks - before)
    """
)


def _glibc() -> bool:
    try:
        ctypes.CDLL(None).mallinfo2  # noqa: B018
    except AttributeError:
        return False
    return True


@pytest.mark.skipif(not _glibc(), reason="mallopt/mallinfo2 are glibc's")
def test_large_blocks_get_their_own_mapping_after_a_large_one_was_freed():
    """By default glibc serves a 2 MiB block from its heap once a larger block was freed (the threshold rises); after
    map_large_allocations it maps the block on its own, so freeing it returns the memory to the system."""
    mapped = {}
    for mode in ("default", "set"):
        done = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        mapped[mode] = int(done.stdout.split()[-1])
    assert mapped == {"default": 0, "set": 1}
