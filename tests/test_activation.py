"""HeLU itself (hf_helu.activation): the functional, the module, argument checks and "helu_<alpha>" names."""

import os
import subprocess
import sys
from fractions import Fraction

import pytest
import torch
from ops_helpers import gradcheck_points, with_helu_derivative

from hf_helu import HeLU, activation_name, helu, parse_activation_name

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def reference_grad(x: torch.Tensor, grad: torch.Tensor, alpha: float) -> torch.Tensor:
    """HeLU's gradient written independently of the library: pass where x > -alpha (in x's dtype)."""
    passes = x > torch.tensor(-alpha, dtype=x.dtype)
    return torch.where(passes, grad, torch.zeros_like(grad))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("alpha", [0.05, 0.5])
def test_forward_is_relu_and_backward_matches_reference(dtype, alpha):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 53, generator=gen) * 0.2).to(dtype).requires_grad_()
    grad = torch.randn(37, 53, generator=gen).to(dtype)
    y = helu(x, alpha)
    assert y.dtype == dtype
    assert torch.equal(y, torch.relu(x.detach()))
    y.backward(grad)
    expected = reference_grad(x.detach(), grad, alpha)
    assert torch.equal(x.grad, expected)
    # The band (-alpha, 0] is where HeLU differs from ReLU: non-empty here, so the test has teeth.
    band = (x.detach() <= 0) & (x.detach() > -alpha)
    assert band.any() and (x.grad[band] != 0).any()


def test_alpha_zero_is_relu_gradient():
    x = torch.randn(1000, dtype=torch.float64)
    x[:10] = 0.0  # ReLU's gradient at exactly 0 is 0
    grad = torch.randn(1000, dtype=torch.float64)
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    helu(a, 0.0).backward(grad)
    torch.relu(b).backward(grad)
    assert torch.equal(a.grad, b.grad)


def test_gradcheck_includes_the_band():
    x = gradcheck_points(0.05).requires_grad_()
    assert torch.autograd.gradcheck(with_helu_derivative(lambda t: helu(t, 0.05), 0.05), (x,))


def test_no_autograd_node_without_grad_or_in_eval():
    x = torch.randn(8, requires_grad=True)
    with torch.no_grad():
        assert helu(x).grad_fn is None
    assert helu(torch.randn(8)).grad_fn is None
    module = HeLU().eval()
    y = module(x)
    assert y.grad_fn is not None and "Relu" in type(y.grad_fn).__name__
    module.train()
    assert "HeLU" in type(module(x).grad_fn).__name__


@pytest.mark.parametrize(
    ("alpha", "error"),
    [(-0.1, ValueError), (float("nan"), ValueError), (float("inf"), ValueError), ("0.1", TypeError), (True, TypeError)],
)
def test_bad_alpha_is_named(alpha, error):
    for make in (lambda: HeLU(alpha), lambda: helu(torch.randn(3, requires_grad=True), alpha)):
        with pytest.raises(error, match="alpha") as info:
            make()
        assert repr(alpha) in str(info.value)


@pytest.mark.parametrize("alpha", [10**400, Fraction(-(10**400), 7), 10**5000], ids=["1e400", "-1e400/7", "1e5000"])
def test_alpha_beyond_float_range_is_named(alpha):
    with pytest.raises(ValueError, match="alpha must be a finite number") as info:
        HeLU(alpha)
    text = str(info.value)
    # repr of 10**5000 exceeds int's string limit: its size is named instead
    if not (isinstance(alpha, int) and alpha.bit_length() > 10000):
        shown = repr(alpha)
        assert shown[:20] in text and shown[-10:] in text and f"({len(shown)} characters)" in text
    else:
        assert f"an integer of {alpha.bit_length()} bits" in text


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_non_float_input_is_rejected(dtype):
    with pytest.raises(TypeError, match=str(dtype)):
        helu(torch.zeros(3, dtype=dtype))
    with pytest.raises(TypeError, match=str(dtype)):
        HeLU()(torch.zeros(3, dtype=dtype))


def test_nan_and_inf_behave_like_relu():
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.01, 1.0])
    a = x.clone().requires_grad_()
    b = x.clone().requires_grad_()
    ya, yb = helu(a, 0.0), torch.relu(b)
    assert torch.equal(ya.isnan(), yb.isnan()) and torch.equal(ya.nan_to_num(), yb.nan_to_num())
    ya.sum().backward()
    yb.sum().backward()
    assert torch.equal(a.grad, b.grad)


def test_activation_names_round_trip():
    assert activation_name() == "helu"
    assert activation_name(0.1) == "helu_0.1"
    for alpha in [0.0, 0.05, 0.1, 0.5, 1e-3, 0.123456789]:
        assert parse_activation_name(activation_name(alpha)) == alpha
    assert parse_activation_name("gelu") is None
    with pytest.raises(ValueError, match="helu_abc"):
        parse_activation_name("helu_abc")
    with pytest.raises(ValueError, match="alpha"):
        parse_activation_name("helu_-1")


def test_inside_autocast_keeps_the_autocast_dtype():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 16)
    x = torch.randn(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = linear(x)
        y = helu(z, 0.05)
    assert z.dtype == y.dtype == torch.bfloat16
    assert torch.equal(y, torch.relu(z))
    z.retain_grad()
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.equal(z.grad, reference_grad(z.detach(), grad, 0.05))


@pytest.mark.parametrize("name", ["helu_1_0", "helu_ 0.1", "helu_0.1 ", "helu_+0.1", "helu_nan", "helu_inf", "helu_.5"])
def test_activation_name_must_hold_a_plain_decimal(name):
    with pytest.raises(ValueError, match="plain decimal") as info:
        parse_activation_name(name)
    assert repr(name) in str(info.value)


def test_activation_name_round_trips_every_alpha_repr_writes():
    gen = torch.Generator().manual_seed(0)
    small = [0.0001, 1e-05, 1e-07, 5e-324, 0.3 + 1e-17, 1e16, 1e300, 7.0, 10.0]
    drawn = (10.0 ** torch.empty(200, dtype=torch.float64).uniform_(-12, 3, generator=gen)).tolist()
    for alpha in small + drawn:
        name = activation_name(alpha)
        assert name == "helu" or name == f"helu_{alpha!r}"
        assert parse_activation_name(name) == alpha, name
    assert activation_name(1e-05) == "helu_1e-05" and activation_name(0.0001) == "helu_0.0001"


def test_unknown_backend_variable_is_reported_when_a_module_is_built(monkeypatch):
    monkeypatch.setenv("HF_HELU_BACKEND", "cuda")
    with pytest.raises(
        ValueError, match=r"HF_HELU_BACKEND='cuda' .* expected one of \['auto', 'triton', 'c', 'torch'\]"
    ):
        HeLU()  # an eval-only run builds its modules, so it sees the typo too
    assert HeLU(backend="torch").backend == "torch"  # an explicit backend does not read the variable


def test_unknown_backend_variable_is_reported_at_import():
    env = {**os.environ, "HF_HELU_BACKEND": "cuda"}
    done = subprocess.run([sys.executable, "-c", "import hf_helu"], env=env, capture_output=True, text=True)
    assert done.returncode != 0
    assert "HF_HELU_BACKEND='cuda' is not a HeLU backend" in done.stderr and "'auto'" in done.stderr


def test_torch_jit_script_gives_relu_in_eval_and_a_clear_error_in_training(tmp_path):
    x = torch.randn(4, 33)
    x[0, :3] = torch.tensor([-0.0, 0.0, -0.01])
    scripted = torch.jit.script(HeLU(0.1).eval())
    assert torch.equal(scripted(x).view(torch.int32), torch.relu(x).view(torch.int32))  # bit for bit, -0.0 too
    torch.jit.save(scripted, tmp_path / "helu.pt")
    reloaded = torch.jit.load(tmp_path / "helu.pt")
    assert torch.equal(reloaded(x).view(torch.int32), torch.relu(x).view(torch.int32))
    reloaded.train()
    with pytest.raises(torch.jit.Error, match="TorchScript HeLU runs in eval mode only"):
        reloaded(x)
    with pytest.raises(torch.jit.Error, match="floating-point"):
        scripted(torch.zeros(3, dtype=torch.int64))
