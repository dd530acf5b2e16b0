"""The benchmark scripts' code paths, run on CPU with tiny sizes (their figures live in BENCHMARKS.md)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from hf_helu import backends

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_gpu_check_smoke_runs_every_section(capsys, keep_threads):
    assert _load("gpu_check").main(["--smoke"]) == 0
    out = capsys.readouterr().out
    assert "kernel correctness: OK (bit for bit)" in out
    for name in ("relu", "gelu", "helu_saves_input", f"hf_helu[{backends.resolve(torch.ones(1))}]"):
        assert f"| {name} |" in out
    for seq in (16, 32):
        for name in ("relu", "gelu", "helu_saves_input", "hf_helu"):
            assert f"| {seq} | {name} |" in out


def test_gpu_check_catches_a_wrong_kernel(monkeypatch):
    gpu_check = _load("gpu_check")
    name = backends.resolve(torch.ones(1))
    forward, backward, supports = backends.BACKENDS[name]

    def off_by_one(grad, mask, shape):
        out = backward(grad, mask, shape)
        out.view(-1)[:1] += 1
        return out

    monkeypatch.setitem(backends.BACKENDS, name, (forward, off_by_one, supports))
    failures = gpu_check.check_kernels(torch.device("cpu"))
    assert failures and all("gradient differs" in failure for failure in failures)


def test_act_micro_reports_saved_bytes(capsys):
    _load("act_micro").main(["--sizes", "16x24", "--reps", "3", "--warmup", "1", "--device", "cpu"])
    rows = {line.split("|")[1].strip(): line.split("|") for line in capsys.readouterr().out.splitlines() if "|" in line}
    assert float(rows["relu"][5]) == 0  # relu keeps only its output, which the next layer holds anyway
    assert float(rows["helu_saves_input"][5]) == 4  # the float32 input
    assert float(rows["hf_helu[torch]"][5]) == 1  # a bool mask
    assert float(rows["hf_helu[numpy]"][5]) == 0.125  # one bit per element
