"""The Triton kernels (hf_helu.ops.triton_kernels), run on CPU tensors under Triton's interpreter, against torch
references.

``TRITON_INTERPRET=1`` must be set before a kernel is decorated and is read again while it runs;
set in this process it would also turn every later Triton kernel into interpreted code. So the
one test collected normally re-runs this file in a fresh pytest process with the variable set,
and the checks themselves are only defined in that process.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ALPHA = 0.05

pytest.importorskip("triton", reason="triton is in the dev extra: pip install -e '.[dev]'")

if not INTERPRETED:

    def test_triton_kernels_under_interpreter():
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
        assert "skipped" not in done.stdout and " passed" in done.stdout, done.stdout[-3000:]

else:
    from hf_helu import ops
    from hf_helu.ops import triton_kernels

    DTYPES = [torch.float32, torch.float16, torch.bfloat16]
    # Odd sizes, one element past 8, exactly one program's block, one past it, several blocks.
    BLOCK = 8 * triton_kernels.BLOCK_BYTES
    SHAPES = [(1,), (7,), (9,), (3, 5), (BLOCK,), (BLOCK + 1,), (3, 7, 211)]

    def _sample(shape, dtype, seed):
        gen = torch.Generator().manual_seed(seed)
        x = (torch.randn(shape, generator=gen) * 0.1).to(dtype)
        special = torch.tensor([-ALPHA, 0.0, float("nan"), float("inf"), float("-inf"), -float("nan"), ALPHA])
        flat = x.view(-1)
        flat[: min(flat.numel(), special.numel())] = special[: flat.numel()].to(dtype)
        return x

    def _keep(x, threshold):
        return ~(x <= threshold)  # NaN passes its gradient, as in ReLU

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_forward_matches_relu_and_packbits(dtype):
        for seed, shape in enumerate(SHAPES):
            x = _sample(shape, dtype, seed)
            threshold = ops.threshold(ALPHA, dtype)
            y, bits = triton_kernels.helu_forward(x, threshold)
            expected = torch.relu(x)
            assert y.dtype == dtype and y.shape == x.shape
            assert torch.equal(y.isnan(), expected.isnan())
            # torch.equal counts -0.0 == 0.0: the interpreter's maximum gives +0.0 where CPU relu keeps
            # -0.0; on CUDA both are fmaxf, and benchmarks/gpu_check.py compares them bit for bit.
            assert torch.equal(torch.nan_to_num(y), torch.nan_to_num(expected))
            reference = np.packbits(_keep(x, threshold).numpy(), bitorder="little")  # padding bits 0
            np.testing.assert_array_equal(bits.numpy(), reference)

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_backward_selects_grad_where_bit_set(dtype):
        for seed, shape in enumerate(SHAPES):
            x = _sample(shape, dtype, seed)
            grad = torch.randn(shape, generator=torch.Generator().manual_seed(50 + seed)).to(dtype)
            threshold = ops.threshold(ALPHA, dtype)
            _, bits = triton_kernels.helu_forward(x, threshold)
            grad_in = triton_kernels.helu_backward(grad, bits, x.shape)
            expected = torch.where(_keep(x, threshold), grad, torch.zeros((), dtype=dtype))
            assert torch.equal(grad_in.view(torch.int8), expected.view(torch.int8))  # bit for bit, +0.0

    def test_unpack_round_trip_of_random_bits():
        for n in (1, 8, 13, BLOCK - 3, 3 * BLOCK + 5):
            bits = torch.randint(0, 256, ((n + 7) // 8,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
            ones = torch.ones(n)
            unpacked = triton_kernels.helu_backward(ones, bits, torch.Size([n]))
            expected = np.unpackbits(bits.numpy(), count=n, bitorder="little").astype(np.float32)
            np.testing.assert_array_equal(unpacked.numpy(), expected)
            # ... and packing that 0/1 pattern again (threshold 0.5) gives the same bytes back.
            _, repacked = triton_kernels.helu_forward(unpacked, 0.5)
            np.testing.assert_array_equal(repacked.numpy(), np.packbits(expected > 0.5, bitorder="little"))

    def test_non_contiguous_input_and_grad():
        x = _sample((40, 33), torch.float32, 9).t()[:, ::3]
        grad = torch.randn(x.shape[1], generator=torch.Generator().manual_seed(3)).expand(x.shape)
        assert not x.is_contiguous() and not grad.is_contiguous()
        threshold = ops.threshold(ALPHA, torch.float32)
        y, bits = triton_kernels.helu_forward(x, threshold)
        assert torch.equal(torch.nan_to_num(y), torch.nan_to_num(torch.relu(x)))
        grad_in = triton_kernels.helu_backward(grad, bits, x.shape)
        assert torch.equal(grad_in, torch.where(_keep(x, threshold), grad, 0.0))

    def test_alpha_zero_and_empty():
        x = _sample((5, 11), torch.bfloat16, 4)
        _, bits = ops.forward("triton", x, 0.0)  # threshold -0.0: x = 0 is blocked, as in ReLU
        keep = np.unpackbits(bits.numpy(), count=x.numel(), bitorder="little").astype(bool)
        np.testing.assert_array_equal(keep, (x.float() > 0).numpy().ravel() | x.isnan().numpy().ravel())
        y, bits = triton_kernels.helu_forward(torch.empty(0, 3), -ALPHA)
        assert y.shape == (0, 3) and bits.numel() == 0
        assert triton_kernels.helu_backward(torch.empty(0, 3), bits, torch.Size([0, 3])).shape == (0, 3)

    # --- the autograd node on the triton backend: every autograd mode, and channels_last -------------------------

    from torch import func

    from hf_helu.ops import nodes

    def _helu_triton(x):
        return nodes.helu_node(x, ALPHA, "triton")  # forced past resolve(), which wants a CUDA tensor

    def _reference(x):
        keep = ~(x.detach() <= ops.threshold(ALPHA, x.dtype))
        return torch.relu(x.detach()) + (x - x.detach()) * keep

    def _band():
        x = (torch.linspace(-0.12, 0.2, 24) + 0.0031).reshape(6, 4).t().contiguous()
        assert ((x > -ALPHA) & (x <= 0)).any(dim=1).all()
        return x

    def _loss(act, x, w):
        return (act(x) @ w).square().sum()

    def test_every_autograd_mode_matches_reference():
        x, w = _band(), torch.randn(6, 6, generator=torch.Generator().manual_seed(0)) * 0.3
        runs = {
            "grad": lambda act: func.grad(lambda t: _loss(act, t, w))(x),
            "jacrev": lambda act: func.jacrev(act)(x),
            "jacfwd": lambda act: func.jacfwd(act)(x),
            "jvp": lambda act: func.jvp(act, (x,), (torch.ones_like(x),))[1],
            "vmap_of_grad": lambda act: func.vmap(func.grad(lambda t: _loss(act, t, w)))(x),
            "hessian": lambda act: func.hessian(lambda t: _loss(act, t, w))(x),
        }
        for name, run in runs.items():
            ours, expected = run(_helu_triton), run(_reference)
            torch.testing.assert_close(ours, expected, rtol=1e-6, atol=1e-6, msg=name)
            assert not torch.allclose(ours, run(torch.relu)), name  # HeLU's derivative, not ReLU's

    def test_double_backward_and_gradgradcheck():
        x, w = _band(), torch.randn(6, 6, generator=torch.Generator().manual_seed(1)) * 0.3
        results = []
        for act in (_helu_triton, _reference):
            inputs, weights = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(_loss(act, inputs, weights), inputs, create_graph=True)
            results.append(torch.autograd.grad(g.square().sum(), weights)[0])
        torch.testing.assert_close(results[0], results[1], rtol=1e-6, atol=1e-6)
        away = torch.tensor([[-0.5, -0.2], [-0.03, 0.3], [0.7, -0.01]], requires_grad=True)
        assert torch.autograd.gradgradcheck(_helu_triton, (away,), eps=1e-3, atol=1e-3, rtol=1e-3)

    def test_channels_last_is_kept():
        base = _sample((2, 5, 3, 7), torch.float32, 11)
        x = base.to(memory_format=torch.channels_last).requires_grad_(True)
        y = _helu_triton(x)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(torch.nan_to_num(y.detach()), torch.nan_to_num(torch.relu(base)))
        grad = torch.randn(base.shape, generator=torch.Generator().manual_seed(12))
        (dx,) = torch.autograd.grad(y, x, grad)
        assert dx.is_contiguous(memory_format=torch.channels_last)
        keep = ~(base <= ops.threshold(ALPHA, torch.float32))
        assert torch.equal(dx, torch.where(keep, grad, 0.0))
