"""The masked-LM model of a pretraining run: a BERT config from a size preset, and the LM head computed only at the
masked positions (Cramming's "sparse prediction").

A ``BertForMaskedLM`` computes its 30,522-way head at every position, though only the ~15% masked ones carry a
loss. :class:`SparsePrediction` puts a forward pre-hook on the model's own ``cls`` head that gathers the hidden
states of the positions whose label is not -100 before the head runs, so the head (and its backward) costs 15% of
the full one. The model, its state dict and what ``save_pretrained`` writes stay a stock ``BertForMaskedLM``; the
hook goes through the model's normal ``forward`` (so DDP wrapping is unaffected).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hf_helu.activation import parse_activation_name
from hf_helu.errors import UsageError

IGNORE_INDEX = -100

# Size presets (layers, hidden, heads, FFN width): from a CPU smoke test up to BERT-base.
SIZE_PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(num_hidden_layers=2, hidden_size=128, num_attention_heads=2, intermediate_size=512),
    "mini": dict(num_hidden_layers=4, hidden_size=256, num_attention_heads=4, intermediate_size=1024),
    "small": dict(num_hidden_layers=4, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
    "medium": dict(num_hidden_layers=8, hidden_size=512, num_attention_heads=8, intermediate_size=2048),
    "base": dict(num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072),
}
STOCK_ACTIVATIONS = ("gelu", "relu")


def check_hidden_act(name: str) -> str:
    """``name`` if it is gelu, relu, helu or helu_<alpha>; else a ValueError saying what is accepted."""
    if name in STOCK_ACTIVATIONS:
        return name
    try:
        if parse_activation_name(name) is not None:
            return name
    except ValueError as err:
        raise UsageError(f"--hidden_act {name!r}: {err}") from None
    raise UsageError(f"--hidden_act must be gelu, relu, helu or helu_<alpha> (e.g. helu_0.5), got {name!r}")


def parse_overrides(text: str | None, config_class: Any = None) -> dict[str, Any]:
    """``"num_hidden_layers=2,hidden_dropout_prob=0.0"`` -> the fields it sets, typed as ``config_class``'s
    (default ``BertConfig``) by ``PretrainedConfig.update_from_string``."""
    from transformers import BertConfig

    if not text:
        return {}
    config = (config_class or BertConfig)()
    try:
        config.update_from_string(text)
    except (ValueError, TypeError) as err:
        raise UsageError(
            f"--config_overrides {text!r}: {err}; expected key=value[,key=value...] over the int, float, bool and "
            f"string fields of {type(config).__name__}"
        ) from None
    return {key: getattr(config, key) for key in (part.partition("=")[0] for part in text.split(","))}


def bert_config(preset: str, hidden_act: str, vocab_size: int, max_length: int, **overrides: Any) -> Any:
    """A ``BertConfig`` of size ``preset`` with ``hidden_act``, the tokenizer's ``vocab_size``, and ``overrides``."""
    from transformers import BertConfig

    if preset not in SIZE_PRESETS:
        raise UsageError(f"--size must be one of {sorted(SIZE_PRESETS)}, got {preset!r}")
    fields = {**SIZE_PRESETS[preset], "vocab_size": vocab_size, "max_position_embeddings": max(512, max_length)}
    fields["hidden_act"] = check_hidden_act(hidden_act)
    default = BertConfig()
    unknown = sorted(key for key in overrides if not hasattr(default, key))
    if unknown:
        raise UsageError(f"--config_overrides: BertConfig has no field(s) {unknown}")
    if "hidden_act" in overrides:
        raise UsageError("--config_overrides may not set hidden_act; use --hidden_act")
    fields.update(overrides)
    config = BertConfig(**fields)
    if config.hidden_size % config.num_attention_heads:
        raise UsageError(
            f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads {config.num_attention_heads}"
        )
    return config


def _base(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)) else model


class FiringCounts:
    """Per sequence and FFN unit, how many positions made the unit fire (output > 0), read during ``eval_step``.

    The :class:`hf_helu.diagnostics.ActivationMonitor` says which units never fire; these counts also give the
    *near-dead* units (firing on a small share of the evaluation tokens). Forward hooks on the FFN activations
    (``scope`` as in :func:`hf_helu.families.find_activation_sites`) record only while :meth:`collect` runs, so
    training forwards pay nothing. Positions are dim 1 of each activation output ``[batch, positions, units]``.
    """

    def __init__(self, model: nn.Module, scope: Any = "ffn"):
        from hf_helu.families import find_activation_sites

        sites = find_activation_sites(_base(model), scope=scope)
        if not sites:
            raise ValueError(f"no FFN activation found in {type(_base(model)).__name__} for scope={scope!r}")
        self.names = [site.name for site in sites]
        self._recording: list[torch.Tensor] | None = None
        self._handles = [site.module.register_forward_hook(self._record) for site in sites]

    def _record(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._recording is not None:
            self._recording.append((output > 0).sum(dim=1, dtype=torch.int32))

    def collect(self, forward: Any) -> tuple[Any, torch.Tensor]:
        """``forward()``'s result and the counts ``[batch, layers, units]`` of the activations it ran."""
        self._recording = []
        try:
            result = forward()
            recorded = self._recording
        finally:
            self._recording = None
        if len(recorded) != len(self.names):
            raise RuntimeError(f"expected one call of each of {len(self.names)} FFN activations, got {len(recorded)}")
        return result, torch.stack(recorded, dim=1)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


class SparsePrediction:
    """The LM head of a ``BertForMaskedLM`` at the labelled positions only (a forward pre-hook on ``model.cls``).

    ``loss(model, batch)`` is the training loss (run_mlm.py's loop calls it); ``eval_step(model, batch)`` gives
    per-sequence loss sums, correct predictions and masked counts (the evaluator's ``eval_step``);
    :func:`mlm_metrics` turns those into loss, accuracy and perplexity.
    """

    def __init__(self, model: nn.Module, firing: FiringCounts | None = None):
        head = getattr(_base(model), "cls", None)
        if not isinstance(head, nn.Module):
            raise TypeError(f"{type(_base(model)).__name__} has no `cls` LM head; a BertForMaskedLM is needed")
        self._positions: torch.Tensor | None = None
        self.firing = firing
        self._handle = head.register_forward_pre_hook(self._gather)

    def _gather(self, module: nn.Module, args: tuple) -> tuple | None:
        if self._positions is None:
            return None
        (hidden,) = args
        return (hidden[self._positions],)  # [masked positions, hidden]

    def remove(self) -> None:
        self._handle.remove()

    def logits(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits ``[N, vocab]`` at the N labelled positions, their labels ``[N]``); positions in row-major order."""
        labels = batch["labels"]
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        self._positions = labels != IGNORE_INDEX
        try:
            logits = model(**inputs).logits
        finally:
            positions, self._positions = self._positions, None
        return logits, labels[positions]

    def loss(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        """Mean cross-entropy over the labelled positions: ``BertForMaskedLM``'s loss, from 15% of the head."""
        logits, labels = self.logits(model, batch)
        return F.cross_entropy(logits.float(), labels)

    def eval_step(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Per sequence: summed loss, correct top-1 predictions, labelled positions (and, with ``firing``, the
        positions and per-unit firing counts ``[layers, units]``; eval blocks carry no padding)."""
        if "attention_mask" in batch and not bool(batch["attention_mask"].all()):
            raise ValueError("eval_step counts firing over every position: evaluation blocks must have no padding")
        if self.firing is None:
            logits, labels = self.logits(model, batch)
            fired = None
        else:
            (logits, labels), fired = self.firing.collect(lambda: self.logits(model, batch))
        rows = (batch["labels"] != IGNORE_INDEX).nonzero()[:, 0]
        size = batch["labels"].shape[0]
        losses = F.cross_entropy(logits.float(), labels, reduction="none")
        correct = (logits.argmax(-1) == labels).float()
        zeros = torch.zeros(size, device=losses.device)
        outputs = {
            "loss_sum": zeros.index_add(0, rows, losses),
            "correct": zeros.index_add(0, rows, correct),
            "masked": zeros.index_add(0, rows, torch.ones_like(losses)),
        }
        if fired is not None:
            outputs["fired"] = fired
            outputs["positions"] = torch.full((size,), batch["input_ids"].shape[1], device=losses.device)
        return outputs


NEAR_DEAD_RATE = 0.01  # a unit firing on fewer than 1% of the evaluation tokens (but some) is near-dead


def mlm_metrics(outputs: Mapping[str, Any], near_dead_rate: float = NEAR_DEAD_RATE) -> dict[str, float]:
    """Masked-LM loss, accuracy and perplexity over all labelled positions (``SparsePrediction.eval_step`` sums);
    with firing counts, also per layer ``dead_<i>`` (never fires) and ``near_dead_<i>`` (fires, on fewer than
    ``near_dead_rate`` of the tokens), and the same over all layers (``dead``, ``near_dead``), as fractions."""
    metrics = _loss_metrics(outputs)
    if "fired" in outputs:
        metrics.update(firing_metrics(outputs["fired"], outputs["positions"], near_dead_rate))
    return metrics


def firing_metrics(fired: Any, positions: Any, near_dead_rate: float = NEAR_DEAD_RATE) -> dict[str, float]:
    """Dead and near-dead unit fractions, per layer and overall, from per-sequence counts ``[seqs, layers, units]``."""
    rate = torch.as_tensor(fired, dtype=torch.float64).sum(0) / float(torch.as_tensor(positions).sum())
    dead = rate == 0
    near = (rate > 0) & (rate < near_dead_rate)
    metrics = {"dead": float(dead.double().mean()), "near_dead": float(near.double().mean())}
    for layer in range(rate.shape[0]):
        metrics[f"dead_{layer}"] = float(dead[layer].double().mean())
        metrics[f"near_dead_{layer}"] = float(near[layer].double().mean())
    return metrics


def _loss_metrics(outputs: Mapping[str, Any]) -> dict[str, float]:
    masked = float(outputs["masked"].sum())
    if masked == 0:
        raise ValueError("the evaluation set has no masked positions")
    loss = float(outputs["loss_sum"].sum()) / masked
    return {
        "mlm_loss": loss,
        "mlm_accuracy": float(outputs["correct"].sum()) / masked,
        "perplexity": float(torch.tensor(loss).exp()),
        "masked_tokens": masked,
    }
