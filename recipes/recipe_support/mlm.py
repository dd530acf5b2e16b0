"""Masked-LM pretraining (recipes/run_mlm.py): the corpus as contiguous ``[CLS] ... [SEP]`` blocks served in
seeded rounds (the loop's "epochs"; no block seen twice before the corpus is exhausted), the BERT config, the LM head
at the masked positions only (:class:`SparsePrediction`), and the dead and near-dead FFN units."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hf_helu.activation import parse_activation_name
from hf_helu.errors import UsageError
from recipe_support.paths import DATA_DIR_ENV, data_path, read_utf8

IGNORE_INDEX = -100
NEAR_DEAD_RATE = 0.01  # a unit firing on fewer than 1% of the evaluation tokens (but some) is near-dead


def read_corpus(split: str, *, files=None, dataset=None, dataset_config=None, unk_token=None) -> list[str]:
    """The lines of ``split`` ("train" or "valid"): text ``files``, else hub ``dataset``, else local WikiText-2, whose
    ``<unk>`` becomes ``unk_token`` (its literal spelling would be split into ``<``, ``un``, ``##k``, ``>``)."""
    if files is not None and dataset is not None:
        raise UsageError("give text files or a hub dataset, not both")
    if dataset is not None:
        import datasets

        lines = datasets.load_dataset(dataset, dataset_config, split="validation" if split == "valid" else split)
        if "text" not in lines.column_names:
            raise UsageError(f"dataset {dataset} has no column 'text'; columns: {lines.column_names}")
        lines = list(lines["text"])
    else:
        folder = data_path("wikitext-2")
        if files is None and (folder is None or not folder.is_dir()):
            where = f"at {folder}" if folder is not None else f"(${DATA_DIR_ENV} is not set)"
            raise UsageError(f"no corpus: WikiText-2 not found {where}; pass text files or a hub dataset")
        lines = []
        for path in map(Path, files if files is not None else [folder / f"{split}.txt"]):
            if not path.is_file():
                raise UsageError(f"corpus file {path} not found")
            text = read_utf8(path)
            if not text.strip():
                raise UsageError(f"corpus file {path} holds no text")
            lines += text.splitlines()
    return [line.replace("<unk>", unk_token) for line in lines] if unk_token is not None else lines


def token_blocks(lines: Iterable[str], tokenizer: Any, block_size: int, max_blocks: int | None = None) -> torch.Tensor:
    """Contiguous blocks ``[n, block_size]`` of ``[CLS] ids... [SEP]`` from the non-blank ``lines``; documents run on
    across blocks (as in BERT / Cramming pretraining); ``max_blocks`` keeps the first ones."""
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise UsageError(f"tokenizer {type(tokenizer).__name__} has no [CLS]/[SEP] tokens; a BERT tokenizer is needed")
    body, stream = block_size - 2, []
    texts = [line.strip() for line in lines if line.strip()]
    for start in range(0, len(texts), 2048):  # tokenized in chunks: max_blocks needs only the first lines
        stream += [
            i for ids in tokenizer(texts[start : start + 2048], add_special_tokens=False)["input_ids"] for i in ids
        ]
        if max_blocks is not None and len(stream) >= max_blocks * body:
            break
    count = min(len(stream) // body, max_blocks or len(stream))
    if count == 0:
        raise UsageError(f"the corpus has {len(stream)} tokens: fewer than one block of {body} (+2 special) tokens")
    ids = torch.tensor(stream[: count * body], dtype=torch.long).view(count, body)
    cls, sep = (torch.full((count, 1), t, dtype=torch.long) for t in (tokenizer.cls_token_id, tokenizer.sep_token_id))
    return torch.cat([cls, ids, sep], dim=1)


class BlockRounds(torch.utils.data.Dataset):
    """Round ``e`` (the loop's ``set_epoch``) holds items ``e * round_blocks ...`` of a stream whose pass ``p`` is
    ``blocks`` in the order ``randperm(n, seed + p)``; items carry their stream ``position`` (for masking)."""

    def __init__(self, blocks: torch.Tensor, round_blocks: int, seed: int = 0):
        self.blocks, self.round_blocks, self.seed, self.epoch = blocks, round_blocks, seed, 0
        self._orders: dict[int, torch.Tensor] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.round_blocks

    def __getitem__(self, index: int) -> dict[str, Any]:
        position = self.epoch * self.round_blocks + index
        stream_pass, offset = divmod(position, len(self.blocks))
        if stream_pass not in self._orders:
            generator = torch.Generator().manual_seed(self.seed + stream_pass)
            self._orders[stream_pass] = torch.randperm(len(self.blocks), generator=generator)
        return {"input_ids": self.blocks[self._orders[stream_pass][offset]], "position": position}


class SeededMasking:
    """A collate_fn: ``collator`` (``DataCollatorForLanguageModeling``) under a seed from ``seed`` and the batch's
    first stream position, the global RNG left as it was: accelerate's loader collates one batch ahead, so masking
    from the global RNG would differ after a resume."""

    def __init__(self, collator: Any, seed: int = 0):
        self.collator, self.seed = collator, seed

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, int(items[0]["position"]))) & (2**63 - 1))
            return self.collator([{"input_ids": item["input_ids"]} for item in items])


def masked_eval_set(blocks: torch.Tensor, collator: Any, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``blocks`` masked once under a fixed ``seed`` (every evaluation scores the same positions), global RNG kept."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        batch = collator([{"input_ids": block} for block in blocks])
    return [{"input_ids": i, "labels": lab} for i, lab in zip(batch["input_ids"], batch["labels"], strict=True)]


def check_hidden_act(name: str) -> str:
    """``name`` if it is gelu, relu, helu or helu_<alpha>; else a UsageError saying what is accepted."""
    try:
        if name in ("gelu", "relu") or parse_activation_name(name) is not None:
            return name
    except ValueError as err:
        raise UsageError(f"--hidden_act {name!r}: {err}") from None
    raise UsageError(f"--hidden_act must be gelu, relu, helu or helu_<alpha> (e.g. helu_0.5), got {name!r}")


class FiringCounts:
    """Per sequence and FFN unit, how many positions made it fire (output > 0), recorded only inside
    :meth:`collect` (training forwards pay nothing): the near-dead units the ActivationMonitor cannot tell."""

    def __init__(self, model: nn.Module, scope: Any = "ffn"):
        from hf_helu.families import find_activation_sites

        self._recording: list[torch.Tensor] | None = None
        for site in find_activation_sites(model, scope=scope):
            site.module.register_forward_hook(self._record)

    def _record(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        if self._recording is not None:
            self._recording.append((output > 0).sum(dim=1, dtype=torch.int32))  # over positions: [batch, units]

    def collect(self, forward: Any) -> tuple[Any, torch.Tensor]:
        """``forward()``'s result and the counts ``[batch, layers, units]`` of the activations it ran."""
        self._recording = []
        try:
            result, recorded = forward(), self._recording
        finally:
            self._recording = None
        return result, torch.stack(recorded, dim=1)


class SparsePrediction:
    """The LM head of a ``BertForMaskedLM`` at the labelled positions only: ``loss`` for training, ``eval_step`` for
    the evaluator (per-sequence sums that :func:`mlm_metrics` turns into loss, accuracy and perplexity)."""

    def __init__(self, model: nn.Module, firing: FiringCounts | None = None):
        self._positions: torch.Tensor | None = None
        self.firing = firing
        self._handle = model.cls.register_forward_pre_hook(self._gather)

    def _gather(self, module: nn.Module, args: tuple) -> tuple | None:
        return None if self._positions is None else (args[0][self._positions],)  # [masked positions, hidden]

    def remove(self) -> None:
        self._handle.remove()

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
        """Per sequence: summed loss, correct top-1 predictions, labelled positions, and with ``firing`` the
        positions and per-unit firing counts (eval blocks carry no padding)."""
        if self.firing is None:
            (logits, labels), fired = self.logits(model, batch), None
        else:
            (logits, labels), fired = self.firing.collect(lambda: self.logits(model, batch))
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
    if masked == 0:
        raise ValueError("the evaluation set has no masked positions")
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
