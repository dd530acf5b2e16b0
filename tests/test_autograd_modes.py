"""HeLU under every autograd mode (hf_helu.activation's nodes): double backward, gradgradcheck, forward-mode AD and
the torch.func transforms, on the CPU backends, against torch.relu (alpha = 0) and a reference written from plain
torch ops. The Triton backend's versions of these checks are in test_ops_triton.py (interpreter)."""

from __future__ import annotations

import pytest
import torch
from ops_helpers import bits_of, gradcheck_points, recording_saved_tensors, skip_if_unavailable, with_helu_derivative
from torch import func
from torch.autograd import forward_ad

from hf_helu import helu, ops

ALPHA = 0.05
BACKENDS = ["torch", "c"]


def reference(x: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """HeLU from plain torch ops: relu's value, and derivative 1 where not x <= -alpha (the mask as a constant)."""
    keep = ~(x.detach() <= -alpha)
    return torch.relu(x.detach()) + (x - x.detach()) * keep


def band_input(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """4x6 values over [-0.12, 0.2]: each row has positives and values in (-alpha, 0], where HeLU's derivative
    differs from ReLU's."""
    values = torch.linspace(-0.12, 0.2, 24, dtype=dtype) + 0.0031
    x = values.reshape(6, 4).t().contiguous()  # every row spans the whole range
    assert (((x > -ALPHA) & (x <= 0)).any(dim=1) & (x > 0).any(dim=1)).all()
    return x


def mlp_loss(act, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """A loss whose gradient and Hessian reach the pre-activations in the band (the activation acts on x itself)."""
    return (act(x) @ w).square().sum()


def test_issue_repro_double_backward_reaches_every_weight_as_relu_does():
    """The issue's example at alpha = 0: gradient penalty through HeLU equals the one through torch.relu."""
    for backend in BACKENDS:
        skip_if_unavailable(backend)
        grads = []
        for act in (lambda t, backend=backend: helu(t, 0.0, backend=backend), torch.relu):
            torch.manual_seed(0)
            w1 = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
            w2 = torch.randn(1, 6, dtype=torch.float64, requires_grad=True)
            x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
            (g,) = torch.autograd.grad((act(x @ w1.t()) @ w2.t()).sum(), x, create_graph=True)
            (g**2).sum().backward()
            assert w2.grad is not None, backend
            grads.append((w1.grad, w2.grad))
        assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1]), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_matches_reference_with_helu_derivative(backend):
    skip_if_unavailable(backend)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(6, 6, dtype=torch.float64, generator=gen) * 0.3
    results = []
    for act in (lambda t: helu(t, ALPHA, backend=backend), reference, torch.relu):
        x = band_input().requires_grad_(True)
        weights = w.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(mlp_loss(act, x, weights), x, create_graph=True)
        (dw,) = torch.autograd.grad(g.square().sum(), weights)
        results.append(dw)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=1e-12)
    assert not torch.allclose(results[0], results[2])  # the band makes it differ from ReLU's


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradgradcheck_float64_includes_the_band(backend):
    skip_if_unavailable(backend)
    x = gradcheck_points().requires_grad_(True)
    fn = with_helu_derivative(lambda t: helu(t, ALPHA, backend=backend))
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8)
    assert torch.autograd.gradgradcheck(fn, (x,), eps=1e-6, atol=1e-8)
    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-8, check_forward_ad=True, check_backward_ad=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_dual_gives_tangent_times_helu_mask(backend):
    skip_if_unavailable(backend)
    x = band_input(torch.float32)
    tangent = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    for requires_grad in (False, True):
        with forward_ad.dual_level():
            dual = forward_ad.make_dual(x.clone().requires_grad_(requires_grad), tangent)
            y, y_tangent = forward_ad.unpack_dual(helu(dual, ALPHA, backend=backend))
        assert torch.equal(bits_of(y.detach()), bits_of(torch.relu(x)))
        expected = torch.where(x > -ALPHA, tangent, torch.zeros(()))
        assert torch.equal(bits_of(y_tangent), bits_of(expected)), requires_grad
        assert not torch.equal(y_tangent, torch.where(x > 0, tangent, torch.zeros(())))  # not ReLU's


TRANSFORMS = {
    "grad": lambda act, x, w: func.grad(lambda t: mlp_loss(act, t, w))(x),
    "jacrev": lambda act, x, w: func.jacrev(act)(x),
    "jacfwd": lambda act, x, w: func.jacfwd(act)(x),
    "jvp": lambda act, x, w: func.jvp(act, (x,), (torch.ones_like(x),))[1],
    "vjp": lambda act, x, w: func.vjp(act, x)[1](torch.ones_like(x))[0],
    "vmap": lambda act, x, w: func.vmap(act)(x),
    "vmap_of_grad": lambda act, x, w: func.vmap(func.grad(lambda t: mlp_loss(act, t, w)))(x),
    "grad_of_vmap": lambda act, x, w: func.grad(lambda t: mlp_loss(func.vmap(act, in_dims=1, out_dims=1), t, w))(x),
    "vmap_of_jvp": lambda act, x, w: func.vmap(lambda t: func.jvp(act, (t,), (torch.ones_like(t),))[1])(x),
    "hessian": lambda act, x, w: func.hessian(lambda t: mlp_loss(act, t, w))(x),
    "jacfwd_of_jacrev": lambda act, x, w: func.jacfwd(func.jacrev(lambda t: mlp_loss(act, t, w)))(x),
}
DERIVATIVES = set(TRANSFORMS) - {"vmap"}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_transform_matches_reference(backend, transform):
    skip_if_unavailable(backend)
    x = band_input()
    w = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 0.3
    run = TRANSFORMS[transform]
    ours = run(lambda t: helu(t, ALPHA, backend=backend), x, w)
    expected = run(reference, x, w)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-12)
    if transform in DERIVATIVES:
        assert not torch.allclose(ours, run(torch.relu, x, w)), "HeLU's derivative must differ from ReLU's in the band"


def test_per_sample_gradients_equal_a_loop_of_single_backwards():
    skip_if_unavailable("c")
    x = band_input()
    w = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 0.3

    def loss(weights, sample):
        return (helu(sample @ weights, ALPHA) @ weights).square().sum()

    batched = func.vmap(func.grad(loss), in_dims=(None, 0))(w, x)
    for i in range(x.shape[0]):
        weights = w.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(loss(weights, x[i]), weights)
        torch.testing.assert_close(batched[i], expected, rtol=0, atol=1e-12)


def test_vmap_runs_the_torch_backend_and_plain_autograd_keeps_the_packed_mask(monkeypatch):
    """The documented choice: a vmapped forward runs the torch backend (its bool mask carries the batch
    dimension); every other mode, torch.func.grad included, keeps the fused kernels and the 1-bit mask."""
    skip_if_unavailable("c")
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    used = []
    real_forward = ops.forward
    monkeypatch.setattr(ops, "forward", lambda name, x, alpha: used.append(name) or real_forward(name, x, alpha))
    x = band_input()
    func.vmap(lambda t: helu(t, ALPHA).sum())(x.requires_grad_(True))
    assert used == ["torch"]
    used.clear()
    func.grad(lambda t: helu(t, ALPHA).sum())(x)
    func.jvp(lambda t: helu(t, ALPHA), (x,), (x,))
    helu(x, ALPHA).sum().backward()
    assert used == ["c", "c", "c"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_create_graph_saves_only_the_mask(backend):
    """Second-order support costs no memory: the forward saves the mask alone (1 bit per element on c), and
    the differentiable backward saves that same mask again, no float tensor."""
    skip_if_unavailable(backend)
    x = torch.randn(64, 40, requires_grad=True)
    with recording_saved_tensors() as saved:
        y = helu(x, ALPHA, backend=backend)
        forward_saved = list(saved)
        (g,) = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    per_element = sum(t.numel() * t.element_size() for t in forward_saved) / x.numel()
    assert per_element == (1 if backend == "torch" else 0.125)
    mask_storage = forward_saved[-1].untyped_storage().data_ptr()
    helu_saved = [t for t in saved if not t.is_floating_point()]
    assert helu_saved and all(t.untyped_storage().data_ptr() == mask_storage for t in helu_saved)
    (gg,) = torch.autograd.grad(g.sum(), x)
    # g = 2 relu(x) where the mask is set; through relu's HeLU derivative that is 2 * mask again.
    assert torch.equal(gg, torch.where(x > -ALPHA, 2.0, 0.0))
