"""What a conversion kept: FFN output errors against the original model, and a causal LM's loss ratio.

:func:`measure_quality` compares a converted model with its own forward before conversion (the original activations
and the refitted parameters swapped back in place, so no copy of the model is kept) on held-out calibration batches.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hf_helu.capture import ForwardCapture, submodules
from hf_helu.conversion.batches import model_inputs, padding_mask
from hf_helu.conversion.sites import ActivationFunction, ffn_sites, reference_modules
from hf_helu.families import ActivationSite, unwrap_model


def ffn_output_errors(
    model: nn.Module,
    reference_model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    sites: Sequence[ActivationSite] | None = None,
) -> dict[str, float]:
    """Relative error ``||y - y_ref|| / ||y_ref||`` of every FFN output projection's output.

    Both models run the same batches end to end (so errors accumulate through the layers, as in
    use); padding positions are left out. Keyed by output projection name.
    """
    model, reference_model = unwrap_model(model), unwrap_model(reference_model)
    sites = ffn_sites(model) if sites is None else list(sites)
    projections = [site.output_projection for site in sites]
    sums = {name: [0.0, 0.0] for name in projections}
    device = next(model.parameters()).device
    modes = (model.training, reference_model.training)
    model.eval()
    reference_model.eval()
    got = ForwardCapture(submodules(model, projections))
    want = ForwardCapture(submodules(reference_model, projections))
    try:
        with torch.no_grad():
            for raw in batches:
                batch = model_inputs(raw, device)
                got.clear()
                want.clear()
                model(**batch)
                reference_model(**batch)
                for name, totals in sums.items():
                    y, y_ref = got.records[name], want.records[name]
                    mask = padding_mask(batch, y_ref)
                    if mask is not None:
                        y, y_ref = y[mask], y_ref[mask]
                    totals[0] += (y.double() - y_ref.double()).square().sum().item()
                    totals[1] += y_ref.double().square().sum().item()
    finally:
        got.remove()
        want.remove()
        model.train(modes[0])
        reference_model.train(modes[1])
    return {name: math.sqrt(err / max(energy, 1e-300)) for name, (err, energy) in sums.items()}


# What "kept" means: a causal LM's held-out perplexity at most 1.5x the original's (issue 23's goal); otherwise the
# pooled relative error of the FFN outputs under 0.5 (the outputs differ by less than half their size).
KEPT_PERPLEXITY_RATIO = 1.5
KEPT_FFN_ERROR = 0.5


@dataclass
class ConversionQuality:
    """What a conversion kept, measured on held-out calibration batches against the original model's forward."""

    batches: int
    tokens: int
    ffn_relative_error: float  # ||y - y_ref|| / ||y_ref|| pooled over every FFN output projection and token
    ffn_errors: dict[str, float] = field(default_factory=dict)
    loss_original: float | None = None  # causal LMs: mean next-token loss
    loss_converted: float | None = None
    predicted_tokens: int = 0  # causal LMs: the held-out tokens that have a next token to predict
    note: str = ""  # why a figure could not be measured

    @property
    def measured(self) -> bool:
        """False when the held-out batches were too small to measure anything (no token, or a causal LM's texts
        with no next token to predict)."""
        return not self.note

    @property
    def loss_ratio(self) -> float | None:
        if self.loss_original is None or self.loss_converted is None:
            return None
        return self.loss_converted / max(self.loss_original, 1e-12)

    @property
    def perplexity_ratio(self) -> float | None:
        if self.loss_original is None or self.loss_converted is None:
            return None
        return math.exp(self.loss_converted - self.loss_original)

    @property
    def kept(self) -> bool | None:
        """True/False: whether the conversion kept the quality; None when the held-out set could not measure it."""
        if not self.measured:
            return None
        if self.perplexity_ratio is not None:
            return self.perplexity_ratio <= KEPT_PERPLEXITY_RATIO
        return self.ffn_relative_error <= KEPT_FFN_ERROR

    def __str__(self) -> str:
        if not self.measured:
            return f"on {self.tokens} held-out tokens: not measured ({self.note})"
        text = f"on {self.tokens} held-out tokens: FFN output relative error {self.ffn_relative_error:.3f}"
        if self.loss_ratio is not None:
            text += (
                f", loss {self.loss_original:.3f} -> {self.loss_converted:.3f} (ratio {self.loss_ratio:.3f}, "
                f"perplexity x{self.perplexity_ratio:.2f})"
            )
        return text

    def to_dict(self) -> dict[str, Any]:
        summary = {key: value for key, value in vars(self).items()}
        summary.update(
            loss_ratio=self.loss_ratio, perplexity_ratio=self.perplexity_ratio, kept=self.kept, measured=self.measured
        )
        return summary


def is_causal_lm(model: nn.Module) -> bool:
    """True for a transformers causal-LM class (``LlamaForCausalLM``, ``GPT2LMHeadModel``, ...)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return type(unwrap_model(model)).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())


@contextlib.contextmanager
def original_forward(
    model: nn.Module, originals: Mapping[str, ActivationFunction], weights: Mapping[str, torch.Tensor]
) -> Iterator[None]:
    """Inside the block ``model`` computes as before conversion: the ``originals`` activations, and the
    parameters in ``weights`` (``{parameter name: value before conversion}``, e.g. the refitted projections)."""
    params = dict(model.named_parameters())
    current = {name: params[name].data for name in weights}
    try:
        for name, value in weights.items():
            params[name].data = value
        with reference_modules(model, originals):
            yield
    finally:
        for name, value in current.items():
            params[name].data = value


# Rows per forward when measuring a causal LM's loss: the logits (rows x length x vocabulary floats, 100 MB for 4
# rows of 128 tokens and SmolLM2's 49k vocabulary) are the largest tensor of a conversion.
LOSS_ROWS = 4


def _row_chunks(batch: dict[str, Any], rows: int) -> Iterator[dict[str, Any]]:
    """``batch`` cut into batches of at most ``rows`` examples (tensors sliced on their first dimension)."""
    size = batch["input_ids"].shape[0]
    for start in range(0, size, rows):
        yield {k: v[start : start + rows] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _next_token_loss(model: nn.Module, batch: dict[str, Any]) -> tuple[float, int]:
    """(summed next-token loss, number of predicted tokens) of one batch, padding left out.

    ``logsumexp(logits) - logits[next token]`` with the exponentials taken in the logits' own storage: no second
    tensor of their size (a shifted copy, a log-softmax) is allocated, which on CPU costs more than the arithmetic
    (fresh pages of 100 MB at a time)."""
    logits = model(**batch).logits.float()  # a copy for half precision, the model's own float32 output otherwise
    following = batch["input_ids"][:, 1:].to(logits.device)
    predicted = logits[:, :-1].gather(-1, following[..., None]).squeeze(-1)
    peak = logits.amax(-1, keepdim=True)
    log_total = logits.sub_(peak).exp_().sum(-1).log_().add_(peak.squeeze(-1))[:, :-1]
    losses = log_total - predicted
    mask = batch.get("attention_mask")
    if mask is not None:
        losses = losses[mask[:, 1:].to(losses.device) != 0]
    return losses.sum().item(), losses.numel()


def _add_errors(sums: dict[str, list[float]], got: dict, want: dict, mask: torch.Tensor | None) -> None:
    for name, totals in sums.items():
        y, y_ref = got[name], want[name]
        if mask is not None:
            y, y_ref = y[mask], y_ref[mask]
        totals[0] += (y.double() - y_ref.double()).square().sum().item()
        totals[1] += y_ref.double().square().sum().item()


def measure_quality(
    model: nn.Module,
    originals: Mapping[str, ActivationFunction],
    weights: Mapping[str, torch.Tensor],
    batches: Sequence[Mapping[str, Any]],
    sites: Sequence[ActivationSite],
) -> ConversionQuality:
    """Held-out figures of a converted ``model`` against its own forward before conversion (``original_forward``).

    A causal LM's loss is the mean over every held-out token that has a next token (computed :data:`LOSS_ROWS`
    rows at a time); when there is none (texts of one token), the quality says so instead of a NaN loss."""
    model = unwrap_model(model)
    causal = is_causal_lm(model)
    projections = [site.output_projection for site in sites]
    sums = {name: [0.0, 0.0] for name in projections}
    losses = [0.0, 0.0]  # summed loss: original, converted
    predicted = 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    capture = ForwardCapture(submodules(model, projections))
    tokens = 0
    try:
        with torch.no_grad():
            for raw in batches:
                batch = model_inputs(raw, device)
                for chunk in _row_chunks(batch, LOSS_ROWS) if causal else [batch]:
                    capture.clear()
                    with original_forward(model, originals, weights):
                        loss_ref, _ = _next_token_loss(model, chunk) if causal else (model(**chunk), 0)
                    want = dict(capture.records)
                    capture.clear()
                    loss, count = _next_token_loss(model, chunk) if causal else (model(**chunk), 0)
                    got = dict(capture.records)
                    mask = padding_mask(chunk, next(iter(want.values())))
                    tokens += int(mask.sum()) if mask is not None else next(iter(want.values())).shape[:-1].numel()
                    if causal:
                        losses[0] += loss_ref
                        losses[1] += loss
                        predicted += count
                    _add_errors(sums, got, want, mask)
    finally:
        capture.remove()
        model.train(was_training)
    pooled = math.sqrt(sum(e for e, _ in sums.values()) / max(sum(n for _, n in sums.values()), 1e-300))
    quality = ConversionQuality(len(batches), tokens, pooled)
    quality.ffn_errors = {name: math.sqrt(err / max(energy, 1e-300)) for name, (err, energy) in sums.items()}
    if tokens == 0:
        quality.note = "the held-out batches hold no token (all padding)"
    elif causal and predicted == 0:
        quality.note = "the held-out texts have no next token to predict (one token each): hold out longer texts"
    elif causal:
        quality.loss_original, quality.loss_converted = losses[0] / predicted, losses[1] / predicted
        quality.predicted_tokens = predicted
    return quality
