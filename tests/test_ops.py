"""The backend registry and dispatcher (hf_helu.ops), and every CPU backend against references written
independently of hf_helu. The C loader's own tests are in test_ops_cpu.py, Triton's in test_ops_triton.py."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from ops_helpers import (
    ALPHA,
    bits_of,
    gradcheck_points,
    recording_saved_tensors,
    sample,
    skip_if_unavailable,
    with_helu_derivative,
)
from torch.utils.checkpoint import checkpoint

from hf_helu import helu, ops
from hf_helu.ops import cpu

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
CPU_BACKENDS = ["torch", "c"]


SHAPES = [(0,), (), (1,), (7,), (3, 5), (17, 33), (2, 3, 129)]
BACKEND_DTYPES = [
    pytest.param(backend, dtype, id=f"{backend}-{str(dtype).removeprefix('torch.')}")
    for backend in CPU_BACKENDS
    for dtype in DTYPES
]


def test_registry_holds_typed_backends_in_auto_order():
    assert list(ops.BACKENDS) == ["triton", "c", "torch"]
    for name, backend in ops.BACKENDS.items():
        assert isinstance(backend, ops.Backend) and backend.name == name
    with pytest.raises(dataclasses.FrozenInstanceError):
        ops.BACKENDS["torch"].name = "other"


@pytest.mark.parametrize(("backend", "dtype"), BACKEND_DTYPES)
def test_forward_and_gradient_match_reference(backend, dtype):
    skip_if_unavailable(backend)
    for seed, shape in enumerate(SHAPES):
        x = sample(shape, dtype, seed).requires_grad_(True)
        grad = torch.randn(shape, generator=torch.Generator().manual_seed(100 + seed)).to(dtype)
        y = helu(x, ALPHA, backend=backend)
        (dx,) = torch.autograd.grad(y, x, grad)
        expected_y = torch.relu(x.detach())
        assert y.dtype == dtype and y.shape == x.shape
        assert torch.equal(bits_of(y), bits_of(expected_y)), (backend, dtype, shape)
        assert torch.equal(dx, grad * (x.detach() > -ALPHA)), (backend, dtype, shape)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_contiguous_input_and_grad(backend):
    skip_if_unavailable(backend)
    base = sample((33, 18), torch.float32, 0)
    x = base.t()[::2].requires_grad_(True)  # transposed and strided
    grad = torch.randn(x.shape[1], generator=torch.Generator().manual_seed(1)).expand(x.shape)  # stride 0
    assert not x.is_contiguous() and not grad.is_contiguous()
    y = helu(x, ALPHA, backend=backend)
    (dx,) = torch.autograd.grad(y, x, grad)
    assert torch.equal(y, torch.relu(x.detach()))
    assert torch.equal(dx, grad * (x.detach() > -ALPHA))


@pytest.mark.parametrize(("backend", "dtype"), BACKEND_DTYPES)
def test_alpha_zero_is_relu_bit_for_bit(backend, dtype):
    skip_if_unavailable(backend)
    x = sample((9, 37), dtype, 3)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
    grad.view(-1)[:3] = torch.tensor([float("inf"), float("-inf"), -1.0]).to(dtype)  # ReLU zeroes these if blocked
    x.view(-1)[:3] = torch.tensor([-1.0, -2.0, -0.5]).to(dtype)
    ours, relu_in = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (dx,) = torch.autograd.grad(helu(ours, 0.0, backend=backend), ours, grad)
    (expected,) = torch.autograd.grad(torch.relu(relu_in), relu_in, grad)
    assert torch.equal(bits_of(dx), bits_of(expected))


@pytest.mark.parametrize(("backend", "dtype"), BACKEND_DTYPES)
def test_nan_and_inf_behave_like_relu(backend, dtype):
    skip_if_unavailable(backend)
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
    skip_if_unavailable(backend)
    x = torch.randn(64, 37, requires_grad=True)
    with recording_saved_tensors() as saved:
        y = helu(x, ALPHA, backend=backend)
    assert saved, "the HeLU node saved nothing: its backward could not know the mask"
    assert all(not t.is_floating_point() for t in saved), [t.dtype for t in saved]
    assert all(t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr() for t in saved)
    saved_bytes = sum(t.numel() * t.element_size() for t in saved)
    limit = x.numel() if backend == "torch" else -(-x.numel() // 8)  # bool mask, or 1 bit per element
    assert saved_bytes <= limit
    assert all(not t.is_floating_point() for t in y.grad_fn.saved_tensors)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64_includes_the_band(backend):
    skip_if_unavailable(backend)
    fn = with_helu_derivative(lambda t: helu(t, ALPHA, backend=backend))
    assert torch.autograd.gradcheck(fn, (gradcheck_points().requires_grad_(True),), eps=1e-6, atol=1e-8)


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
    skip_if_unavailable(backend)
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
    skip_if_unavailable(backend)
    x = sample((31, 29), torch.float32, 5).requires_grad_(True)
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(6))
    runs = [torch.autograd.grad(helu(x, ALPHA, backend=backend), x, grad)[0] for _ in range(2)]
    assert torch.equal(bits_of(runs[0]), bits_of(runs[1]))


def test_forced_backend_that_cannot_run_raises():
    x = torch.randn(4, requires_grad=True)
    with pytest.raises(ValueError, match=r"'triton' does not support a torch\.float32 tensor on cpu"):
        helu(x, backend="triton")
    with pytest.raises(ValueError, match=r"'c' does not support a torch\.float32 tensor on meta"):
        helu(torch.randn(4, device="meta", requires_grad=True), backend="c")
    with pytest.raises(ValueError, match="unknown HeLU backend 'cuda'"):
        helu(x, backend="cuda")


def test_env_var_selects_backend(monkeypatch):
    x = torch.randn(3, 5, requires_grad=True)
    monkeypatch.setenv(ops.ENV_VAR, "torch")
    assert ops.resolve(x) == "torch"
    assert helu(x).grad_fn.saved_tensors[0].dtype == torch.bool  # the torch backend's bool mask
    monkeypatch.setenv(ops.ENV_VAR, "triton")
    with pytest.raises(ValueError, match=r"'triton' does not support a torch\.float32 tensor on cpu"):
        helu(x)  # forced by the variable: an error, not what "auto" would have picked
    assert ops.resolve(x, "torch") == "torch"  # the argument wins over the variable
    if cpu.available():
        monkeypatch.setenv(ops.ENV_VAR, "c")
        assert helu(x).grad_fn.saved_tensors[0].shape == (2,)  # 15 bits packed in 2 bytes
    monkeypatch.setenv(ops.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match=r"HF_HELU_BACKEND='bogus' is not a HeLU backend: expected one of \['auto', "):
        helu(x)


def test_auto_prefers_fused_c_kernels_on_cpu(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    expected = "c" if cpu.available() else "torch"
    assert ops.resolve(torch.randn(2, requires_grad=True)) == expected
    assert ops.resolve(torch.randn(2, dtype=torch.bfloat16)) == expected


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("memory_format", [torch.channels_last, torch.channels_last_3d], ids=["2d", "3d"])
def test_channels_last_is_kept_like_relu(backend, memory_format):
    """Output and input gradient keep the input's memory format (as torch.relu's do), values bit for bit."""
    skip_if_unavailable(backend)
    shape = (2, 5, 3, 7) if memory_format == torch.channels_last else (2, 5, 3, 4, 3)
    base = sample(shape, torch.float32, 11)
    x = base.to(memory_format=memory_format).requires_grad_(True)
    relu_in = base.to(memory_format=memory_format).requires_grad_(True)
    y = helu(x, ALPHA, backend=backend)
    expected_y = torch.relu(relu_in)
    assert expected_y.is_contiguous(memory_format=memory_format)
    assert y.is_contiguous(memory_format=memory_format) and torch.equal(bits_of(y), bits_of(expected_y))
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(12))
    for grad_layout in (grad, grad.to(memory_format=memory_format)):  # the incoming gradient in either layout
        (dx,) = torch.autograd.grad(y, x, grad_layout, retain_graph=True)
        assert dx.is_contiguous(memory_format=memory_format)
        assert torch.equal(dx, grad * (base > -ALPHA))
    (dx,) = torch.autograd.grad(helu(x, 0.0, backend=backend), x, grad)
    (relu_dx,) = torch.autograd.grad(expected_y, relu_in, grad)
    assert torch.equal(bits_of(dx), bits_of(relu_dx))
