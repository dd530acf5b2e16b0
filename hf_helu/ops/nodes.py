"""HeLU's autograd nodes over the backends: ``(relu(x), mask)`` forward, ``grad`` where the mask is set backward.

One node each: :class:`HeLUFunction` (the activation) and :class:`MaskedGrad` (its backward). Both are
``setup_context`` Functions with a ``jvp`` and a ``vmap`` rule, so one class serves backward, forward-mode AD and
every ``torch.func`` transform. The backward is a node of its own because it is linear in ``grad`` and constant in
the mask: its backward and its forward-mode derivative are itself again, which makes ``create_graph=True``, double
backward and ``gradgradcheck`` work exactly as through ``torch.relu``, saving nothing but the mask.

Dynamo refuses to trace a Function that defines ``jvp``, so inside ``torch.compile`` each node is applied through a
subclass that inherits everything but the ``jvp``: the graph keeps the node whole, with no break.
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad

from hf_helu import ops


def _save(ctx, mask: torch.Tensor, layout: tuple) -> None:
    ctx.save_for_backward(mask)
    ctx.save_for_forward(mask)
    ctx.layout = layout


class MaskedGrad(torch.autograd.Function):
    """``grad`` where the saved mask is set, else +0.0: HeLU's backward, itself differentiable."""

    @staticmethod
    def forward(grad, mask, backend: str, shape: torch.Size, memory_format: torch.memory_format) -> torch.Tensor:
        return ops.backward(backend, grad, mask, shape, memory_format)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        _save(ctx, inputs[1], inputs[2:])

    @staticmethod
    def backward(ctx, grad_grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return masked_grad(grad_grad, mask, *ctx.layout), None, None, None, None

    @staticmethod
    def jvp(ctx, grad_tangent: torch.Tensor, *_):
        (mask,) = ctx.saved_tensors
        return masked_grad(grad_tangent, mask, *ctx.layout)

    @staticmethod
    def vmap(info, in_dims, grad, mask, backend: str, shape: torch.Size, memory_format: torch.memory_format):
        # A packed mask here is never batched: vmapped forwards run the torch backend (HeLUFunction.vmap).
        grad_dim, mask_dim = in_dims[:2]
        if mask_dim is None:
            mask = ops.unpack(backend, mask, torch.Size(shape), memory_format)
        grad = grad if grad_dim is None else grad.movedim(grad_dim, 0)
        mask = mask if mask_dim is None else mask.movedim(mask_dim, 0)
        # An unbatched side broadcasts against the batched one from the right: the batch dim is 0.
        return MaskedGrad.apply(grad, mask, "torch", shape, memory_format), 0


class HeLUFunction(torch.autograd.Function):
    """HeLU's node: returns ``(relu(x), mask)`` and saves only the mask (1 bit or 1 byte per element)."""

    @staticmethod
    def forward(x: torch.Tensor, alpha: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.forward(backend, x, alpha)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        y, mask = output
        ctx.mark_non_differentiable(mask)
        _save(ctx, mask, (inputs[2], y.shape, ops.output_format(y)))

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _mask_grad: None):
        (mask,) = ctx.saved_tensors
        return masked_grad(grad, mask, *ctx.layout), None, None

    @staticmethod
    def jvp(ctx, x_tangent: torch.Tensor, _alpha: None, _backend: None):
        (mask,) = ctx.saved_tensors
        return masked_grad(x_tangent, mask, *ctx.layout), None

    @staticmethod
    def vmap(info, in_dims, x: torch.Tensor, alpha: float, backend: str):
        # Elementwise, so the batch dimension stays where it is; the torch backend's mask carries it too.
        return HeLUFunction.apply(x, alpha, "torch"), (in_dims[0], in_dims[0])


class _TracedMaskedGrad(MaskedGrad):
    jvp = torch.autograd.Function.jvp  # Dynamo cannot trace a custom jvp: inside torch.compile, the node without it


class _TracedHeLU(HeLUFunction):
    jvp = torch.autograd.Function.jvp


def masked_grad(
    grad: torch.Tensor, mask: torch.Tensor, backend: str, shape: torch.Size, memory_format: torch.memory_format
) -> torch.Tensor:
    """HeLU's backward: ``grad`` where ``mask`` (from ``backend``) is set, else +0.0.

    A node only when a derivative of it may be taken (grad mode on, as under ``create_graph=True`` and the
    ``torch.func`` transforms, or a tangent); a plain first-order backward calls the kernel directly.
    """
    if torch.is_grad_enabled() or forward_ad.unpack_dual(grad).tangent is not None:
        node = _TracedMaskedGrad if torch.compiler.is_compiling() else MaskedGrad
        return node.apply(grad, mask, backend, shape, memory_format)
    return ops.backward(backend, grad, mask, shape, memory_format)


def helu_node(x: torch.Tensor, alpha: float, backend: str) -> torch.Tensor:
    """``relu(x)`` through HeLU's autograd node, run by ``backend``."""
    node = _TracedHeLU if torch.compiler.is_compiling() else HeLUFunction
    return node.apply(x, alpha, backend)[0]
