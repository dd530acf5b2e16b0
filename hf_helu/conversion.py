"""Converting a pretrained GELU (SiLU, ...) checkpoint to HeLU without losing its quality.

Swapping the FFN activation of a pretrained model for ReLU/HeLU costs little at the swap itself,
but fine-tuning the swapped model from there loses a large part of the score (see the conversion
issue). Two remedies, usable alone or together, both ending in a model that is pure HeLU (stock
ReLU once exported):

* **Calibration** at patch time (:func:`calibrate_ffn`): refit each FFN output projection so that
  ``W2' relu(z) + b'`` matches ``W2 act(z) + b`` on the tokens of a few hundred unlabeled
  examples. Ridge least squares in float64, layer by layer in execution order, each layer fitted
  on the inputs produced by the already calibrated layers before it. Seconds on a CPU.
* **Annealing** during fine-tuning (:class:`ActivationAnnealer`): every FFN activation becomes
  ``(1 - l) act(z) + l helu(z)`` with ``l`` rising linearly from 0 to 1 over a fraction of the
  steps (a forward hook on each HeLU module); at ``l == 1`` the hook is removed and the module is
  the HeLU itself again.

:func:`convert_model` runs patching plus either or both; :class:`FFNDistiller` adds an optional
distillation term (every FFN block's output pulled toward the frozen original's) to the fine-tuning loss.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_helu.activation import HeLU
from hf_helu.families import find_activation_sites, unwrap_model

logger = logging.getLogger(__name__)

DEFAULT_RIDGE = 1e-3
DEFAULT_ANNEAL_FRACTION = 0.5
CONVERSION_METHODS = ("none", "calibrate", "anneal", "calibrate+anneal")
ANNEAL_MODES = ("blend", "gradient")

ActivationSpec = str | nn.Module | Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------
# FFN sites
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FFNSite:
    """One FFN block as conversion sees it: where its activation and its output projection live."""

    activation: str
    output_projection: str
    gated: bool = False


def ffn_sites(model: nn.Module) -> list[FFNSite]:
    """The FFN blocks of ``model`` (inside any PEFT / ``torch.compile`` wrapper), in module order."""
    inner = unwrap_model(model)
    sites = [
        FFNSite(site.name, site.output_projection, bool(site.gated))
        for site in find_activation_sites(inner, scope="ffn")
    ]
    if not sites:
        raise ValueError(f"no FFN activation was found in {type(inner).__name__}; see hf_helu.families")
    return sites


def _resolve_activation(spec: ActivationSpec) -> Callable[[torch.Tensor], torch.Tensor]:
    if isinstance(spec, str):
        from transformers.activations import ACT2FN

        try:
            return ACT2FN[spec]
        except KeyError:
            raise ValueError(f"unknown activation name {spec!r}: expected a key of transformers' ACT2FN") from None
    if callable(spec):
        return spec
    raise TypeError(f"an activation must be a name, an nn.Module or a callable, got {type(spec).__name__}")


def _activation_per_site(reference: ActivationSpec | Mapping[str, ActivationSpec], sites: Sequence[FFNSite]):
    if isinstance(reference, Mapping):
        missing = [site.activation for site in sites if site.activation not in reference]
        if missing:
            raise ValueError(f"no reference activation given for FFN site(s) {missing}")
        return {site.activation: _resolve_activation(reference[site.activation]) for site in sites}
    activation = _resolve_activation(reference)
    return {site.activation: activation for site in sites}


def original_activations(model: nn.Module, sites: Sequence[FFNSite] | None = None) -> dict[str, nn.Module]:
    """Copies of the FFN activation modules of an unpatched model, keyed by module name.

    Take them before :func:`hf_helu.patch_model` replaces them: calibration and annealing need them.
    """
    inner = unwrap_model(model)
    sites = ffn_sites(inner) if sites is None else sites
    originals = {site.activation: copy.deepcopy(inner.get_submodule(site.activation)) for site in sites}
    relu_like = [name for name, module in originals.items() if isinstance(module, HeLU | nn.ReLU)]
    if relu_like:
        raise ValueError(
            f"FFN activation(s) {relu_like[:3]}{'...' if len(relu_like) > 3 else ''} are already ReLU/HeLU: "
            "take the original activations before patching the model"
        )
    return originals


# --------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerCalibration:
    """Fit of one FFN output projection: relative output error before and after, on the fit tokens."""

    activation: str
    output_projection: str
    tokens: int
    error_before: float
    error_after: float


@dataclass
class CalibrationReport:
    """What :func:`calibrate_ffn` did, one row per FFN block in execution order."""

    layers: list[LayerCalibration] = field(default_factory=list)
    ridge: float = DEFAULT_RIDGE
    batches: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "ridge": self.ridge,
            "batches": self.batches,
            "layers": [vars(layer) for layer in self.layers],
        }

    def __str__(self) -> str:
        rows = [f"calibrated {len(self.layers)} FFN output projection(s), ridge {self.ridge:g}"]
        rows.append(f"{'output projection':<48} {'tokens':>8} {'error before':>13} {'error after':>12}")
        for layer in self.layers:
            rows.append(
                f"{layer.output_projection:<48} {layer.tokens:>8} "
                f"{layer.error_before:>13.4f} {layer.error_after:>12.4f}"
            )
        return "\n".join(rows)


class _StopForward(Exception):
    """Raised from a hook once the layer being calibrated has seen the whole batch."""


def _check_ridge(ridge: object) -> float:
    if isinstance(ridge, bool) or not isinstance(ridge, numbers.Real) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}")
    return float(ridge)


def _model_inputs(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    if not isinstance(batch, Mapping):
        raise TypeError(f"calibration batches must be mappings of model inputs, got {type(batch).__name__}")
    return {
        key: value.to(device) if isinstance(value, torch.Tensor) else value
        for key, value in batch.items()
        if key not in ("labels", "label")
    }


def _token_mask(batch: Mapping[str, Any], hidden: torch.Tensor) -> torch.Tensor | None:
    """Boolean mask of the real (non-padding) positions of ``hidden`` (batch, seq, features), or None."""
    masks = [batch[key] for key in ("attention_mask", "decoder_attention_mask") if batch.get(key) is not None]
    if not masks:
        return None
    for mask in masks:
        if hidden.dim() == 3 and tuple(mask.shape) == tuple(hidden.shape[:2]):
            return mask.to(hidden.device).bool()
    raise ValueError(
        f"cannot match the attention mask(s) of shape {[tuple(m.shape) for m in masks]} to FFN activations of "
        f"shape {tuple(hidden.shape)}; pass calibration batches without padding and without an attention mask"
    )


def _projection_weight(projection: nn.Module) -> torch.Tensor:
    """The projection's weight as (in_features, out_features), the layout the fit solves for."""
    if isinstance(projection, Conv1D):
        return projection.weight
    if isinstance(projection, nn.Linear):
        return projection.weight.T
    raise TypeError(
        f"FFN output projection must be an nn.Linear or a transformers Conv1D, got {type(projection).__name__}; "
        "calibrate before wrapping the model (e.g. before peft.get_peft_model)"
    )


def _relu_inputs(z: torch.Tensor, x_original: torch.Tensor, activation, gated: bool) -> torch.Tensor:
    """What the output projection sees once the activation is ReLU, given what it saw with the original.

    Plain FFN: ``relu(z)``. Gated FFN (``act(gate) * up``): rescale each element by relu(gate)/act(gate),
    which is 0 where gate <= 0 and finite elsewhere (act(g) > 0 for g > 0 for GELU, SiLU and kin).
    """
    if not gated:
        if z.shape != x_original.shape:
            raise ValueError(
                f"FFN activation output {tuple(z.shape)} does not feed its output projection {tuple(x_original.shape)} "
                "directly; is this a gated FFN?"
            )
        return torch.relu(z)
    if z.shape != x_original.shape:
        raise ValueError(
            f"gated FFN: activation input {tuple(z.shape)} and output projection input {tuple(x_original.shape)} differ"
        )
    activated = activation(z)
    positive = (z > 0) & (activated > 0)
    ratio = torch.where(positive, torch.relu(z) / torch.where(positive, activated, torch.ones_like(activated)), 0)
    return x_original * ratio


def _execution_order(model: nn.Module, sites: Sequence[FFNSite], batch: dict[str, Any]) -> list[tuple[FFNSite, int]]:
    """Sites in the order their output projections run, with how many times each runs per forward."""
    calls: dict[str, int] = {}
    order: list[str] = []
    handles = []
    for site in sites:

        def hook(module, args, output, name=site.output_projection):
            if name not in calls:
                order.append(name)
            calls[name] = calls.get(name, 0) + 1

        handles.append(model.get_submodule(site.output_projection).register_forward_hook(hook))
    try:
        model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    by_projection = {site.output_projection: site for site in sites}
    silent = [site.output_projection for site in sites if site.output_projection not in calls]
    if silent:
        raise ValueError(f"FFN output projection(s) {silent} did not run in a forward pass of the calibration batch")
    return [(by_projection[name], calls[name]) for name in order]


def _calibrate_site(
    model: nn.Module,
    site: FFNSite,
    calls_per_forward: int,
    activation,
    batches: Sequence[dict[str, Any]],
    ridge: float,
) -> LayerCalibration:
    projection = model.get_submodule(site.output_projection)
    weight = _projection_weight(projection)
    has_bias = projection.bias is not None
    compute_device = weight.device if weight.device.type in ("cpu", "cuda") else torch.device("cpu")
    features = weight.shape[0] + int(has_bias)
    gram = torch.zeros(features, features, dtype=torch.float64, device=compute_device)
    cross = torch.zeros(features, weight.shape[1], dtype=torch.float64, device=compute_device)
    target_energy = torch.zeros((), dtype=torch.float64, device=compute_device)
    tokens = 0
    state: dict[str, Any] = {}

    def on_activation(module, args, output):
        state["z"] = args[0]
        return activation(args[0])  # the layer under fit runs with the original activation

    def on_projection(module, args, output):
        nonlocal gram, cross, target_energy, tokens
        z = state.pop("z")
        x = _relu_inputs(z, args[0], activation, site.gated)
        mask = _token_mask(state["batch"], x)
        if mask is not None:
            x, target = x[mask], output[mask]
        else:
            x, target = x.reshape(-1, x.shape[-1]), output.reshape(-1, output.shape[-1])
        x = x.to(compute_device, torch.float64)
        target = target.to(compute_device, torch.float64)
        if has_bias:
            x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        gram += x.T @ x
        cross += x.T @ target
        target_energy += target.square().sum()
        tokens += x.shape[0]
        state["calls"] += 1
        if state["calls"] == calls_per_forward:
            raise _StopForward

    handles = [
        model.get_submodule(site.activation).register_forward_hook(on_activation),
        projection.register_forward_hook(on_projection),
    ]
    try:
        for batch in batches:
            state["batch"], state["calls"] = batch, 0
            with contextlib.suppress(_StopForward):
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise ValueError(f"no calibration tokens reached {site.output_projection} (all positions were padding?)")

    original = weight.detach().to(compute_device, torch.float64)
    if has_bias:
        original = torch.cat([original, projection.bias.detach().to(compute_device, torch.float64)[None]], dim=0)
    if ridge > 0:
        # Ridge towards the original weights (the bias is not penalised): units that rarely fire on the
        # calibration tokens keep their pretrained weights instead of being pulled to zero.
        penalty = torch.full((features,), ridge * tokens, dtype=torch.float64, device=compute_device)
        if has_bias:
            penalty[-1] = 0
        fitted = torch.linalg.solve(gram + torch.diag(penalty), cross + penalty[:, None] * original)
    else:
        fitted = torch.linalg.lstsq(gram, cross).solution

    def relative_error(theta: torch.Tensor) -> float:
        residual = (theta * (gram @ theta)).sum() - 2 * (theta * cross).sum() + target_energy
        return math.sqrt(max(residual.item(), 0.0) / max(target_energy.item(), 1e-300))

    error_before, error_after = relative_error(original), relative_error(fitted)
    new_weight = fitted[: weight.shape[0]]
    if isinstance(projection, nn.Linear):
        new_weight = new_weight.T
    projection.weight.copy_(new_weight.to(projection.weight.device, projection.weight.dtype))
    if has_bias:
        projection.bias.copy_(fitted[-1].to(projection.bias.device, projection.bias.dtype))
    return LayerCalibration(site.activation, site.output_projection, tokens, error_before, error_after)


def calibrate_ffn(
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    reference: ActivationSpec | Mapping[str, ActivationSpec],
    ridge: float = DEFAULT_RIDGE,
    sites: Sequence[FFNSite] | None = None,
) -> CalibrationReport:
    """Refit the FFN output projections of a patched (ReLU/HeLU) model to match its original activation.

    ``model`` already has ReLU/HeLU in its FFN blocks; ``reference`` is the activation they had
    (a name such as ``"gelu"``, a module, or a mapping from activation module name to either, as
    returned by :func:`original_activations`). ``batches`` are unlabeled model inputs (dicts of
    tensors, e.g. from a tokenizer); padding positions (``attention_mask == 0``) are not fitted.

    For each FFN in execution order, weight and bias of its output projection minimise
    ``||W' relu(z) + b' - (W act(z) + b)||^2 + ridge * N * ||W' - W||^2`` over the N collected
    tokens, in float64, where ``z`` comes from the model with every earlier FFN already calibrated.
    """
    ridge = _check_ridge(ridge)
    model = unwrap_model(model)
    sites = ffn_sites(model) if sites is None else list(sites)
    unfittable = [site.activation for site in sites if site.output_projection is None]
    if unfittable:
        raise ValueError(f"no output projection is known for FFN activation(s) {unfittable}: cannot calibrate them")
    activations = _activation_per_site(reference, sites)
    device = next(model.parameters()).device
    batches = [_model_inputs(batch, device) for batch in batches]
    if not batches:
        raise ValueError("calibrate_ffn needs at least one batch of calibration inputs, got none")
    was_training = model.training
    model.eval()
    report = CalibrationReport(ridge=ridge, batches=len(batches))
    try:
        with torch.no_grad():
            for site, calls in _execution_order(model, sites, batches[0]):
                layer = _calibrate_site(model, site, calls, activations[site.activation], batches, ridge)
                report.layers.append(layer)
                logger.info(
                    "calibrated %s on %d tokens: relative error %.4f -> %.4f",
                    site.output_projection,
                    layer.tokens,
                    layer.error_before,
                    layer.error_after,
                )
    finally:
        model.train(was_training)
    return report


def ffn_output_errors(
    model: nn.Module,
    reference_model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    sites: Sequence[FFNSite] | None = None,
) -> dict[str, float]:
    """Relative error ``||y - y_ref|| / ||y_ref||`` of every FFN output projection's output.

    Both models run the same batches end to end (so errors accumulate through the layers, as in
    use); padding positions are left out. Keyed by output projection name.
    """
    model, reference_model = unwrap_model(model), unwrap_model(reference_model)
    sites = ffn_sites(model) if sites is None else list(sites)
    sums = {site.output_projection: [0.0, 0.0] for site in sites}

    def recorder(store, name):
        def hook(module, args, output):
            store[name] = output

        return hook

    device = next(model.parameters()).device
    modes = (model.training, reference_model.training)
    model.eval()
    reference_model.eval()
    try:
        with torch.no_grad():
            for raw in batches:
                batch = _model_inputs(raw, device)
                got: dict[str, torch.Tensor] = {}
                want: dict[str, torch.Tensor] = {}
                handles = []
                for site in sites:
                    name = site.output_projection
                    handles.append(model.get_submodule(name).register_forward_hook(recorder(got, name)))
                    handles.append(reference_model.get_submodule(name).register_forward_hook(recorder(want, name)))
                try:
                    model(**batch)
                    reference_model(**batch)
                finally:
                    for handle in handles:
                        handle.remove()
                for name, totals in sums.items():
                    mask = _token_mask(batch, want[name])
                    y, y_ref = (got[name][mask], want[name][mask]) if mask is not None else (got[name], want[name])
                    totals[0] += (y.double() - y_ref.double()).square().sum().item()
                    totals[1] += y_ref.double().square().sum().item()
    finally:
        model.train(modes[0])
        reference_model.train(modes[1])
    return {name: math.sqrt(err / max(energy, 1e-300)) for name, (err, energy) in sums.items()}


def calibration_batches(
    tokenizer,
    texts: Sequence[str] | Sequence[tuple[str, str]],
    batch_size: int = 32,
    max_length: int = 128,
) -> list[dict[str, torch.Tensor]]:
    """Tokenize sentences (or sentence pairs) into padded batches for :func:`calibrate_ffn`.

    Examples are grouped by length (less padding, a faster fit); padding is masked out anyway.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    texts = list(texts)
    if not texts:
        raise ValueError("calibration needs at least one text, got none")
    pairs = not isinstance(texts[0], str)
    if pairs and not all(isinstance(t, tuple | list) and len(t) == 2 for t in texts):
        raise ValueError("calibration texts must be all strings or all (sentence1, sentence2) pairs")
    columns = list(zip(*texts, strict=True)) if pairs else [texts]
    encoded = tokenizer(*[list(c) for c in columns], truncation=True, max_length=max_length)
    order = sorted(range(len(texts)), key=lambda i: len(encoded["input_ids"][i]))
    batches = []
    for start in range(0, len(order), batch_size):
        rows = [{key: values[i] for key, values in encoded.items()} for i in order[start : start + batch_size]]
        batches.append(dict(tokenizer.pad(rows, return_tensors="pt")))
    return batches


def dataset_batches(
    dataset,
    collate_fn: Callable[[list[dict[str, Any]]], Mapping[str, Any]],
    samples: int,
    batch_size: int = 64,
) -> list[dict[str, Any]]:
    """The first ``samples`` rows of a tokenized ``datasets.Dataset``, unlabeled, collated into batches.

    Rows are grouped by length (less padding); label columns are dropped.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"calibration samples must be an integer >= 1, got {samples!r}")
    subset = dataset.select(range(min(samples, len(dataset))))
    subset = subset.remove_columns([c for c in ("labels", "label") if c in subset.column_names])
    rows = sorted((dict(row) for row in subset), key=lambda row: len(row["input_ids"]))
    return [dict(collate_fn(rows[i : i + batch_size])) for i in range(0, len(rows), batch_size)]


def add_conversion_args(parser) -> None:
    """The conversion flags of a recipe: ``--conversion``, the calibration and annealing knobs, ``--distill_weight``."""
    group = parser.add_argument_group("conversion of the pretrained activation (hf_helu.conversion)")
    group.add_argument(
        "--conversion",
        choices=CONVERSION_METHODS,
        default="none",
        help="With --activation relu|helu: refit the FFN output projections at patch time (calibrate), blend the "
        "original activation into the new one over the first steps (anneal), or both.",
    )
    group.add_argument(
        "--anneal_fraction",
        type=float,
        default=DEFAULT_ANNEAL_FRACTION,
        help="Fraction of the optimizer steps over which the blend goes from the original activation to HeLU.",
    )
    group.add_argument(
        "--calibration_samples", type=int, default=800, help="Unlabeled training examples for calibration."
    )
    group.add_argument("--calibration_ridge", type=float, default=DEFAULT_RIDGE, help="Ridge lambda (x tokens).")
    group.add_argument(
        "--distill_weight",
        type=float,
        default=0.0,
        help="> 0: add this times the FFN-output distillation term from a frozen copy of the original model "
        "(hf_helu.conversion.FFNDistiller) to the training loss. 0 (default): off.",
    )


def check_conversion_args(args) -> None:
    """Reject a ``--conversion`` / ``--distill_weight`` the run cannot honour, before anything is loaded."""
    check_conversion_method(args.conversion)
    distill = getattr(args, "distill_weight", 0.0)
    if not 0 <= distill < math.inf:
        raise ValueError(f"--distill_weight must be a finite number >= 0, got {distill}")
    if distill and getattr(args, "eval_only", False):
        raise ValueError("--distill_weight applies to training; it cannot be combined with --eval_only")
    if args.conversion == "none":
        return
    if getattr(args, "activation", None) not in ("relu", "helu"):
        raise ValueError(f"--conversion {args.conversion} needs --activation relu or helu, got {args.activation!r}")
    if getattr(args, "eval_only", False):
        raise ValueError("--conversion applies to training; it cannot be combined with --eval_only")
    if not 0 < args.anneal_fraction <= 1:
        raise ValueError(f"--anneal_fraction must be in (0, 1], got {args.anneal_fraction}")
    if args.calibration_samples < 1:
        raise ValueError(f"--calibration_samples must be >= 1, got {args.calibration_samples}")
    _check_ridge(args.calibration_ridge)


# --------------------------------------------------------------------------------------------------
# Annealing
# --------------------------------------------------------------------------------------------------


class ActivationAnnealer:
    """Blends each FFN activation from the original into the model's HeLU over the first steps.

    ``model`` is already patched (HeLU in its FFN blocks); ``original`` is what they were (see
    :func:`original_activations`). ``l`` goes 0 -> 1 linearly over ``round(anneal_fraction *
    total_steps)`` optimizer steps; a forward hook on each HeLU module applies it:

    * ``mode="blend"``: the output becomes ``(1 - l) * original(z) + l * helu(z)``, forward and
      backward (for a model whose weights were trained for the original activation).
    * ``mode="gradient"``: the forward stays ReLU (up to rounding) and only the gradient is blended,
      ``(1 - l) * original'(z) + l * helu'(z)`` (for a *calibrated* model, whose output projections
      were refitted for ReLU inputs: blending GELU back into its forward would undo the fit).

    When ``l`` reaches 1 the hooks are removed: the model is then exactly the patched HeLU model
    (ReLU forward, bit for bit). The modules themselves are never replaced, so optimizers, PEFT,
    monitors and exports see the same model throughout.

    Drive it with :meth:`step` (one call per optimizer step) or :meth:`on_step` (the absolute step,
    resume-safe); it also has ``state_dict`` / ``load_state_dict`` for
    ``accelerator.register_for_checkpointing``. With the HF Trainer, use :meth:`callback`.
    """

    def __init__(
        self,
        model: nn.Module,
        original: ActivationSpec | Mapping[str, ActivationSpec],
        total_steps: int | None = None,
        anneal_fraction: float = DEFAULT_ANNEAL_FRACTION,
        sites: Sequence[FFNSite] | None = None,
        mode: str = "blend",
    ):
        if mode not in ANNEAL_MODES:
            raise ValueError(f"annealing mode must be one of {ANNEAL_MODES}, got {mode!r}")
        self.mode = mode
        if (
            isinstance(anneal_fraction, bool)
            or not isinstance(anneal_fraction, numbers.Real)
            or not 0 < anneal_fraction <= 1
        ):
            raise ValueError(f"anneal_fraction must be a number in (0, 1], got {anneal_fraction!r}")
        self.anneal_fraction = float(anneal_fraction)
        self.total_steps: int | None = None
        if total_steps is not None:
            self.set_total_steps(total_steps)
        self.current_step = 0
        inner = unwrap_model(model)
        sites = ffn_sites(inner) if sites is None else list(sites)
        originals = _activation_per_site(original, sites)
        self._mix = {torch.device("cpu"): torch.zeros(())}
        self._handles = []
        for site in sites:
            module = inner.get_submodule(site.activation)
            if not isinstance(module, HeLU | nn.ReLU):
                raise TypeError(
                    f"{site.activation} is a {type(module).__name__}, not HeLU/ReLU: patch the model before annealing"
                )
            self._handles.append(module.register_forward_hook(self._blend_hook(originals[site.activation])))

    def _blend_hook(self, original: Callable[[torch.Tensor], torch.Tensor]):
        def blend(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            mix = self._mix_on(output.device)
            return (1 - mix) * original(args[0]) + mix * output

        def blend_gradient(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            if not output.requires_grad:
                return output
            mix = self._mix_on(output.device)
            smooth = original(args[0])
            # Forward: l*r + (1-l)*g + (1-l)*(r - g) = r. Backward: l*helu'(z) + (1-l)*original'(z).
            return mix * output + (1 - mix) * smooth + ((1 - mix) * (output - smooth)).detach()

        return blend if self.mode == "blend" else blend_gradient

    def _mix_on(self, device: torch.device) -> torch.Tensor:
        if device not in self._mix:
            self._mix[device] = self._mix[torch.device("cpu")].to(device)
        return self._mix[device]

    def set_total_steps(self, total_steps: int) -> None:
        if isinstance(total_steps, bool) or not isinstance(total_steps, numbers.Integral) or total_steps < 1:
            raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
        self.total_steps = int(total_steps)

    @property
    def anneal_steps(self) -> int:
        """Optimizer steps from the original activation (l = 0) to pure HeLU (l = 1)."""
        if self.total_steps is None:
            raise RuntimeError("ActivationAnnealer has no total_steps yet: call set_total_steps(n) first")
        return max(1, round(self.anneal_fraction * self.total_steps))

    @property
    def mix(self) -> float:
        """Current weight of HeLU in the blend (0 = original activation, 1 = pure HeLU)."""
        if self.current_step == 0:
            return 0.0
        return min(1.0, self.current_step / self.anneal_steps)

    @property
    def finished(self) -> bool:
        """True once the blend hooks are gone and the model is pure HeLU."""
        return not self._handles

    def step(self) -> float:
        """Advance one optimizer step; returns the new mix. Removes the blend when it reaches 1."""
        self.current_step += 1
        self._apply()
        return self.mix

    def on_step(self, completed_steps: int, total_steps: int | None = None) -> None:
        """Set the absolute optimizer step (and the run's total if not yet known): for training loops."""
        if self.total_steps is None and total_steps is not None:
            self.set_total_steps(total_steps)
        self.current_step = int(completed_steps)
        self._apply()

    def _apply(self) -> None:
        if self.finished:
            return
        mix = self.mix
        for tensor in self._mix.values():
            tensor.fill_(mix)
        if mix >= 1.0:
            self.finish()

    def finish(self) -> None:
        """Remove the blend (idempotent): the model is pure HeLU from here on. Call before saving."""
        if not self.finished and self.mix < 1.0:
            logger.warning("annealing stopped at mix %.3f < 1: switching to pure HeLU now", self.mix)
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def state_dict(self) -> dict[str, Any]:
        return {
            "current_step": self.current_step,
            "total_steps": self.total_steps,
            "anneal_fraction": self.anneal_fraction,
            "mode": self.mode,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("mode", self.mode) != self.mode:
            raise ValueError(f"annealer state is for mode {state['mode']!r}, this annealer is {self.mode!r}")
        self.anneal_fraction = float(state["anneal_fraction"])
        if state["total_steps"] is not None:
            self.set_total_steps(state["total_steps"])
        self.current_step = int(state["current_step"])
        self._apply()

    def callback(self):
        """A ``transformers.TrainerCallback`` that drives this annealer from the HF Trainer."""
        return _annealing_callback_class()(self)


@functools.cache
def _annealing_callback_class() -> type:
    """Built on first use: importing ``transformers.TrainerCallback`` pulls in the Trainer's dependencies."""
    from transformers import TrainerCallback

    class AnnealingCallback(TrainerCallback):
        """HF Trainer callback: the Trainer's step count and total drive an :class:`ActivationAnnealer`."""

        def __init__(self, annealer: ActivationAnnealer):
            self.annealer = annealer

        def on_train_begin(self, args, state, control, **kwargs):
            self.annealer.on_step(state.global_step, state.max_steps)

        def on_step_end(self, args, state, control, **kwargs):
            self.annealer.on_step(state.global_step, state.max_steps)

        def on_train_end(self, args, state, control, **kwargs):
            self.annealer.finish()

    AnnealingCallback.__module__ = __name__
    return AnnealingCallback


def __getattr__(name: str):
    if name == "AnnealingCallback":
        return _annealing_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --------------------------------------------------------------------------------------------------
# Distillation
# --------------------------------------------------------------------------------------------------


class FFNDistiller:
    """Feature distillation from a frozen copy of the original model, as an extra fine-tuning loss.

    The original checkpoint has no trained task head, so its logits carry nothing to distil; its FFN
    blocks do. On each batch the teacher (the unpatched model, frozen, in eval mode) runs first, then
    the student; forward hooks on every FFN output projection of both collect their outputs, and::

        loss = student_loss + weight * mean over FFN blocks of  sum ||s - t||^2 / sum ||t||^2

    with the sums over the non-padding tokens (a relative squared error, so every layer counts alike).
    Use it as the training loss, ``loss = distiller(model, batch)``; ``fit(compute_loss=distiller)``
    does. ``teacher_context`` wraps the teacher's forward (e.g. ``accelerator.autocast``). The hooks
    stay until :meth:`remove`.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        weight: float = 1.0,
        *,
        teacher_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ):
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not 0 < weight < math.inf:
            raise ValueError(f"distillation weight must be a finite number > 0, got {weight!r}")
        self.weight = float(weight)
        self.teacher = teacher.eval().requires_grad_(False)
        self.teacher_context = teacher_context
        student_sites = ffn_sites(student)
        self.projections = [site.output_projection for site in student_sites]
        teacher_projections = [site.output_projection for site in ffn_sites(teacher)]
        if teacher_projections != self.projections:
            raise ValueError(
                f"student and teacher have different FFN blocks: {self.projections} vs {teacher_projections}"
            )
        self._outputs: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}}
        self._recording = False  # only inside __call__: evaluation forwards store nothing
        self._handles = []
        for role, model in (("student", unwrap_model(student)), ("teacher", unwrap_model(teacher))):
            for name in self.projections:
                hook = functools.partial(self._record, self._outputs[role], name)
                self._handles.append(model.get_submodule(name).register_forward_hook(hook))
        self.last_distillation: torch.Tensor | None = None  # the unweighted term of the last call

    def _record(self, store: dict[str, torch.Tensor], name: str, module: nn.Module, args: tuple, output: Any) -> None:
        if self._recording:
            store[name] = output

    def __call__(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        """The student's loss on ``batch`` plus ``weight`` times the distillation term."""
        teacher_inputs = {key: value for key, value in batch.items() if key not in ("labels", "label")}
        self._recording = True
        try:
            with torch.no_grad(), self.teacher_context():
                self.teacher(**teacher_inputs)
            outputs = model(**batch)
        finally:
            self._recording = False
        mask = batch.get("attention_mask")
        terms = []
        for name in self.projections:
            student, teacher = self._outputs["student"].get(name), self._outputs["teacher"].get(name)
            if student is None or teacher is None:
                missing = "student" if student is None else "teacher"
                raise RuntimeError(f"FFN output projection {name!r} did not run in the {missing}'s forward")
            student, teacher = student.float(), teacher.float()
            if isinstance(mask, torch.Tensor) and tuple(mask.shape) == tuple(student.shape[:-1]):
                keep = mask.to(device=student.device, dtype=torch.bool)
                student, teacher = student[keep], teacher[keep]
            terms.append((student - teacher).pow(2).sum() / teacher.pow(2).sum().clamp_min(1e-12))
        for store in self._outputs.values():
            store.clear()  # a projection that does not run next time must not find this batch's output
        distillation = torch.stack(terms).mean()
        self.last_distillation = distillation.detach()
        return outputs.loss + self.weight * distillation

    def remove(self) -> None:
        """Remove the hooks from student and teacher."""
        while self._handles:
            self._handles.pop().remove()


# --------------------------------------------------------------------------------------------------
# One call
# --------------------------------------------------------------------------------------------------


@dataclass
class ConversionResult:
    """What a conversion did: the patch (if done here), the calibration, the annealer to drive."""

    method: str
    patch_report: Any = None
    calibration: CalibrationReport | None = None
    annealer: ActivationAnnealer | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (for results.json)."""
        summary: dict[str, Any] = {"method": self.method}
        if self.calibration is not None:
            summary["calibration"] = self.calibration.to_dict()
        if self.annealer is not None:
            summary["anneal"] = {"anneal_fraction": self.annealer.anneal_fraction, "mode": self.annealer.mode}
        return summary


def check_conversion_method(method: object) -> str:
    """``method`` if it is one of :data:`CONVERSION_METHODS`, else a ValueError naming it."""
    if method not in CONVERSION_METHODS:
        raise ValueError(f"unknown conversion method {method!r}: expected one of {', '.join(CONVERSION_METHODS)}")
    return method


def apply_conversion(
    model: nn.Module,
    method: str,
    original: Mapping[str, ActivationSpec],
    *,
    calibration_batches: Iterable[Mapping[str, Any]] | None = None,
    ridge: float = DEFAULT_RIDGE,
    total_steps: int | None = None,
    anneal_fraction: float = DEFAULT_ANNEAL_FRACTION,
) -> ConversionResult:
    """Apply ``method`` to a model already patched with HeLU/ReLU; ``original`` from :func:`original_activations`.

    Only the FFN sites named in ``original`` that now hold HeLU/ReLU are converted (a layer-restricted
    patch leaves the others alone).
    """
    check_conversion_method(method)
    result = ConversionResult(method)
    if method == "none":
        return result
    calibrate, anneal = "calibrate" in method, "anneal" in method
    if calibrate and calibration_batches is None:
        raise ValueError(f"conversion {method!r} needs calibration_batches (unlabeled model inputs)")
    inner = unwrap_model(model)
    sites = [
        site
        for site in ffn_sites(inner)
        if site.activation in original and isinstance(inner.get_submodule(site.activation), HeLU | nn.ReLU)
    ]
    if not sites:
        raise ValueError("no FFN activation of the model is both patched (HeLU/ReLU) and named in `original`")
    if calibrate:
        result.calibration = calibrate_ffn(inner, calibration_batches, original, ridge=ridge, sites=sites)
    if anneal:
        # A calibrated model's projections expect ReLU inputs: anneal only the gradient then.
        mode = "gradient" if calibrate else "blend"
        result.annealer = ActivationAnnealer(inner, original, total_steps, anneal_fraction, sites=sites, mode=mode)
    return result


def convert_model(
    model: nn.Module,
    method: str = "calibrate",
    *,
    activation: str = "helu",
    alpha: float = 0.05,
    scope: Any = "ffn",
    calibration_batches: Iterable[Mapping[str, Any]] | None = None,
    ridge: float = DEFAULT_RIDGE,
    total_steps: int | None = None,
    anneal_fraction: float = DEFAULT_ANNEAL_FRACTION,
) -> ConversionResult:
    """Patch ``model``'s FFN blocks with HeLU (``activation="helu"``, ``alpha``) or ReLU, then apply ``method``.

    ``method``: ``"none"`` (plain swap), ``"calibrate"`` (refit the output projections on
    ``calibration_batches``, unlabeled model inputs), ``"anneal"`` (the result's ``annealer`` must be
    stepped once per optimizer step over ``total_steps``), or ``"calibrate+anneal"`` (calibrate, then
    anneal the gradient only: the forward stays the calibrated ReLU model).
    """
    from hf_helu.patching import patch_model, unpatch_model

    check_conversion_method(method)
    if activation not in ("helu", "relu"):
        raise ValueError(f"activation must be 'helu' or 'relu', got {activation!r}")
    originals = original_activations(model) if method != "none" else {}
    patch_report = patch_model(model, alpha=alpha, scope=scope)
    if activation == "relu":
        patch_report = unpatch_model(model, to="relu")
    result = apply_conversion(
        model,
        method,
        originals,
        calibration_batches=calibration_batches,
        ridge=ridge,
        total_steps=total_steps,
        anneal_fraction=anneal_fraction,
    )
    result.patch_report = patch_report
    return result
