"""Turn a ReLU/HeLU model's FFN zeros into speed: swap its FFN blocks for sparse ones at run time, and back.

``handle = hf_helu.sparse_inference(model)`` replaces, in place, every FFN of a ReLU or HeLU model (patched
by :func:`hf_helu.patch_model` or exported to plain ReLU) with the modules of :mod:`hf_helu.sparse.modules`:

* gated (LLaMA, Qwen2, Mistral: ``down(act(gate) * up)``): the whole MLP block becomes a
  :class:`~hf_helu.sparse.modules.GatedSparseFFN` (dense gate, then the up and down rows of the active units);
* plain (BERT/RoBERTa, GPT-2, Whisper: ``down(act(up))``): the down projection's slot computes the whole FFN
  (:class:`~hf_helu.sparse.modules.PlainSparseFFN`), the up projection's slot passes its input on, the
  activation's becomes ``nn.Identity``.

Nothing saved changes and no memory is added: the parameters keep their names and values (``state_dict`` and
``save_pretrained`` write the stock model); the FFN weights the kernel reads by unit are stored in that layout
while swapped (a Linear down projection column-major), so the kernel reads the parameters themselves and can
never see stale weights. ``handle.remove()`` or :func:`dense_inference` puts the original modules and layouts
back. Like Liger-Kernel's ``apply_liger_kernel_to_*``, this is a runtime swap: call it again after loading.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_helu.activation import HeLU
from hf_helu.errors import UsageError
from hf_helu.families import ActivationSite, find_activation_sites, unwrap_model
from hf_helu.sparse import kernel as sparse_kernel
from hf_helu.sparse.modules import (
    DEFAULT_MAX_ROWS,
    DEFAULT_MIN_SPARSITY,
    MODES,
    DeferredProjection,
    Dispatch,
    GatedSparseFFN,
    PlainSparseFFN,
    SparseFFN,
    StepClock,
)

HANDLE_ATTR = "_hf_helu_sparse_inference"
_PROJECTIONS = (nn.Linear, Conv1D)


@dataclass
class SparseInference:
    """What :func:`sparse_inference` swapped, what it costs in memory, and what it has measured; ``print`` it."""

    model: nn.Module
    blocks: tuple[str, ...]  # qualified name of each FFN block swapped
    modules: tuple[SparseFFN, ...]
    kernel: str | None  # None when the C kernel is in use, else why not (then the dense modules run)
    _undo: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list, repr=False)

    @property
    def sparsity(self) -> list[float | None]:
        """Per block, the share of FFN activations measured at zero (decode rows; None before any)."""
        return [m.dispatch.mean_sparsity for m in self.modules]

    @property
    def sparse_calls(self) -> int:
        return sum(m.dispatch.sparse_calls for m in self.modules)

    @property
    def dense_calls(self) -> int:
        return sum(m.dispatch.dense_calls for m in self.modules)

    @property
    def active(self) -> bool:
        return getattr(self.model, HANDLE_ATTR, None) is self

    def remove(self) -> None:
        """Put the original modules back (the model is then exactly what it was before the swap)."""
        if not self.active:
            return
        for module in self.modules:
            module.release()
        for parent, name, original in reversed(self._undo):
            setattr(parent, name, original)
        self._undo.clear()
        delattr(self.model, HANDLE_ATTR)

    def __str__(self) -> str:
        kernel = "C kernel" if self.kernel is None else f"dense modules ({self.kernel})"
        return (
            f"{type(self.model).__name__}: {len(self.blocks)} FFN block(s) sparse ({kernel}); "
            f"calls sparse {self.sparse_calls}, dense {self.dense_calls}"
        )


def _check_options(mode: str, max_rows: int, min_sparsity: float) -> None:
    if mode not in MODES:
        raise UsageError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise UsageError(f"max_rows must be an int >= 1 (rows per call that may run sparse), got {max_rows!r}")
    if not isinstance(min_sparsity, (int, float)) or not 0.0 <= min_sparsity <= 1.0:
        raise UsageError(f"min_sparsity must be a number in [0, 1], got {min_sparsity!r}")


def _check_model(model: object) -> nn.Module:
    if not isinstance(model, nn.Module) or not hasattr(unwrap_model(model), "config"):
        raise UsageError(f"sparse_inference expects a transformers model, got {type(model).__name__}")
    inner = unwrap_model(model)
    if inner.training:
        raise UsageError(
            f"{type(inner).__name__} is in training mode; sparse_inference is for inference only (the sparse "
            "path has no backward): call model.eval() first"
        )
    if getattr(inner, HANDLE_ATTR, None) is not None:
        raise UsageError(f"{type(inner).__name__} already runs sparse FFNs; call hf_helu.dense_inference(model) first")
    return inner


def _ffn_sites(model: nn.Module) -> list[ActivationSite]:
    sites = find_activation_sites(model)
    model_type = getattr(model.config, "model_type", None)
    if not sites:
        raise UsageError(f"{type(model).__name__} (model_type {model_type!r}) has no FFN activation hf_helu can find")
    for site in sites:
        if not isinstance(site.module, (HeLU, nn.ReLU)):
            raise UsageError(
                f"{site.name} is {type(site.module).__name__}, not ReLU/HeLU: sparse inference needs exact zeros "
                f"in the FFN (patch the model with hf_helu.patch_model or convert it to HeLU first)"
            )
        if site.output_projection is None:
            raise UsageError(f"{site.name}: no FFN output projection found in {type(model).__name__}")
    return sites


def _in_features(module: nn.Module) -> int:
    return module.weight.shape[0] if isinstance(module, Conv1D) else module.weight.shape[1]


def _out_features(module: nn.Module) -> int:
    return module.weight.shape[1] if isinstance(module, Conv1D) else module.weight.shape[0]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return model.get_submodule(parent_name), child


def _plan_gated(model: nn.Module, site: ActivationSite, dispatch: Dispatch) -> list[tuple[nn.Module, str, nn.Module]]:
    block_name = site.name.rpartition(".")[0]
    block = model.get_submodule(block_name)
    parts = [getattr(block, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    if getattr(block, "act_fn", None) is not site.module or not all(isinstance(p, nn.Linear) for p in parts):
        raise UsageError(
            f"{block_name} ({type(block).__name__}) is a gated FFN without LLaMA's gate_proj/up_proj/down_proj/"
            "act_fn layout; sparse_inference supports that layout (LLaMA, Qwen2, Mistral) for gated FFNs"
        )
    parent, child = _parent(model, block_name)
    return [(parent, child, GatedSparseFFN(block, dispatch))]


def _plan_plain(model: nn.Module, site: ActivationSite, dispatch: Dispatch) -> list[tuple[nn.Module, str, nn.Module]]:
    act_parent, act_child = _parent(model, site.name)
    down = model.get_submodule(site.output_projection)
    ups = [
        (name, m)
        for name, m in act_parent.named_children()
        if isinstance(m, _PROJECTIONS) and m is not down and _out_features(m) == _in_features(down)
    ]
    if not isinstance(down, _PROJECTIONS) or len(ups) != 1:
        raise UsageError(
            f"{site.name}: cannot tell the FFN's up projection (Linear/Conv1D beside the activation feeding "
            f"{site.output_projection}) in {type(act_parent).__name__}; found {[n for n, _ in ups]}"
        )
    up_name, up = ups[0]
    down_parent, down_child = _parent(model, site.output_projection)
    deferred = DeferredProjection(up)
    return [
        (act_parent, up_name, deferred),
        (act_parent, act_child, nn.Identity()),
        (down_parent, down_child, PlainSparseFFN(deferred, site.module, down, dispatch)),
    ]


def sparse_inference(
    model: nn.Module,
    mode: str = "auto",
    max_rows: int = DEFAULT_MAX_ROWS,
    min_sparsity: float = DEFAULT_MIN_SPARSITY,
) -> SparseInference:
    """Swap the FFN blocks of a ReLU/HeLU ``model`` (in eval mode) for sparse ones, in place; returns the handle.

    ``mode="auto"`` runs the fused CPU kernel for calls of at most ``max_rows`` rows (batch x new tokens: decode
    steps) while the measured share of inactive units is at least ``min_sparsity`` and its measured call time is
    below the dense ops' (both re-measured as the run goes), and the dense ops otherwise, so turning it on does not
    cost speed; ``"sparse"`` always takes the sparse path (the
    kernel, or torch ops where it cannot run), ``"dense"`` never. The sparse path runs without autograd only
    (``torch.no_grad``/``inference_mode``, as ``generate`` does); under autograd the dense modules run.
    Raises :class:`UsageError` before changing anything for a model in training mode, a model whose FFN
    activation is not ReLU/HeLU, or an FFN layout it does not know.
    """
    _check_options(mode, max_rows, min_sparsity)
    inner = _check_model(model)
    sites = _ffn_sites(inner)
    plan, modules, clock = [], [], StepClock()
    for site in sites:
        dispatch = Dispatch(mode=mode, max_rows=max_rows, min_sparsity=float(min_sparsity), clock=clock)
        steps = (_plan_gated if site.gated else _plan_plain)(inner, site, dispatch)
        plan.extend(steps)
        modules.append(steps[-1][2])
    try:  # the weights in the kernel's layout (values unchanged), before any module is swapped
        for module in modules:
            module.kernel_operands()
    except BaseException:
        for module in modules:
            module.release()
        raise
    undo = []
    for parent, name, new in plan:
        undo.append((parent, name, getattr(parent, name)))
        new.train(False)
        setattr(parent, name, new)
    why = None if sparse_kernel.available() else "the sparse FFN CPU kernel cannot be built here"
    handle = SparseInference(inner, tuple(s.name.rpartition(".")[0] for s in sites), tuple(modules), why, undo)
    setattr(inner, HANDLE_ATTR, handle)
    return handle


def dense_inference(model: nn.Module) -> bool:
    """Undo :func:`sparse_inference` on ``model``; returns False when it was not swapped."""
    handle = getattr(unwrap_model(model), HANDLE_ATTR, None)
    if handle is None:
        return False
    handle.remove()
    return True
