"""HeLU's autograd nodes over the backends: ``(relu(x), mask)`` forward, ``grad`` where the mask is set backward.

The backward is a node of its own (:func:`masked_grad`): linear in ``grad`` and constant in the mask, so
its backward and its forward-mode derivative are itself again. That makes ``create_graph=True``, double
backward and ``gradgradcheck`` work exactly as through ``torch.relu``, saving nothing but the mask.

Each node comes in three classes because PyTorch asks for three things that cost or conflict:

- eager (the common case): ``forward(ctx, ...)`` with a ``jvp``. ``Function.apply`` of a class with
  ``setup_context`` binds the arguments with ``inspect.signature`` on every call (measured on a 2-core CPU:
  46 us per apply against 14 us for the same node written with ``forward(ctx, ...)``).
- under ``torch.func`` transforms: ``setup_context`` (required there), an explicit ``vmap`` rule and ``jvp``.
  A vmapped forward runs the torch backend, whose bool mask carries the batch dimension (a packed mask
  would mix the samples' bits); a vmapped backward over a packed mask unpacks it first.
- inside ``torch.compile``: no ``jvp`` (Dynamo refuses a custom one); the torch backend (see :func:`ops.resolve`).
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad

from hf_helu import ops

# Private, so looked up defensively: without it every call takes the torch.func classes (correct, slower).
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def _context(ctx, mask: torch.Tensor, backend: str, y: torch.Tensor) -> None:
    ctx.save_for_backward(mask)
    ctx.save_for_forward(mask)
    ctx.layout = (backend, y.shape, ops.output_format(y))


# --- the backward: grad where the mask is set ----------------------------------------------------------------


class _CompiledMaskedGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, mask, backend: str, shape: torch.Size, memory_format: torch.memory_format):
        ctx.save_for_backward(mask)
        ctx.save_for_forward(mask)
        ctx.layout = (backend, shape, memory_format)
        return ops.backward(backend, grad, mask, shape, memory_format)

    @staticmethod
    def backward(ctx, grad_grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return masked_grad(grad_grad, mask, *ctx.layout), None, None, None, None


class _EagerMaskedGrad(_CompiledMaskedGrad):
    @staticmethod
    def jvp(ctx, grad_tangent: torch.Tensor, *_):
        (mask,) = ctx.saved_tensors
        return masked_grad(grad_tangent, mask, *ctx.layout)


class MaskedGrad(torch.autograd.Function):
    """``grad`` where the saved mask is set, else +0.0, under ``torch.func`` transforms."""

    @staticmethod
    def forward(grad, mask, backend: str, shape: torch.Size, memory_format: torch.memory_format) -> torch.Tensor:
        return ops.backward(backend, grad, mask, shape, memory_format)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(inputs[1])
        ctx.save_for_forward(inputs[1])
        ctx.layout = inputs[2:]

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


def masked_grad(
    grad: torch.Tensor, mask: torch.Tensor, backend: str, shape: torch.Size, memory_format: torch.memory_format
) -> torch.Tensor:
    """HeLU's backward as a differentiable node: ``grad`` where ``mask`` (from ``backend``) is set, else +0.0.

    A plain first-order backward (grad mode off, no transform, no tangent) calls the kernel directly: no
    node to record, and no apply overhead (about 25 us measured on a 2-core CPU).
    """
    plain = not (torch.is_grad_enabled() or torch.compiler.is_compiling() or _transforms_active())
    if plain and forward_ad.unpack_dual(grad).tangent is None:
        return ops.backward(backend, grad, mask, shape, memory_format)
    if torch.compiler.is_compiling():
        node = _CompiledMaskedGrad
    else:
        node = MaskedGrad if _transforms_active() else _EagerMaskedGrad
    return node.apply(grad, mask, backend, shape, memory_format)


# --- the forward: relu(x) and the mask ----------------------------------------------------------------------


class _CompiledHeLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, alpha: float, backend: str) -> torch.Tensor:
        y, mask = ops.forward(backend, x, alpha)
        _context(ctx, mask, backend, y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (mask,) = ctx.saved_tensors
        return masked_grad(grad, mask, *ctx.layout), None, None


class _EagerHeLU(_CompiledHeLU):
    @staticmethod
    def jvp(ctx, x_tangent: torch.Tensor, *_):
        (mask,) = ctx.saved_tensors
        return masked_grad(x_tangent, mask, *ctx.layout)


class HeLUFunction(torch.autograd.Function):
    """HeLU's node under ``torch.func`` transforms; returns ``(relu(x), mask)``, saves only the mask."""

    @staticmethod
    def forward(x: torch.Tensor, alpha: float, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        return ops.forward(backend, x, alpha)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        y, mask = output
        ctx.mark_non_differentiable(mask)
        _context(ctx, mask, inputs[2], y)

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
        y, mask = HeLUFunction.apply(x, alpha, "torch")
        return (y, mask), (in_dims[0], in_dims[0])


def helu_node(x: torch.Tensor, alpha: float, backend: str) -> torch.Tensor:
    """``relu(x)`` through HeLU's autograd node, run by ``backend``, for whichever autograd mode is active."""
    if torch.compiler.is_compiling():
        return _CompiledHeLU.apply(x, alpha, backend)
    if _transforms_active():
        return HeLUFunction.apply(x, alpha, backend)[0]
    return _EagerHeLU.apply(x, alpha, backend)
