"""The benchmark scripts' code paths, run on CPU with tiny sizes (their figures live in BENCHMARKS.md)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import REPO, load_script

from hf_helu import ops
from hf_helu.ops import cpu


def _load(name: str):
    return load_script(REPO / "benchmarks" / f"{name}.py", f"_bench_{name}")


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_gpu_check_smoke_runs_every_section(capsys, keep_threads):
    assert _load("gpu_check").main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "kernel correctness: OK (bit for bit)" in out
    for name in ("relu", "gelu", "helu_saves_input", f"hf_helu[{ops.resolve(torch.ones(1))}]"):
        assert f"| {name} |" in out
    for seq in (16, 32):
        for name in ("relu", "gelu", "helu_saves_input", "hf_helu"):
            assert f"| {seq} | {name} |" in out


def test_gpu_check_catches_a_wrong_kernel(monkeypatch):
    gpu_check = _load("gpu_check")
    backend = ops.BACKENDS[ops.resolve(torch.ones(1))]

    def off_by_one(grad, mask, shape):
        out = backend.backward(grad, mask, shape)
        out.view(-1)[:1] += 1
        return out

    monkeypatch.setitem(ops.BACKENDS, backend.name, dataclasses.replace(backend, backward=off_by_one))
    failures = gpu_check.check_kernels(torch.device("cpu"))
    assert failures and all("gradient differs" in failure for failure in failures)


def test_act_micro_reports_saved_bytes(capsys):
    _load("act_micro").main(["--sizes", "16x24", "--reps", "3", "--warmup", "1", "--device", "cpu"])
    rows = {line.split("|")[1].strip(): line.split("|") for line in capsys.readouterr().out.splitlines() if "|" in line}
    assert float(rows["relu"][5]) == 0  # relu keeps only its output, which the next layer holds anyway
    assert float(rows["helu_saves_input"][5]) == 4  # the float32 input
    assert float(rows["hf_helu[torch]"][5]) == 1  # a bool mask
    if cpu.available():
        assert float(rows["hf_helu[c]"][5]) == 0.125  # one bit per element
