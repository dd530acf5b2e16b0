"""Every HeLU kernel backend against references written independently of hf_helu."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from hf_helu import backends, cpu_kernels, helu

ALPHA = 0.05
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
CPU_BACKENDS = ["torch", "numpy", "c"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Integer view of a float tensor, to compare bit for bit (-0.0 vs 0.0, NaN payloads)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _skip_unsupported(backend: str, dtype: torch.dtype) -> None:
    if backend == "c" and not cpu_kernels.available():
        pytest.skip(f"no C compiler: {cpu_kernels._failure}")


def _sample(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Values around both kinks (0 and -alpha), plus -alpha and 0 exactly where there is room."""
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen) * 0.1).to(dtype)
    flat = x.view(-1)
    if flat.numel() >= 4:
        flat[:4] = torch.tensor([-ALPHA, 0.0, -0.0, ALPHA]).to(dtype)
    return x


SHAPES = [(0,), (), (1,), (7,), (3, 5), (17, 33), (2, 3, 129)]
# NumPy has no bfloat16: that pair is covered by test_forced_backend_that_cannot_run_raises.
BACKEND_DTYPES = [
    pytest.param(backend, dtype, id=f"{backend}-{str(dtype).removeprefix('torch.')}")
    for backend in CPU_BACKENDS
    for dtype in DTYPES
    if not (backend == "numpy" and dtype == torch.bfloat16)
]


@pytest.mark.parametrize(("backend", "dtype"), BACKEND_DTYPES)
def test_forward_and_gradient_match_reference(backend, dtype):
    _skip_unsupported(backend, dtype)
    for seed, shape in enumerate(SHAPES):
        x = _sample(shape, dtype, seed).requires_grad_(True)
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(100 + seed)).to(dtype)
        y = helu(x, ALPHA, backend=backend)
        (dx,) = torch.autograd.grad(y, x, grad)
        expected_y = torch.relu(x.detach())
        assert y.dtype == dtype and y.shape == x.shape
        assert torch.equal(_bits(y), _bits(expected_y)), (backend, dtype, shape)
        assert torch.equal(dx, grad * (x.detach() > -ALPHA)), (backend, dtype, shape)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_input_and_grad(backend):
    _skip_unsupported(backend, torch.float32)
    base = _sample((33, 18), torch.float32, 0)
    x = base.t()[::2].requires_grad_(True)  # transposed and strided
    grad = torch.randn(x.shape[1], generator=torch.Generator().manual_seed(1)).expand(x.shape)  # stride 0
    assert not x.is_contiguous() and not grad.is_contiguous()
    y = helu(x, ALPHA, backend=backend)
    (dx,) = torch.autograd.grad(y, x, grad)
    assert torch.equal(y, torch.relu(x.detach()))
    assert torch.equal(dx, grad * (x.detach() > -ALPHA))


@pytest.mark.parametrize(("backend", "dtype"), BACKEND_DTYPES)
def test_alpha_zero_is_relu_bit_for_bit(backend, dtype):
    _skip_unsupported(backend, dtype)
    x = _sample((9, 37), dtype, 3)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    grad.view(-1)[:3] = torch.tensor([float("inf"), float("-inf"), -1.0]).to(dtype)  # ReLU zeroes these if blocked
    x.view(-1)[:3] = torch.tensor([-1.0, -2.0, -0.5]).to(dtype)
    ours, relu_in = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (dx,) = torch.autograd.grad(helu(ours, 0.0, backend=backend), ours, grad)
    (expected,) = torch.autograd.grad(torch.relu(relu_in), relu_in, grad)
    assert torch.equal(_bits(dx), _bits(expected))


@pytest.mark.parametrize(("backend", "dtype"), BACKEND_DTYPES)
def test_nan_and_inf_behave_like_relu(backend, dtype):
    _skip_unsupported(backend, dtype)
    special = torch.tensor([float("nan"), float("inf"), float("-inf"), -float("nan"), 1.0, -1.0, -0.01, -0.1] * 3)
    x = special.to(dtype).requires_grad_(True)
    relu_in = special.to(dtype).requires_grad_(True)
    grad = torch.arange(1.0, x.numel() + 1).to(dtype)
    y = helu(x, ALPHA, backend=backend)
    expected_y = torch.relu(relu_in)
    assert torch.equal(y.isnan(), expected_y.isnan())
    assert torch.equal(torch.nan_to_num(y.detach()), torch.nan_to_num(expected_y.detach()))
    (dx,) = torch.autograd.grad(y, x, grad)
    (relu_dx,) = torch.autograd.grad(expected_y, relu_in, grad)
    non_finite = ~torch.isfinite(special)
    assert torch.equal(dx[non_finite], relu_dx[non_finite])  # NaN and +inf pass, -inf is blocked
    assert torch.equal(dx, grad * ((special > -ALPHA) | special.isnan()).to(dtype))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_graph_saves_no_float_tensor(backend):
    _skip_unsupported(backend, torch.float32)
    x = torch.randn(64, 37, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = helu(x, ALPHA, backend=backend)
    assert saved, "the HeLU node saved nothing: its backward could not know the mask"
    assert all(not t.is_floating_point() for t in saved), [t.dtype for t in saved]
    assert all(t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() for t in saved)
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    limit = x.numel() if backend == "torch" else -(-x.numel() // 8)  # bool mask, or 1 bit per element
    assert saved_bytes <= limit
    assert all(not t.is_floating_point() for t in y.grad_fn.saved_tensors)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64_away_from_kinks(backend):
    _skip_unsupported(backend, torch.float64)
    x = torch.linspace(-1.0, 1.0, 41, dtype=torch.float64)
    x = x[((x.abs() > 1e-3) & ((x + ALPHA).abs() > 1e-3))].reshape(-1, 1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: helu(t, ALPHA, backend=backend), (x,), eps=1e-6, atol=1e-8)


def test_compile_fullgraph_matches_eager():
    # aot_eager traces what Inductor would see (no graph break allowed) without the C++ build time.
    def model(x, w):
        return helu(x @ w, ALPHA).sum(dim=-1)

    gen = torch.Generator().manual_seed(0)
    w = (torch.randn(8, 16, generator=gen) * 0.3).requires_grad_(True)
    x = torch.randn(5, 8, generator=gen)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x, w)
    (dw,) = torch.autograd.grad(out.sum(), w)
    expected = model(x, w)
    (expected_dw,) = torch.autograd.grad(expected.sum(), w)
    assert torch.equal(out, expected)
    assert torch.equal(dw, expected_dw)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_checkpoint_gives_same_gradients(backend):
    _skip_unsupported(backend, torch.float32)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(12, 12, generator=gen, requires_grad=True)
    x = torch.randn(6, 12, generator=gen)

    def block(t):
        return helu(t @ w, ALPHA, backend=backend) @ w

    (plain,) = torch.autograd.grad(block(x).square().sum(), w)
    (ckpt,) = torch.autograd.grad(checkpoint(block, x, use_reentrant=False).square().sum(), w)
    assert torch.equal(plain, ckpt)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_deterministic(backend):
    _skip_unsupported(backend, torch.float32)
    x = _sample((31, 29), torch.float32, 5).requires_grad_(True)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    runs = [torch.autograd.grad(helu(x, ALPHA, backend=backend), x, grad)[0] for _ in range(2)]
    assert torch.equal(_bits(runs[0]), _bits(runs[1]))


def test_bit_packed_masks_agree_with_numpy_packbits():
    x = _sample((5, 13), torch.float32, 7)
    expected = np.packbits(~(x.numpy() <= np.float32(-ALPHA)), bitorder="little")
    _, numpy_bits = backends.forward("numpy", x, ALPHA)
    np.testing.assert_array_equal(numpy_bits.numpy() & _valid_bits(x.numel()), expected)
    if cpu_kernels.available():
        _, c_bits = backends.forward("c", x, ALPHA)
        np.testing.assert_array_equal(c_bits.numpy(), expected)


def _valid_bits(n: int) -> np.ndarray:
    """Per-byte masks of the bits that hold elements (the last byte may be part padding)."""
    masks = np.full(-(-n // 8), 0xFF, dtype=np.uint8)
    if n % 8:
        masks[-1] = (1 << (n % 8)) - 1
    return masks


def test_forced_backend_that_cannot_run_raises():
    x = torch.randn(4, requires_grad=True)
    with pytest.raises(ValueError, match=r"'triton' does not support a torch\.float32 tensor on cpu"):
        helu(x, backend="triton")
    with pytest.raises(ValueError, match=r"'numpy' does not support a torch\.bfloat16"):
        helu(x.detach().bfloat16().requires_grad_(True), backend="numpy")
    with pytest.raises(ValueError, match="unknown HeLU backend 'cuda'"):
        helu(x, backend="cuda")


def test_missing_compiler_disables_c_backend_with_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "_library", None)
    monkeypatch.setattr(cpu_kernels, "_failure", None)
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv(cpu_kernels.CACHE_ENV_VAR, str(tmp_path / "cache"))
    x = torch.randn(4, requires_grad=True)
    assert not cpu_kernels.available()
    assert backends.resolve(x) == "numpy"  # auto falls back
    with pytest.raises(ValueError, match=r"'c' does not support .* no C compiler found"):
        helu(x, backend="c")


def test_c_kernels_build_once_into_the_cache(monkeypatch, tmp_path):
    if cpu_kernels._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(cpu_kernels, "_library", None)
    monkeypatch.setattr(cpu_kernels, "_failure", None)
    monkeypatch.setenv(cpu_kernels.CACHE_ENV_VAR, str(tmp_path))
    cpu_kernels.load()
    built = list(tmp_path.iterdir())
    assert [p.suffix for p in built] == [".so"]  # the library only: no source or temp folder left
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(cpu_kernels, "_library", None)
    cpu_kernels.load()
    assert built[0].stat().st_mtime_ns == stamp  # loaded from the cache, not rebuilt


def test_env_var_selects_backend(monkeypatch):
    x = torch.randn(3, 5, requires_grad=True)
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.resolve(x) == "torch"
    assert helu(x).grad_fn.saved_tensors[0].dtype == torch.bool  # the torch backend's bool mask
    monkeypatch.setenv(backends.ENV_VAR, "numpy")
    assert helu(x).grad_fn.saved_tensors[0].shape == (2,)  # 15 bits packed in 2 bytes
    assert backends.resolve(x, "torch") == "torch"  # the argument wins over the variable
    monkeypatch.setenv(backends.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="unknown HeLU backend 'bogus'"):
        helu(x)


def test_auto_prefers_fused_c_kernels_on_cpu(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    expected = "c" if cpu_kernels.available() else "numpy"
    assert backends.resolve(torch.randn(2, requires_grad=True)) == expected
    assert backends.resolve(torch.randn(2, dtype=torch.bfloat16)) == ("c" if expected == "c" else "torch")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_c_kernels_split_across_threads_match_one_thread(dtype):
    """Large inputs run in chunks on several threads; chunk edges (odd sizes) must not change a bit."""
    _skip_unsupported("c", dtype)
    n = 4 * cpu_kernels.GRAIN + 13  # not a multiple of 8: the last chunk ends mid-byte
    x = _sample((n,), dtype, seed=7).requires_grad_(True)
    grad = torch.randn(n, generator=torch.Generator().manual_seed(8)).to(dtype)
    threads = torch.get_num_threads()
    results = []
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            y = helu(x, ALPHA, backend="c")
            (dx,) = torch.autograd.grad(y, x, grad)
            results.append((_bits(y), _bits(dx)))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert torch.equal(results[1][0], _bits(torch.relu(x.detach())))
    assert torch.equal(dx, grad * (x.detach() > -ALPHA))


def test_c_kernels_split_by_grain_and_thread_count():
    """Each thread gets at least GRAIN elements; never more threads than torch allows."""
    _skip_unsupported("c", torch.float32)
    if not cpu_kernels.parallel():
        assert cpu_kernels.team_size(100 * cpu_kernels.GRAIN, 4) == 1  # built without OpenMP: one thread
        pytest.skip("C kernels built without OpenMP")
    grain = cpu_kernels.GRAIN
    assert cpu_kernels.team_size(2 * grain - 1, 8) == 1
    assert cpu_kernels.team_size(2 * grain, 8) == 2
    assert cpu_kernels.team_size(4 * grain + 13, 3) == 3
    assert cpu_kernels.team_size(100 * grain, 1) == 1


def test_c_kernels_without_openmp_fall_back_to_one_thread(monkeypatch, tmp_path):
    """A compiler without OpenMP support still gives working (single-threaded) kernels."""
    if cpu_kernels._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setattr(cpu_kernels, "_library", None)
    monkeypatch.setattr(cpu_kernels, "_failure", None)
    monkeypatch.setattr(cpu_kernels, "_parallel", cpu_kernels._parallel)
    monkeypatch.setattr(cpu_kernels, "_VARIANTS", (("-fno-such-flag-for-helu",), ()))
    monkeypatch.setenv(cpu_kernels.CACHE_ENV_VAR, str(tmp_path))
    assert cpu_kernels.available() and not cpu_kernels.parallel()
    assert cpu_kernels.team_size(100 * cpu_kernels.GRAIN, 4) == 1
    x = torch.randn(3 * cpu_kernels.GRAIN + 5, requires_grad=True)
    grad = torch.randn_like(x)
    (dx,) = torch.autograd.grad(helu(x, ALPHA, backend="c"), x, grad)
    assert torch.equal(dx, grad * (x.detach() > -ALPHA))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_c_16bit_forward_matches_relu_on_every_bit_pattern(dtype):
    """The C kernels compute 16-bit relu on raw bits; check all 65536 patterns (NaN-free, then with NaNs)."""
    _skip_unsupported("c", dtype)
    every = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(dtype)
    no_nan = every[~every.isnan()]
    for x in (no_nan, no_nan[:-3], every):  # the vector loop, a scalar tail, the NaN fallback
        x = x.clone().requires_grad_(True)
        grad = torch.ones_like(x)
        y = helu(x, ALPHA, backend="c")
        (dx,) = torch.autograd.grad(y, x, grad)
        assert torch.equal(_bits(y), _bits(torch.relu(x.detach())))
        assert torch.equal(dx, (~(x.detach().float() <= float(torch.tensor(-ALPHA, dtype=dtype)))).to(dtype))
