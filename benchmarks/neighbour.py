"""A busy neighbour for benchmarks: another process running a 2-thread torch matmul loop beside the measurement.

A user's machine is rarely idle (DataLoader workers, a tokenizer server, another model), and a kernel that wins
idle can lose beside another torch job; ``with load("torch2"): ...`` measures that case, ``load("idle")`` not.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator

LOADS = {"idle": "idle", "torch2": "beside a 2-thread torch matmul loop"}
NEIGHBOUR = "import torch\ntorch.set_num_threads(2)\na = torch.randn(1024, 1024)\nwhile True:\n    a @ a\n"


@contextlib.contextmanager
def load(kind: str) -> Iterator[None]:
    """Run the body idle or beside another process looping a 2-thread torch matmul (started, warmed, then killed)."""
    if kind not in LOADS:
        raise ValueError(f"load must be one of {list(LOADS)}, got {kind!r}")
    if kind == "idle":
        yield
        return
    neighbour = subprocess.Popen([sys.executable, "-c", NEIGHBOUR])
    try:
        time.sleep(4.0)  # torch imported and the loop running
        if neighbour.poll() is not None:
            raise RuntimeError(f"the neighbour process exited with {neighbour.returncode}")
        yield
    finally:
        neighbour.kill()
        neighbour.wait()
