"""Where each architecture keeps its activations: the FFN activation of every layer, and the others.

Two questions are answered separately, each by one generic mechanism:

* **Which activation modules does a config attribute build?** A probe builds the model's class on the
  ``meta`` device (no memory, no weights) from a copy of its config in which every string attribute
  that names an activation (``hidden_act="gelu"``, ``feat_extract_activation``, ...) is replaced by a
  unique marker ``"helu_<1001+i>"``; each HeLU module of the probe then names the attribute that built
  it. This is exact: BERT's ``hidden_act`` also builds the MLM head transform, ELECTRA's generator head
  hard-codes ``"gelu"`` (not config-driven, so not a site), Wav2Vec2's ``feat_extract_activation`` also
  builds the positional conv embedding. Only top-level config attributes are probed (not sub-configs).
* **Which of those is the FFN activation of a transformer layer?** A small per-family table (regex of
  the activation inside one layer of the stack + the FFN's output projection) for the tested families,
  and for any other model a fallback: an activation module inside a layer stack (a ``.N.`` segment) that
  sits in a block named like mlp/ffn/intermediate/feed_forward/DenseReluDense, or directly in the layer
  beside a known output projection (``fc2``, ``ffn_output``, ...).

Notes per family (all checked by ``tests/test_families.py`` and ``tests/test_patching.py``):

* ALBERT shares one layer module across all ``num_hidden_layers``: it has ``num_hidden_groups *
  inner_group_num`` FFN sites (1 by default), whose hooks fire once per application.
* Whisper and T5 have an encoder and a decoder stack: twice as many sites, and layer index ``i``
  names layer ``i`` of both stacks.
* Gated FFNs (``gated=True``): LLaMA ``down_proj(act_fn(gate_proj(x)) * up_proj(x))``, T5 v1.1
  ``wo(act(wi_0(x)) * wi_1(x))``, ModernBERT ``Wo(act(gate) * up)``. The site is the activation of the
  gate; the output projection is the down projection consuming ``act(gate) * up``.
* T5's activation is built from ``dense_act_fn``, which its config derives from ``feed_forward_proj``;
  :func:`set_config_activation` writes both (``"gated-gelu"`` -> ``"gated-helu"``).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import activations

from hf_helu.activation import ACTIVATION_NAME, HeLU

Scope = str | Sequence[int] | Callable[[str], bool]

SCOPES = ("ffn", "all")


@dataclass(frozen=True)
class ActivationSite:
    """One place in a model where an activation sits: its module, and what it feeds.

    The one site type of hf_helu: patching, conversion and the diagnostics all work on these.
    """

    name: str  # qualified module name, e.g. "bert.encoder.layer.3.intermediate.intermediate_act_fn"
    module: nn.Module  # the activation module itself (stale after a patch: find the sites again)
    layer_index: int | None  # index in its layer stack (per stack: encoder and decoder both count from 0)
    kind: str  # "ffn" or "other" (conv feature extractor, prediction-head transform, ...)
    config_attr: str | None  # config attribute that builds this module (e.g. "hidden_act"), None if hard-coded
    output_projection: str | None  # Linear/Conv1D consuming the FFN's activated states (gated: the down proj)
    gated: bool  # the activation's output is multiplied by another projection (SwiGLU/GeGLU)


@dataclass(frozen=True)
class Family:
    """Where one architecture keeps its FFN activation, relative to one layer of its stack(s)."""

    config_attr: str  # the config attribute that names the FFN activation
    stack: str  # regex of the layer stack (a ModuleList) relative to its parent, e.g. r"encoder\.layer"
    module: str  # regex of the FFN activation module's path inside one layer
    output_projection: str  # path inside the layer; may use the named groups of ``module``
    gated: bool | Callable[[object], bool] = False

    def pattern(self) -> re.Pattern[str]:
        return re.compile(rf"(?:^|\.)(?P<layer>{self.stack}\.(?P<index>\d+))\.{self.module}$")


_BERT_LIKE = Family("hidden_act", r"layer", r"intermediate\.intermediate_act_fn", "output.dense")
_WAV2VEC2_LIKE = Family("hidden_act", r"layers", r"feed_forward\.intermediate_act_fn", "feed_forward.output_dense")

FAMILIES: dict[str, Family] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "deberta-v2": _BERT_LIKE,
    "distilbert": Family("activation", r"layer", r"ffn\.activation", "ffn.lin2"),
    "albert": Family("hidden_act", r"albert_layer_groups\.(?P<group>\d+)\.albert_layers", r"activation", "ffn_output"),
    "modernbert": Family("hidden_activation", r"layers", r"mlp\.act", "mlp.Wo", gated=True),
    "wav2vec2": _WAV2VEC2_LIKE,
    "hubert": _WAV2VEC2_LIKE,
    "wavlm": _WAV2VEC2_LIKE,
    "whisper": Family("activation_function", r"layers", r"activation_fn", "fc2"),
    "gpt2": Family("activation_function", r"h", r"mlp\.act", "mlp.c_proj"),
    "t5": Family(
        "dense_act_fn",
        r"block",
        r"layer\.(?P<sub>\d+)\.DenseReluDense\.act",
        "layer.{sub}.DenseReluDense.wo",
        gated=lambda config: bool(getattr(config, "is_gated_act", False)),
    ),
    "vit": Family("hidden_act", r"layers", r"mlp\.activation_fn", "mlp.fc2"),
    "llama": Family("hidden_act", r"layers", r"mlp\.act_fn", "mlp.down_proj", gated=True),
}

# Generic fallback: names of FFN blocks, of FFN output projections, and of the gate projections.
FFN_BLOCK_NAMES = frozenset(
    {"mlp", "ffn", "feed_forward", "feedforward", "intermediate", "densereludense", "ff", "ffn_layer"}
)
OUTPUT_PROJECTION_NAMES = (
    "down_proj",
    "wo",
    "Wo",
    "fc2",
    "c_proj",
    "lin2",
    "output_dense",
    "ffn_output",
    "dense_4h_to_h",
    "w2",
    "fc_out",
)
GATE_NAMES = ("gate_proj", "wi_0", "w3")

# Module classes that are activations: everything transformers' ACT2FN builds, the torch ones, HeLU.
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = tuple(
    {value[0] if isinstance(value, tuple) else value for value in activations.ACT2CLS.values()}
    | {nn.ReLU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Mish, nn.LeakyReLU, nn.ELU, nn.SELU, nn.Softplus}
    | {nn.Hardswish, nn.ReLU6, HeLU}
)
# Identity-like modules are activations only where a config attribute builds them (found by the probe).
_NOT_STRUCTURAL = (nn.Identity, activations.LinearActivation)


def supported_families() -> tuple[str, ...]:
    """``model_type`` of the families with a table entry (others go through the generic fallback)."""
    return tuple(FAMILIES)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside a PEFT ``PeftModel`` or a ``torch.compile`` wrapper."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
    return model


def config_activation(config: object, attr: str) -> object:
    """Value of the activation attribute ``attr`` of ``config``."""
    return getattr(config, attr)


def set_config_activation(config: object, attr: str, value: str) -> list[tuple[str, object, object]]:
    """Set activation attribute ``attr`` to ``value``, keeping attributes derived from it consistent.

    T5-style configs derive ``dense_act_fn`` (and ``is_gated_act``) from ``feed_forward_proj`` at init,
    while a saved ``dense_act_fn`` wins at load: both are written, ``"gated-"`` kept for gated FFNs.
    Returns the ``(attribute, old, new)`` writes that changed something.
    """
    writes = [(attr, value)]
    if attr == "dense_act_fn" and isinstance(getattr(config, "feed_forward_proj", None), str):
        writes.append(("feed_forward_proj", f"gated-{value}" if getattr(config, "is_gated_act", False) else value))
    changes = []
    for name, new in writes:
        old = getattr(config, name)
        if old != new:
            setattr(config, name, new)
            changes.append((name, old, new))
    return changes


def _activation_attrs(config: object) -> list[str]:
    """Top-level config attributes whose value is a string transformers' ACT2FN resolves."""
    names = []
    for attr, value in config.to_dict().items():
        if isinstance(value, str) and hasattr(config, attr) and value in activations.ACT2FN:
            names.append(attr)
    return names


def _probe(model: nn.Module, config: object, attrs: list[str]) -> dict[str, str]:
    """Build ``type(model)`` on the meta device with each of ``attrs`` set to a marker HeLU alpha."""
    probe_config = copy.deepcopy(config)
    for i, attr in enumerate(attrs):
        setattr(probe_config, attr, f"{ACTIVATION_NAME}_{1001 + i}")
    with torch.device("meta"):
        probe = type(model)(probe_config)
    built = {}
    for name, module in probe.named_modules():
        if isinstance(module, HeLU) and 1001 <= module.alpha < 1001 + len(attrs):
            built[name] = attrs[int(module.alpha) - 1001]
    return built


def config_built_activations(model: nn.Module) -> dict[str, str] | None:
    """``{qualified module name: config attribute}`` for every activation the model's config builds.

    ``None`` when the model has no config or its class cannot be rebuilt from its config.
    """
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    attrs = _activation_attrs(config)
    if not attrs:
        return {}
    try:
        return _probe(model, config, attrs)
    except Exception:
        pass
    # Some attribute broke the build (a string that is not really an activation): probe one at a time.
    built: dict[str, str] = {}
    any_ok = False
    for attr in attrs:
        try:
            built.update(_probe(model, config, [attr]))
            any_ok = True
        except Exception:
            continue
    return built if any_ok else None


def _split(name: str) -> list[str]:
    return name.split(".") if name else []


def _first_index(name: str) -> int | None:
    for part in _split(name):
        if part.isdigit():
            return int(part)
    return None


def _fallback_ffn(name: str, modules: dict[str, nn.Module]) -> tuple[int, str | None, bool] | None:
    """Generic FFN detection: ``(layer_index, output_projection, gated)`` or None if not an FFN site."""
    parts = _split(name)
    digits = [i for i, part in enumerate(parts) if part.isdigit()]
    if not digits:
        return None
    first = digits[0]
    parent_name = ".".join(parts[:-1])
    parent = modules.get(parent_name)
    children = dict(parent.named_children()) if parent is not None else {}
    projection = next((f"{parent_name}.{p}" for p in OUTPUT_PROJECTION_NAMES if p in children), None)
    in_block = any(part.lower() in FFN_BLOCK_NAMES for part in parts[first + 1 : -1])
    directly_in_layer = parts[-2].isdigit()  # the parent is an element of a layer stack (Whisper, ALBERT)
    if not (in_block or (directly_in_layer and projection is not None)):
        return None
    if projection is None and parts[-2].lower() == "intermediate":
        layer = ".".join(parts[:-2])
        for candidate in (f"{layer}.output.dense", f"{layer}.output_dense"):
            if candidate in modules:
                projection = candidate
                break
    return (
        int(parts[first]),
        projection,
        any(g in children for g in GATE_NAMES) or _fused_gate(children, modules, projection),
    )


def _fused_gate(children: dict[str, nn.Module], modules: dict[str, nn.Module], projection: str | None) -> bool:
    """A fused up+gate projection (ModernBERT's ``Wi``) outputs twice what the down projection takes."""
    down = modules.get(projection) if projection else None
    if not isinstance(down, nn.Linear):
        return False
    return any(
        isinstance(m, nn.Linear) and m is not down and m.out_features == 2 * down.in_features for m in children.values()
    )


def _table_ffn(
    family: Family, name: str, config: object, modules: dict[str, nn.Module]
) -> tuple[int, str | None, bool] | None:
    match = family.pattern().search(name)
    if match is None:
        return None
    index = int(match["index"])
    groups = match.groupdict()
    if groups.get("group") is not None:  # ALBERT: layer groups, each with inner_group_num layers
        index += int(groups["group"]) * int(getattr(config, "inner_group_num", 1))
    layer = name[: match.end("layer")]
    projection = f"{layer}.{family.output_projection.format(**groups)}"
    gated = family.gated(config) if callable(family.gated) else family.gated
    return index, projection if projection in modules else None, gated


def all_activation_sites(model: nn.Module, use_table: bool = True) -> list[ActivationSite]:
    """Every FFN activation and every config-built activation of ``model``, in module order.

    ``use_table=False`` skips the per-family table (tests check the generic fallback agrees with it).
    """
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    built = config_built_activations(model) or {}
    family = FAMILIES.get(getattr(config, "model_type", None)) if use_table else None
    modules = dict(model.named_modules())
    sites = []
    for name, module in modules.items():
        attr = built.get(name)
        structural = isinstance(module, ACTIVATION_TYPES) and not isinstance(module, _NOT_STRUCTURAL)
        if attr is None and not structural:
            continue
        ffn = _table_ffn(family, name, config, modules) if family else _fallback_ffn(name, modules)
        if ffn is not None:
            index, projection, gated = ffn
            sites.append(ActivationSite(name, module, index, "ffn", attr, projection, gated))
        elif attr is not None:
            sites.append(ActivationSite(name, module, _first_index(name), "other", attr, None, False))
    return sites


def _select_by_predicate(sites: list[ActivationSite], scope: Callable[[str], bool]) -> list[ActivationSite]:
    chosen = []
    for site in sites:
        verdict = scope(site.name)
        if not isinstance(verdict, bool):
            raise TypeError(f"scope predicate must return a bool, got {verdict!r} for {site.name!r}")
        if verdict:
            chosen.append(site)
    return chosen


def _select_by_layers(sites: list[ActivationSite], scope: Sequence[int]) -> list[ActivationSite]:
    indices = list(scope)
    if not indices:
        raise ValueError("scope is an empty list of layer indices; expected at least one index")
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"scope layer indices must be ints, got {index!r} in {scope!r}")
    ffn = [s for s in sites if s.kind == "ffn"]
    available = sorted({s.layer_index for s in ffn})
    missing = sorted(set(indices) - set(available))
    if missing and ffn:
        raise ValueError(f"scope names layer(s) {missing} but the FFN layers are {available}")
    return [s for s in ffn if s.layer_index in set(indices)]


def select_sites(sites: list[ActivationSite], scope: Scope) -> list[ActivationSite]:
    """The sites ``scope`` names: "ffn", "all", a sequence of layer indices (FFN sites), or a predicate."""
    if isinstance(scope, str):
        if scope == "ffn":
            return [s for s in sites if s.kind == "ffn"]
        if scope == "all":
            return list(sites)
        raise ValueError(f"scope must be one of {SCOPES}, a sequence of layer indices or a predicate, got {scope!r}")
    if callable(scope):
        return _select_by_predicate(sites, scope)
    if isinstance(scope, Sequence):
        return _select_by_layers(sites, scope)
    raise TypeError(
        f"scope must be 'ffn', 'all', a sequence of layer indices or a callable on module names, "
        f"got {type(scope).__name__}"
    )


def find_activation_sites(model: nn.Module, scope: Scope = "ffn") -> list[ActivationSite]:
    """The activation sites of ``model`` that ``scope`` selects, ordered by layer (module order).

    ``scope``: ``"ffn"`` (the FFN activation of every layer, default), ``"all"`` (FFN activations plus
    every other activation built from the config, e.g. Wav2Vec2's conv feature extractor), a sequence
    of layer indices (FFN sites of those layers), or a predicate on qualified module names (any site).
    Names are relative to the transformers model (inside a PEFT or ``torch.compile`` wrapper).
    Returns ``[]`` when nothing matches; :func:`hf_helu.patch_model` turns that into an error.
    """
    return select_sites(all_activation_sites(model), scope)
