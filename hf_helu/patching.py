"""Put HeLU into the FFN blocks of a transformers model, and take it out again for deployment.

The patch lives in two places that always agree: the modules (replaced in place) and the config, so
that ``save_pretrained`` + ``from_pretrained`` (with ``hf_helu`` imported) rebuilds the same model.

* A config attribute is rewritten (``hidden_act="gelu"`` -> ``"helu"`` / ``"helu_0.1"``) when every
  module it builds holds the same new activation. With ``scope="ffn"`` every FFN activation is patched,
  and so is every other module built from the same attribute (BERT/ALBERT/ELECTRA/DistilBERT MLM or
  discriminator head transforms share ``hidden_act``): those are patched too and reported with the
  reason, because one string cannot say "HeLU in the FFN, GELU in the head". The plain round trip is
  then exact.
* A partial patch (layer indices, a predicate) that no config string can express is recorded in
  ``config.hf_helu = {"sites": {module name: activation name}}``. ``from_pretrained`` ignores it;
  call :func:`reapply_patch` on the loaded model to rebuild the patched model exactly.
  :func:`export_for_inference` refuses such a model (stock transformers could not rebuild it).
* Gated FFNs: HeLU replaces the gate's activation, so LLaMA's SwiGLU ``down(silu(gate) * up)`` and T5
  v1.1's GeGLU (``"gated-gelu"``) become ``down(helu(gate) * up)``: a ReGLU at inference (T5's config
  becomes ``"gated-helu"``, then ``"gated-relu"`` on export), whose gate passes gradient where
  ``gate > -alpha``. The up projection is untouched.

HeLU's forward is exactly ReLU, so :func:`unpatch_model` / :func:`export_for_inference` swap each HeLU
for ``nn.ReLU`` and write ``"relu"`` into the config without changing any output.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import warnings
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import activations

from hf_helu.activation import DEFAULT_ALPHA, HeLU, activation_name, parse_activation_name, validate_alpha
from hf_helu.errors import UsageError
from hf_helu.families import (
    FAMILIES,
    ActivationSite,
    Scope,
    all_activation_sites,
    config_activation,
    select_sites,
    set_config_activation,
    unwrap_model,
)
from hf_helu.rollback import restore_on_error

OVERRIDES_ATTR = "hf_helu"


class UnconvertedSwapWarning(UserWarning):
    """:func:`patch_model` swapped a pretrained non-ReLU FFN activation for HeLU without any conversion."""


def _warn_unconverted(model_class: str, changed: list[SiteChange]) -> None:
    """One warning when FFN activations that were not ReLU became HeLU: the model's outputs changed."""
    swapped = [c for c in changed if c.kind == "ffn" and c.before != "ReLU" and parse_activation_name(c.before) is None]
    if not swapped:
        return
    names = ", ".join(sorted({c.before for c in swapped}))
    warnings.warn(
        f"patch_model swapped {len(swapped)} FFN activation(s) of {model_class} ({names}) for HeLU without "
        "conversion: a pretrained model's outputs change, often a lot (SmolLM2-135M: WikiText-2 perplexity "
        "26.9 -> 13,975). To keep its quality use hf_helu.convert_model(model, 'auto', calibration_batches=...) "
        "or `hf-helu convert SRC DST --data TEXTS` instead; ignore this for a model you will train from scratch.",
        UnconvertedSwapWarning,
        stacklevel=3,
    )


@dataclass(frozen=True)
class SiteChange:
    """One activation module replaced."""

    name: str
    kind: str  # "ffn" or "other"
    before: str  # activation name ("helu_0.1") for HeLU, else the module class ("GELUActivation")
    after: str
    reason: str  # "selected", "config attribute 'hidden_act' also builds it", "config.hf_helu"


@dataclass(frozen=True)
class PatchReport:
    """What :func:`patch_model`, :func:`unpatch_model` or :func:`reapply_patch` did; ``print`` it."""

    model_class: str
    action: str  # "patch", "unpatch" or "reapply"
    activation: str  # the activation put in: "helu", "helu_0.1", "relu", ...
    changed: tuple[SiteChange, ...]
    unchanged: tuple[str, ...]  # selected modules that already held ``activation``
    config_changes: tuple[tuple[str, object, object], ...]  # (attribute, old value, new value)
    overrides: tuple[tuple[str, str], ...]  # (module, activation) recorded in config.hf_helu

    @property
    def num_changed(self) -> int:
        return len(self.changed)

    @property
    def needs_reapply(self) -> bool:
        """True when ``from_pretrained`` alone does not rebuild this model: use :func:`reapply_patch`."""
        return bool(self.overrides)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (what the recipes store in results.json): every field, tuples as lists, each change as
        a dict; a config value JSON cannot hold is written as its ``str``."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def __str__(self) -> str:
        lines = [
            f"{self.model_class}: {self.action} -> {self.activation}: {self.num_changed} module(s) changed, "
            f"{len(self.unchanged)} already {self.activation}"
        ]
        if self.changed:
            width = max(len(c.name) for c in self.changed)
            lines.append(f"  {'module':<{width}}  kind   {'before':<22}  after")
            for c in self.changed:
                note = "" if c.reason == "selected" else f"  ({c.reason})"
                lines.append(f"  {c.name:<{width}}  {c.kind:<5}  {c.before:<22}  {c.after}{note}")
        for attr, old, new in self.config_changes:
            lines.append(f"  config.{attr}: {old!r} -> {new!r}")
        if self.overrides:
            lines.append(
                f"  config.{OVERRIDES_ATTR} records {len(self.overrides)} module(s) the config attributes cannot "
                "express: after from_pretrained call hf_helu.reapply_patch(model)"
            )
        return "\n".join(lines)


def describe_activation(module: nn.Module) -> str:
    """A short name for an activation module: ``"helu"`` / ``"helu_0.1"`` for HeLU, else its class."""
    if isinstance(module, HeLU):
        return activation_name(module.alpha)
    return type(module).__name__


def _transformers_model(model: object, what: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} expects a torch.nn.Module (a transformers model), got {type(model).__name__}")
    inner = unwrap_model(model)
    if not hasattr(getattr(inner, "config", None), "to_dict"):
        raise TypeError(
            f"{what} expects a transformers model with a .config (PreTrainedModel, or one wrapped by PEFT or "
            f"torch.compile), got {type(inner).__name__}"
        )
    return inner


def read_overrides(config: object) -> dict[str, str]:
    """``{module name: activation name}`` recorded in ``config.hf_helu`` (empty when absent)."""
    record = getattr(config, OVERRIDES_ATTR, None)
    if record is None:
        return {}
    sites = record.get("sites") if isinstance(record, dict) else None
    if not isinstance(sites, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in sites.items()):
        raise ValueError(
            f"config.{OVERRIDES_ATTR} must be {{'sites': {{module name: activation name}}}}, got {record!r}"
        )
    return dict(sites)


def _effective(config: object, built: dict[str, str]) -> dict[str, str]:
    """Activation name each config-built or recorded module should hold, per the config."""
    names = {name: config_activation(config, attr) for name, attr in built.items()}
    names.update(read_overrides(config))
    return names


def _plan_config(
    config: object, built: dict[str, str], wanted: dict[str, str]
) -> tuple[list[tuple[str, object, object]], dict[str, str]]:
    """Config attribute changes and overrides that make the config describe ``wanted`` exactly."""
    by_attr: dict[str, list[str]] = {}
    for name, attr in built.items():
        by_attr.setdefault(attr, []).append(name)
    changes, overrides = [], {}
    for attr, names in by_attr.items():
        current = config_activation(config, attr)
        values = {wanted[name] for name in names}
        if len(values) == 1:
            value = values.pop()
            if value != current:
                changes.append((attr, current, value))
        else:
            overrides.update({name: wanted[name] for name in names if wanted[name] != current})
    overrides.update({name: value for name, value in wanted.items() if name not in built})
    return changes, overrides


def _write_config(
    config: object, changes: list[tuple[str, object, object]], overrides: dict[str, str]
) -> tuple[tuple[str, object, object], ...]:
    """Apply a plan of :func:`_plan_config`; returns every attribute write, derived ones included."""
    written = []
    for attr, _, value in changes:
        written.extend(set_config_activation(config, attr, value))
    if overrides:
        setattr(config, OVERRIDES_ATTR, {"sites": dict(sorted(overrides.items()))})
    elif hasattr(config, OVERRIDES_ATTR):
        delattr(config, OVERRIDES_ATTR)
    return tuple(written)


def _replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    new.train(old.training)
    setattr(parent, child, new)
    return old


def _built(sites: list[ActivationSite]) -> dict[str, str]:
    return {s.name: s.config_attr for s in sites if s.config_attr is not None}


def unsupported_model_error(model: nn.Module) -> UsageError:
    """The error for a model with no FFN activation hf_helu can find (naming its class and the families)."""
    model_type = getattr(model.config, "model_type", None)
    return UsageError(
        f"{type(model).__name__} (model_type {model_type!r}) has no FFN activation module that hf_helu can find. "
        f"Supported families: {', '.join(FAMILIES)}; other models work when their FFN activation is a module "
        "inside a block named mlp/ffn/intermediate/feed_forward of a layer stack."
    )


def patch_model(model: nn.Module, alpha: float = DEFAULT_ALPHA, scope: Scope = "ffn") -> PatchReport:
    """Replace, in place, the activation of every FFN block (or of ``scope``) with ``HeLU(alpha)``.

    ``scope``: ``"ffn"`` (default), ``"all"`` (also every other activation built from the config), a
    sequence of layer indices, or a predicate on module names (see
    :func:`hf_helu.families.find_activation_sites`). The config is updated so that the patch survives
    ``save_pretrained``; see the module docstring for what a partial scope records. Swapping a non-ReLU FFN
    activation warns once (:class:`UnconvertedSwapWarning`): use :func:`hf_helu.convert_model` to keep a
    pretrained model's quality. Patching twice is a
    no-op the second time (the report says 0 changed). Raises :class:`UsageError` (naming
    the model class and the supported families) when the model has no FFN activation, whatever the scope.
    When it raises, the model (modules, config) is left as it was (:mod:`hf_helu.rollback`).
    """
    alpha = validate_alpha(alpha)
    hf = _transformers_model(model, "patch_model")
    with restore_on_error(hf):
        return _patch(hf, alpha, scope)


def _patch(hf: nn.Module, alpha: float, scope: Scope) -> PatchReport:
    sites = all_activation_sites(hf)
    ffn = [s for s in sites if s.kind == "ffn"]
    if not ffn:
        raise unsupported_model_error(hf)
    selected = select_sites(sites, scope)
    if not selected:
        names = ", ".join(s.name for s in sites) or "none"
        raise UsageError(f"scope {scope!r} selects no activation of {type(hf).__name__}; its activations: {names}")
    reasons = {s.name: "selected" for s in selected}
    if isinstance(scope, str) and scope == "ffn":
        shared = {s.config_attr for s in selected if s.config_attr is not None}
        for site in sites:
            if site.config_attr in shared:
                reasons.setdefault(site.name, f"config attribute {site.config_attr!r} also builds it")
    kinds = {s.name: s.kind for s in sites}
    built = _built(sites)
    target = activation_name(alpha)
    wanted = _effective(hf.config, built)
    changed, unchanged = [], []
    for site in sites:
        if site.name not in reasons:
            continue
        wanted[site.name] = target
        current = hf.get_submodule(site.name)
        if isinstance(current, HeLU) and current.alpha == alpha:
            unchanged.append(site.name)
            continue
        _replace(hf, site.name, HeLU(alpha))
        changed.append(
            SiteChange(site.name, kinds[site.name], describe_activation(current), target, reasons[site.name])
        )
    config_changes, overrides = _plan_config(hf.config, built, wanted)
    written = _write_config(hf.config, config_changes, overrides)
    _warn_unconverted(type(hf).__name__, changed)
    return PatchReport(
        type(hf).__name__, "patch", target, tuple(changed), tuple(unchanged), written, _sorted(overrides)
    )


def _sorted(overrides: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(overrides.items()))


def _check_plain_activation(to: object) -> str:
    if not isinstance(to, str) or to not in activations.ACT2FN:
        raise ValueError(f"'to' must be an activation name transformers knows (e.g. 'relu'), got {to!r}")
    if parse_activation_name(to) is not None:
        raise ValueError(f"'to' must be a stock activation, not a HeLU name, got {to!r}")
    return to


def _unpatch_plan(hf: nn.Module, to: str):
    sites = all_activation_sites(hf)
    kinds = {s.name: s.kind for s in sites}
    built = _built(sites)
    wanted = _effective(hf.config, built)
    helus = [(name, module) for name, module in hf.named_modules() if isinstance(module, HeLU)]
    for name, _ in helus:
        wanted[name] = to
    # A HeLU the config names but that is no module (impossible unless edited by hand) still goes.
    for name, value in wanted.items():
        if parse_activation_name(value) is not None:
            wanted[name] = to
    config_changes, overrides = _plan_config(hf.config, built, wanted)
    return helus, kinds, config_changes, overrides


def unpatch_model(model: nn.Module, to: str = "relu") -> PatchReport:
    """Replace every HeLU module with ``ACT2FN[to]`` and rewrite the config the same way.

    With ``to="relu"`` (default) outputs do not change: HeLU's forward is ReLU.
    """
    to = _check_plain_activation(to)
    hf = _transformers_model(model, "unpatch_model")
    helus, kinds, config_changes, overrides = _unpatch_plan(hf, to)
    changed = []
    with restore_on_error(hf):
        for name, module in helus:
            _replace(hf, name, activations.ACT2FN[to])
            changed.append(SiteChange(name, kinds.get(name, "other"), describe_activation(module), to, "selected"))
        written = _write_config(hf.config, config_changes, overrides)
    return PatchReport(type(hf).__name__, "unpatch", to, tuple(changed), (), written, _sorted(overrides))


def export_for_inference(model: nn.Module) -> PatchReport:
    """HeLU -> ``nn.ReLU`` and ``"relu"`` in the config, so the saved model needs only stock transformers.

    Raises (changing nothing) when the result could not be rebuilt from its config alone: a partial
    patch leaves some modules of a config attribute ReLU and others e.g. GELU.
    """
    hf = _transformers_model(model, "export_for_inference")
    _, _, config_changes, overrides = _unpatch_plan(hf, "relu")
    if overrides:
        listed = ", ".join(f"{name} ({value})" for name, value in sorted(overrides.items()))
        raise UsageError(
            f"cannot export {type(hf).__name__} for stock transformers: these modules would differ from what its "
            f"config builds, and a config string cannot name per-module activations: {listed}. Patch a whole "
            "scope ('ffn' or 'all'), or keep hf_helu and use save_pretrained + hf_helu.reapply_patch."
        )
    exported = copy.deepcopy(hf.config)
    _write_config(exported, config_changes, overrides)
    for attr, value in exported.to_dict().items():
        if parse_activation_name(value) is not None:
            raise UsageError(
                f"cannot export {type(hf).__name__}: config.{attr}={value!r} names HeLU but builds no module "
                "hf_helu can find; set it to a stock activation first"
            )
    return unpatch_model(model, "relu")


def reapply_patch(model: nn.Module) -> PatchReport:
    """Rebuild the modules recorded in ``config.hf_helu`` (a partial patch) after ``from_pretrained``.

    A no-op report for a model whose config alone describes it (a whole-scope patch, or no patch).
    """
    hf = _transformers_model(model, "reapply_patch")
    overrides = read_overrides(hf.config)
    kinds = {s.name: s.kind for s in all_activation_sites(hf)} if overrides else {}
    changed, unchanged = [], []
    for name, value in sorted(overrides.items()):
        try:
            current = hf.get_submodule(name)
        except AttributeError:
            raise ValueError(
                f"config.{OVERRIDES_ATTR} names module {name!r}, which {type(hf).__name__} does not have"
            ) from None
        try:
            new = activations.ACT2FN[value]
        except (KeyError, ValueError):
            raise ValueError(
                f"config.{OVERRIDES_ATTR} gives module {name!r} the activation {value!r}, which transformers does "
                "not know (is hf_helu imported?)"
            ) from None
        if type(new) is type(current) and getattr(new, "alpha", None) == getattr(current, "alpha", None):
            unchanged.append(name)
            continue
        _replace(hf, name, new)
        changed.append(
            SiteChange(name, kinds.get(name, "other"), describe_activation(current), value, f"config.{OVERRIDES_ATTR}")
        )
    activation = ", ".join(sorted(set(overrides.values()))) or "-"
    return PatchReport(
        type(hf).__name__, "reapply", activation, tuple(changed), tuple(unchanged), (), _sorted(overrides)
    )
