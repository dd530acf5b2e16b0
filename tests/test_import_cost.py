"""``import hf_helu`` stays light: torch.compile's frontend (torch._dynamo) and triton load only when used."""

import subprocess
import sys

import torch


def test_import_hf_helu_loads_neither_dynamo_nor_triton():
    code = "import sys, hf_helu; print(sorted(m for m in ('torch._dynamo', 'triton') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_threshold_is_still_a_compile_time_constant():
    """What torch.compiler.assume_constant_result marks, so torch.compile still bakes the value in."""
    from hf_helu.ops import threshold

    marked = torch.compiler.assume_constant_result(lambda: 0.0)
    assert getattr(threshold, "_dynamo_marked_constant", None) is marked._dynamo_marked_constant
    assert threshold(0.05, torch.float32) == torch.tensor(-0.05).item()
