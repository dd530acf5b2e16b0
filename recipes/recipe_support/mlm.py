"""The masked-LM pretraining model's pieces (recipes/run_mlm.py): the LM head at the masked positions only
(:class:`SparsePrediction`), its metrics with the dead and near-dead FFN units, and the ``hidden_act`` names."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hf_helu.activation import parse_activation_name
from hf_helu.errors import UsageError

IGNORE_INDEX = -100
NEAR_DEAD_RATE = 0.01  # a unit firing on fewer than 1% of the evaluation tokens (but some) is near-dead


def check_hidden_act(name: str) -> str:
    """``name`` if it is gelu, relu, helu or helu_<alpha>; else a UsageError saying what is accepted."""
    try:
        if name in ("gelu", "relu") or parse_activation_name(name) is not None:
            return name
    except ValueError as err:
        raise UsageError(f"--hidden_act {name!r}: {err}") from None
    raise UsageError(f"--hidden_act must be gelu, relu, helu or helu_<alpha> (e.g. helu_0.5), got {name!r}")


class SparsePrediction:
    """The LM head of a ``BertForMaskedLM`` at the labelled positions only (a pre-hook on ``model.cls``): ``loss``
    for training, ``eval_step`` for the evaluator (per-sequence sums that :func:`mlm_metrics` turns into loss,
    accuracy and perplexity). With ``firing_scope``, ``eval_step`` also counts per sequence how many positions made
    each FFN unit of that scope fire: the near-dead units the ActivationMonitor cannot tell."""

    def __init__(self, model: nn.Module, firing_scope: Any = None):
        from hf_helu.families import find_activation_sites

        self._positions: torch.Tensor | None = None
        self._fired: list[torch.Tensor] | None = None  # recording only inside eval_step: training pays nothing
        self.firing = firing_scope is not None
        model.cls.register_forward_pre_hook(self._gather)
        for site in find_activation_sites(model, scope=firing_scope) if self.firing else []:
            site.module.register_forward_hook(self._record)

    def _gather(self, module: nn.Module, args: tuple) -> tuple | None:
        return None if self._positions is None else (args[0][self._positions],)  # [masked positions, hidden]

    def _record(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._fired is not None:
            self._fired.append((output > 0).sum(dim=1, dtype=torch.int32))  # over positions: [batch, units]

    def logits(self, model: nn.Module, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits ``[N, vocab]`` at the N labelled positions, their labels ``[N]``), in row-major order."""
        labels = batch["labels"]
        self._positions = labels != IGNORE_INDEX
        try:
            logits = model(**{key: value for key, value in batch.items() if key != "labels"}).logits
        finally:
            positions, self._positions = self._positions, None
        return logits, labels[positions]

    def loss(self, model: nn.Module, batch: Mapping[str, Any]) -> torch.Tensor:
        """Mean cross-entropy over the labelled positions: ``BertForMaskedLM``'s loss, from 15% of the head."""
        logits, labels = self.logits(model, batch)
        return F.cross_entropy(logits.float(), labels)

    def eval_step(self, model: nn.Module, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Per sequence: loss sum, correct predictions, labelled positions (and firing counts; eval blocks unpadded)."""
        self._fired = [] if self.firing else None
        try:
            logits, labels = self.logits(model, batch)
            fired = torch.stack(self._fired, dim=1) if self.firing else None
        finally:
            self._fired = None
        rows, size = (batch["labels"] != IGNORE_INDEX).nonzero()[:, 0], batch["labels"].shape[0]
        losses = F.cross_entropy(logits.float(), labels, reduction="none")
        zeros = torch.zeros(size, device=losses.device)
        outputs = {
            "loss_sum": zeros.index_add(0, rows, losses),
            "correct": zeros.index_add(0, rows, (logits.argmax(-1) == labels).float()),
            "masked": zeros.index_add(0, rows, torch.ones_like(losses)),
        }
        if fired is not None:
            positions = torch.full((size,), batch["input_ids"].shape[1], device=losses.device)
            outputs |= {"fired": fired, "positions": positions}
        return outputs


def mlm_metrics(outputs: Mapping[str, Any], near_dead_rate: float = NEAR_DEAD_RATE) -> dict[str, float]:
    """Masked-LM loss, accuracy and perplexity over all labelled positions; with firing counts also the fractions
    of ``dead`` (never firing) and ``near_dead`` (firing on fewer than ``near_dead_rate`` of the tokens) units,
    overall and per layer (``dead_<i>``, ``near_dead_<i>``)."""
    masked = float(outputs["masked"].sum())
    loss = float(outputs["loss_sum"].sum()) / masked
    metrics = {"mlm_loss": loss, "mlm_accuracy": float(outputs["correct"].sum()) / masked}
    metrics |= {"perplexity": float(torch.tensor(loss).exp()), "masked_tokens": masked}
    if "fired" in outputs:
        rate = torch.as_tensor(outputs["fired"], dtype=torch.float64).sum(0) / float(outputs["positions"].sum())
        dead, near = rate == 0, (rate > 0) & (rate < near_dead_rate)
        metrics |= {"dead": float(dead.double().mean()), "near_dead": float(near.double().mean())}
        for layer in range(rate.shape[0]):
            metrics |= {f"dead_{layer}": float(dead[layer].double().mean())}
            metrics |= {f"near_dead_{layer}": float(near[layer].double().mean())}
    return metrics
