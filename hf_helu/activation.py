"""HeLU, the hysteresis ReLU: ReLU's forward with the backward threshold moved from 0 to -alpha.

    forward:   y = relu(z)                 (bit-identical to torch.relu)
    backward:  dz = dy  where z > -alpha,  else 0

The backward needs to know where ``z > -alpha``, which ReLU's output cannot tell, so the autograd
node saves a mask (1 bit or 1 byte per element, from the kernels in :mod:`hf_helu.ops`) and never the
float input. Without autograd (``torch.no_grad()``, a module in eval mode) HeLU is plain ``torch.relu``: no node,
no mask.

Every autograd mode gets HeLU's derivative: backward (``grad`` where the mask is set), double backward
and ``create_graph=True`` (the backward is itself a node applying the same mask, as ReLU's is), forward
mode (``forward_ad``, ``torch.func.jvp``/``jacfwd``: tangent where the mask is set) and the torch.func
transforms (``grad``, ``vjp``, ``jacrev``, ``hessian``, ``vmap``), through one node (:mod:`hf_helu.ops.nodes`)
that ``torch.compile`` traces whole.
"""

from __future__ import annotations

import math
import numbers
import re

import torch
from torch import nn
from torch.autograd import forward_ad

from hf_helu import ops
from hf_helu.ops import nodes

DEFAULT_ALPHA = 0.05
ACTIVATION_NAME = "helu"
# What repr(float) writes for a finite alpha >= 0 (``0.05``, ``10.0``, ``1e-05``, ``1e+16``), and nothing else:
# float() would also take "1_0", " 0.1", "+0.1", "nan".
_PLAIN_DECIMAL = re.compile(r"[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?", re.ASCII)


def _short_repr(value: object) -> str:
    """``repr(value)``, its ends only when long (an int of thousands of digits; repr may even refuse one)."""
    try:
        text = repr(value)
    except ValueError:  # int beyond sys.get_int_max_str_digits()
        return f"an integer of {value.bit_length()} bits"
    return text if len(text) <= 40 else f"{text[:20]}...{text[-10:]} ({len(text)} characters)"


def validate_alpha(alpha: object) -> float:
    """Return ``alpha`` as a float, or raise naming the bad value."""
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"HeLU alpha must be a real number >= 0, got {alpha!r} of type {type(alpha).__name__}")
    try:
        value = float(alpha)
    except OverflowError:  # an int or Fraction beyond float's range (10**400)
        too_large = f"got {_short_repr(alpha)} (too large for a float)"
        raise ValueError(f"HeLU alpha must be a finite number >= 0, {too_large}") from None
    if math.isnan(value) or math.isinf(value):
        raise ValueError(f"HeLU alpha must be a finite number >= 0, got {alpha!r}")
    if value < 0:
        raise ValueError(f"HeLU alpha must be >= 0 (the backward threshold is -alpha), got {alpha!r}")
    return value


def _check_input(x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"helu expects a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"helu expects a floating-point tensor, got dtype {x.dtype}")
    return x


def _needs_node(x: torch.Tensor) -> bool:
    """True unless no derivative of HeLU can be taken: grad mode off and no forward-mode tangent.

    With grad mode on, an input that does not require grad still takes the node: under ``torch.func.vmap`` a
    batched tensor reports ``requires_grad=False`` even inside ``torch.func.grad``, and there is no public test
    for one. The cost is a mask computed for nothing in that rare eager case.
    """
    if torch.is_grad_enabled():
        return True
    return forward_ad.unpack_dual(x).tangent is not None


def helu(x: torch.Tensor, alpha: float = DEFAULT_ALPHA, backend: str | None = None) -> torch.Tensor:
    """HeLU of ``x``: ``torch.relu(x)`` forward, gradient passed where ``x > -alpha``.

    ``backend`` forces a kernel ("triton", "c" or "torch"); by default ("auto", or ``HF_HELU_BACKEND``
    when set) the fastest one that supports the input is chosen (see :mod:`hf_helu.ops`).
    """
    alpha = validate_alpha(alpha)
    _check_input(x)
    if _needs_node(x):
        return nodes.helu_node(x, alpha, ops.resolve(x, backend))
    return torch.relu(x)


class HeLU(nn.Module):
    """HeLU as a module, the way ``transformers.activations`` builds ``ACT2FN["helu"]``.

    In eval mode it is exactly ``nn.ReLU`` (no mask is saved even if gradients flow). Under
    ``torch.jit.script`` it compiles to ``torch.relu`` for eval mode; a scripted module in training
    mode raises (TorchScript cannot run the autograd Function).
    """

    def __init__(self, alpha: float = DEFAULT_ALPHA, backend: str | None = None):
        super().__init__()
        self.alpha = validate_alpha(alpha)
        if backend is not None:
            ops.check_name(backend)
        else:
            ops.check_env()
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            if not x.is_floating_point():
                raise TypeError(f"helu expects a floating-point tensor, got dtype {x.dtype}")
            return torch.relu(x)
        if torch.jit.is_scripting():
            raise RuntimeError(
                "a TorchScript HeLU runs in eval mode only, where it is torch.relu: TorchScript cannot run HeLU's "
                "autograd node, so train the eager module and call .eval() on the scripted one"
            )
        return self._train_forward(x)

    @torch.jit.unused
    def _train_forward(self, x):  # no annotations: TorchScript cannot read this module's postponed ones
        """HeLU with its mask-saving autograd node; TorchScript compiles this to a raise."""
        return helu(x, self.alpha, self.backend)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


def activation_name(alpha: float = DEFAULT_ALPHA) -> str:
    """The ``hidden_act`` string for a HeLU with ``alpha``: ``"helu"`` or e.g. ``"helu_0.1"``."""
    alpha = validate_alpha(alpha)
    return ACTIVATION_NAME if alpha == DEFAULT_ALPHA else f"{ACTIVATION_NAME}_{alpha!r}"


def parse_activation_name(name: object) -> float | None:
    """Alpha encoded in an activation name (``"helu"`` -> 0.05, ``"helu_0.1"`` -> 0.1), else None.

    The alpha must be a plain decimal as :func:`activation_name` writes it (``0.1``, ``1e-05``): no sign,
    spaces, underscores, ``nan`` or ``inf``. Raises ``ValueError`` for a HeLU name that does not hold one.
    """
    if not isinstance(name, str):
        return None
    if name == ACTIVATION_NAME:
        return DEFAULT_ALPHA
    prefix = ACTIVATION_NAME + "_"
    if not name.startswith(prefix):
        return None
    text = name[len(prefix) :]
    if _PLAIN_DECIMAL.fullmatch(text) is None:
        raise ValueError(
            f"activation name {name!r} is not a HeLU name: expected 'helu' or 'helu_<alpha>' with alpha a plain "
            "decimal >= 0 such as 'helu_0.1' or 'helu_1e-05'"
        )
    return validate_alpha(float(text))
