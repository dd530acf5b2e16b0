"""The "c" backend's loader (hf_helu.ops.cpu): the C source as package data, the build cache, the fallbacks
when there is no compiler or no OpenMP, the thread split, and the kernels' bits against references."""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ops_helpers import ALPHA, bits_of, sample, skip_if_unavailable

from hf_helu import helu, ops
from hf_helu.ops import cpu


def test_c_source_is_package_data_and_keys_the_cache(monkeypatch):
    packaged = importlib.resources.files("hf_helu.ops").joinpath(cpu.SOURCE_FILE)
    assert packaged.is_file() and cpu.source() == packaged.read_text(encoding="utf-8")
    assert "void helu_forward_f32(" in cpu.source()
    path, text = cpu.library_path("cc", ()), cpu.source()
    monkeypatch.setattr(cpu, "source", lambda: text + "\n/* edited */\n")
    assert cpu.library_path("cc", ()) != path  # an edit to the C text builds a new library


def test_c_mask_bits_agree_with_numpy_packbits():
    skip_if_unavailable("c")
    x = sample((5, 13), torch.float32, 7)  # 65 elements: the last byte is part padding, which stays 0
    expected = np.packbits(~(x.numpy() <= np.float32(-ALPHA)), bitorder="little")
    _, c_bits = ops.forward("c", x, ALPHA)
    np.testing.assert_array_equal(c_bits.numpy(), expected)


def test_missing_compiler_disables_c_backend_with_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu, "_library", None)
    monkeypatch.setattr(cpu, "_failure", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv(cpu.CACHE_ENV_VAR, str(tmp_path / "cache"))
    x = torch.randn(4, requires_grad=True)
    assert not cpu.available()
    assert ops.resolve(x) == "torch"  # auto falls back
    with pytest.raises(ValueError, match=r"'c' does not support .* no C compiler found"):
        helu(x, backend="c")


def test_c_kernels_build_once_into_the_cache(monkeypatch, tmp_path):
    if cpu._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(cpu, "_library", None)
    monkeypatch.setattr(cpu, "_failure", None)
    monkeypatch.setenv(cpu.CACHE_ENV_VAR, str(tmp_path))
    cpu.load()
    built = list(tmp_path.iterdir())
    assert sorted(p.suffix for p in built) == [".sha256", ".so"]  # the library and its checksum: no temp folder
    built = [p for p in built if p.suffix == ".so"]
    assert cpu.verify(built[0]) is None
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu, "_library", None)
    cpu.load()
    assert built[0].stat().st_mtime_ns == stamp  # loaded from the cache, not rebuilt


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_c_kernels_split_across_threads_match_one_thread(dtype):
    """Large inputs run in chunks on several threads; chunk edges (odd sizes) must not change a bit."""
    skip_if_unavailable("c")
    n = 4 * cpu.GRAIN + 13  # not a multiple of 8: the last chunk ends mid-byte
    x = sample((n,), dtype, seed=7).requires_grad_(True)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(8)).to(dtype)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            y = helu(x, ALPHA, backend="c")
            (dx,) = torch.autograd.grad(y, x, grad)
            results.append((bits_of(y), bits_of(dx)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert torch.equal(results[1][0], bits_of(torch.relu(x.detach())))
    assert torch.equal(dx, grad * (x.detach() > -ALPHA))


def test_c_kernels_split_by_grain_and_thread_count():
    """Each thread gets at least GRAIN elements; never more threads than torch allows."""
    skip_if_unavailable("c")
    if not cpu.parallel():
        assert cpu.team_size(100 * cpu.GRAIN, 4) == 1  # built without OpenMP: one thread
        pytest.skip("C kernels built without OpenMP")
    grain = cpu.GRAIN
    assert cpu.team_size(2 * grain - 1, 8) == 1
    assert cpu.team_size(2 * grain, 8) == 2
    assert cpu.team_size(4 * grain + 13, 3) == 3
    assert cpu.team_size(100 * grain, 1) == 1


def test_c_kernels_without_openmp_fall_back_to_one_thread(monkeypatch, tmp_path):
    """A compiler without OpenMP support still gives working (single-threaded) kernels."""
    if cpu._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(cpu, "_library", None)
    monkeypatch.setattr(cpu, "_failure", None)
    monkeypatch.setattr(cpu, "_parallel", cpu._parallel)
    monkeypatch.setattr(cpu, "_VARIANTS", (("-fno-such-flag-for-helu",), ()))
    monkeypatch.setenv(cpu.CACHE_ENV_VAR, str(tmp_path))
    assert cpu.available() and not cpu.parallel()
    assert cpu.team_size(100 * cpu.GRAIN, 4) == 1
    x = torch.randn(3 * cpu.GRAIN + 5, requires_grad=True)
    grad = torch.randn_like(x)
    (dx,) = torch.autograd.grad(helu(x, ALPHA, backend="c"), x, grad)
    assert torch.equal(dx, grad * (x.detach() > -ALPHA))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_c_16bit_forward_matches_relu_on_every_bit_pattern(dtype):
    """The C kernels compute 16-bit relu on raw bits; check all 65536 patterns (NaN-free, then with NaNs)."""
    skip_if_unavailable("c")
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    no_nan = every[~every.isnan()]
    for x in (no_nan, no_nan[:-3], every):  # the vector loop, a scalar tail, the NaN fallback
        x = x.clone().requires_grad_(True)
        grad = torch.ones_like(x)
        y = helu(x, ALPHA, backend="c")
        (dx,) = torch.autograd.grad(y, x, grad)
        assert torch.equal(bits_of(y), bits_of(torch.relu(x.detach())))
        assert torch.equal(dx, (~(x.detach().float() <= float(torch.tensor(-ALPHA, dtype=dtype)))).to(dtype))


# --- a damaged or unwritable kernel cache never kills a process nor silently slows it ----------------------------

_RUN_HELU = """
import torch, hf_helu
from hf_helu import ops
from hf_helu.ops import cpu
x = torch.randn(4099, requires_grad=True)
hf_helu.helu(x, 0.05).sum().backward()
assert torch.equal(x.grad, (x.detach() > -0.05).float())
print("BACKEND", ops.resolve(x), "PARALLEL", cpu.parallel())
"""


def _run_helu(cache: Path, tmp: Path) -> subprocess.CompletedProcess:
    """One grad-enabled HeLU call in a fresh process using the kernel cache ``cache`` (temp files under ``tmp``)."""
    env = {k: v for k, v in os.environ.items() if k not in (ops.ENV_VAR, "CC")}
    env.update({cpu.CACHE_ENV_VAR: str(cache), "TMPDIR": str(tmp), "PYTHONWARNINGS": "default"})
    tmp.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, "-c", _RUN_HELU], env=env, capture_output=True, text=True, timeout=300)


def _warnings(done: subprocess.CompletedProcess) -> list[str]:
    return [line for line in done.stderr.splitlines() if "RuntimeWarning: HeLU CPU kernels" in line]


@pytest.fixture(scope="module")
def clean_cache(tmp_path_factory) -> tuple[Path, str]:
    """A kernel cache built by a fresh process, and what that process printed (the backend, whether parallel)."""
    if cpu._compiler() is None:
        pytest.skip("no C compiler")
    root = tmp_path_factory.mktemp("kernel_cache")
    done = _run_helu(root / "cache", root / "tmp")
    assert done.returncode == 0 and not _warnings(done), done.stderr[-3000:]
    assert "BACKEND c" in done.stdout
    return root / "cache", done.stdout.strip()


def _foreign_library(path: Path) -> None:
    source = path.with_suffix(".foreign.c")
    source.write_text("int not_helu(void) { return 1; }\n")
    subprocess.run([cpu._compiler(), "-shared", "-fPIC", "-o", str(path), str(source)], check=True)
    source.unlink()


DAMAGE = {
    "truncated": lambda path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),  # SIGBUS before
    "foreign": _foreign_library,  # AttributeError: undefined symbol before
    "random_bytes": lambda path: path.write_bytes(os.urandom(path.stat().st_size)),  # silent downgrade before
    "no_checksum": lambda path: cpu.checksum_path(path).unlink(),  # a library of unknown origin
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_cached_library_is_rebuilt_with_one_warning(damage, clean_cache, tmp_path):
    source_cache, clean_output = clean_cache
    cache = tmp_path / "cache"
    shutil.copytree(source_cache, cache)
    libraries = sorted(cache.glob("*.so"))
    assert libraries, list(cache.iterdir())
    for library in libraries:
        DAMAGE[damage](library)
    done = _run_helu(cache, tmp_path / "tmp")
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    assert done.stdout.strip() == clean_output  # the same fused, parallel kernels as a clean cache gives
    warned = _warnings(done)
    assert len(warned) == 1, done.stderr[-3000:]
    assert str(libraries[0]) in warned[0] and "failed verification" in warned[0]
    assert all(cpu.verify(library) is None for library in libraries)  # rebuilt in place, checksum beside it
    again = _run_helu(cache, tmp_path / "tmp")
    assert again.returncode == 0 and not _warnings(again), again.stderr[-3000:]  # repaired for good


@pytest.mark.slow
def test_foreign_library_with_a_matching_checksum_is_rebuilt_with_one_warning(clean_cache, tmp_path):
    source_cache, clean_output = clean_cache
    cache = tmp_path / "cache"
    shutil.copytree(source_cache, cache)
    libraries = sorted(cache.glob("*.so"))
    for library in libraries:  # a foreign library whose checksum was written beside it: verification passes
        _foreign_library(library)
        cpu.checksum_path(library).write_text(hashlib.sha256(library.read_bytes()).hexdigest() + "\n")
        assert cpu.verify(library) is None
    done = _run_helu(cache, tmp_path / "tmp")
    assert done.returncode == 0, (done.returncode, done.stderr[-3000:])
    assert done.stdout.strip() == clean_output  # the OpenMP build, not silently the one-thread one
    warned = _warnings(done)
    assert len(warned) == 1 and str(libraries[0]) in warned[0] and "no HeLU kernel library" in warned[0], done.stderr
    again = _run_helu(cache, tmp_path / "tmp")  # rebuilt in place: the next process loads it quietly
    assert again.returncode == 0 and again.stdout.strip() == clean_output and not _warnings(again), again.stderr


@pytest.mark.slow
def test_unwritable_cache_builds_privately_with_one_warning(clean_cache, tmp_path):
    _, clean_output = clean_cache
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the cache folder's parent should be\n")
    done = _run_helu(blocker / "cache", tmp_path / "tmp")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == clean_output  # not the slower torch backend
    warned = _warnings(done)
    assert len(warned) == 1 and str(blocker / "cache") in warned[0] and "temporary folder" in warned[0], done.stderr
    assert list((tmp_path / "tmp").iterdir()) == []  # the private build folder is gone


def test_verify_names_what_is_wrong(tmp_path):
    library = tmp_path / "lib.so"
    assert "no checksum file lib.so.sha256" in cpu.verify(library)
    library.write_bytes(b"abc")
    cpu.checksum_path(library).write_text(hashlib.sha256(b"abc").hexdigest() + "\n")
    assert cpu.verify(library) is None
    library.write_bytes(b"abd")
    assert "do not match the checksum" in cpu.verify(library)
