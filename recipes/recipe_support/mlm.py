"""Masked-LM pretraining data: a text corpus as contiguous blocks of token ids, served in rounds.

- :func:`read_corpus`: the lines of a corpus split: local WikiText-2 (``$HF_HELU_DATA_DIR/wikitext-2``, data README
  section 4), any text files, or a hub dataset's text column; WikiText's ``<unk>`` becomes the tokenizer's unknown
  token (its literal spelling would be split into ``<``, ``un``, ``##k``, ``>``).
- :func:`token_blocks`: every non-blank line tokenized, concatenated into one stream, cut into blocks of
  ``block_size`` ids (``[CLS] ... [SEP]``); the tail shorter than a block is dropped.
- :class:`BlockRounds`: the blocks in a seeded order, cut into equal rounds; the training loop's "epoch" e is round
  e, so evaluating and checkpointing at every epoch end means every ``round_blocks`` blocks, and no block is seen
  twice before the corpus is exhausted (then a new pass in a new order begins).
- :func:`masked_eval_set`: evaluation blocks masked once with a fixed seed, so every evaluation of every run scores
  the same positions.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from hf_helu.errors import UsageError
from recipe_support.paths import DATA_DIR_ENV, data_path

WIKITEXT_DIR = "wikitext-2"
WIKITEXT_UNK = "<unk>"
SPLITS = ("train", "valid")


def read_text_files(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The lines of ``paths`` in order (``datasets.load_dataset("text")``, one file at a time); a missing, empty or
    non-UTF-8 file is an error naming it (nothing silently skipped)."""
    import datasets

    lines: list[str] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise UsageError(f"corpus file {path} not found")
        try:
            text = datasets.load_dataset("text", data_files=str(path), split="train")["text"]
        except datasets.exceptions.DatasetGenerationError as error:
            if not isinstance(error.__cause__, UnicodeDecodeError):
                raise
            raise UsageError(_not_utf8(path)) from None
        if not any(line.strip() for line in text):
            raise UsageError(f"corpus file {path} holds no text")
        lines += text
    return lines


def _not_utf8(path: Path) -> str:
    """Which line of ``path`` holds its first byte that is not UTF-8 (the whole file read again: the decoder's
    offset is within one chunk of it)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        where = f"line {line} holds byte 0x{data[error.start]:02x}"
        return f"corpus file {path} is not UTF-8 text: {where} ({error.reason})"
    return f"corpus file {path} is not UTF-8 text"


def read_hub_dataset(name: str, config: str | None, split: str, column: str = "text") -> list[str]:
    """The ``column`` of a hub dataset's ``split`` (``datasets.load_dataset``; needs the hub)."""
    import datasets

    dataset = datasets.load_dataset(name, config, split=split)
    if column not in dataset.column_names:
        raise UsageError(f"dataset {name} has no column {column!r}; columns: {dataset.column_names}")
    return list(dataset[column])


def read_corpus(
    split: str,
    *,
    files: Sequence[str | os.PathLike] | None = None,
    dataset: str | None = None,
    dataset_config: str | None = None,
    unk_token: str | None = None,
) -> list[str]:
    """The lines of ``split`` (train|valid): ``files``, else hub ``dataset``, else local WikiText-2.

    ``unk_token`` replaces every WikiText ``<unk>`` (None: left as written).
    """
    if split not in SPLITS:
        raise UsageError(f"split must be one of {SPLITS}, got {split!r}")
    if files is not None and dataset is not None:
        raise UsageError("give text files or a hub dataset, not both")
    if files is not None:
        lines = read_text_files(files)
    elif dataset is not None:
        lines = read_hub_dataset(dataset, dataset_config, "validation" if split == "valid" else split)
    else:
        folder = data_path(WIKITEXT_DIR)
        if folder is None or not folder.is_dir():
            where = f"at {folder}" if folder is not None else f"(${DATA_DIR_ENV} is not set)"
            raise UsageError(f"no corpus: WikiText-2 not found {where}; pass text files or a hub dataset")
        lines = read_text_files([folder / f"{split}.txt"])
    return [line.replace(WIKITEXT_UNK, unk_token) for line in lines] if unk_token is not None else lines


def token_blocks(lines: Iterable[str], tokenizer: Any, block_size: int, max_blocks: int | None = None) -> torch.Tensor:
    """Contiguous blocks ``[n, block_size]`` of ``[CLS] ids... [SEP]`` from the non-blank ``lines``.

    Documents run on across block boundaries (as in BERT / Cramming pretraining); ``max_blocks`` keeps the first
    ones (and tokenizes only as many lines as they need).
    """
    if block_size < 3:
        raise UsageError(f"block_size must be >= 3 (room for [CLS], [SEP] and one token), got {block_size}")
    if tokenizer.cls_token_id is None or tokenizer.sep_token_id is None:
        raise UsageError(f"tokenizer {type(tokenizer).__name__} has no [CLS]/[SEP] tokens; a BERT tokenizer is needed")
    body = block_size - 2
    stream: list[int] = []
    texts = [line.strip() for line in lines if line.strip()]
    chunk = 2048
    for start in range(0, len(texts), chunk):
        for ids in tokenizer(texts[start : start + chunk], add_special_tokens=False)["input_ids"]:
            stream += ids
        if max_blocks is not None and len(stream) >= max_blocks * body:
            break
    count = len(stream) // body if max_blocks is None else min(len(stream) // body, max_blocks)
    if count == 0:
        raise UsageError(f"the corpus has {len(stream)} tokens: fewer than one block of {body} (+2 special) tokens")
    ids = torch.tensor(stream[: count * body], dtype=torch.long).view(count, body)
    cls = torch.full((count, 1), tokenizer.cls_token_id, dtype=torch.long)
    sep = torch.full((count, 1), tokenizer.sep_token_id, dtype=torch.long)
    return torch.cat([cls, ids, sep], dim=1)


class BlockRounds(torch.utils.data.Dataset):
    """``round_blocks`` blocks per round, taken in order from a seeded stream of passes over ``blocks``.

    Round ``e`` (set by the loop through ``set_epoch``) holds stream items ``e * round_blocks ...``; pass ``p`` of the
    stream is ``blocks`` in the order ``randperm(n, seed + p)``. Items are ``{"input_ids": LongTensor[block],
    "position": int}`` (the stream position, which :class:`SeededMasking` seeds the masking with).
    """

    def __init__(self, blocks: torch.Tensor, round_blocks: int, seed: int = 0):
        if blocks.ndim != 2 or blocks.shape[0] == 0:
            raise UsageError(f"blocks must be a non-empty [n, block_size] tensor, got shape {tuple(blocks.shape)}")
        if round_blocks < 1:
            raise UsageError(f"round_blocks must be >= 1, got {round_blocks}")
        self.blocks = blocks
        self.round_blocks = round_blocks
        self.seed = seed
        self.epoch = 0
        self._orders: dict[int, torch.Tensor] = {}

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.round_blocks

    def _order(self, stream_pass: int) -> torch.Tensor:
        if stream_pass not in self._orders:
            generator = torch.Generator().manual_seed(self.seed + stream_pass)
            self._orders[stream_pass] = torch.randperm(self.blocks.shape[0], generator=generator)
        return self._orders[stream_pass]

    def block_index(self, index: int) -> int:
        """Which block item ``index`` of the current round is."""
        if not 0 <= index < self.round_blocks:
            raise IndexError(f"index {index} out of range for a round of {self.round_blocks} blocks")
        position = self.epoch * self.round_blocks + index
        stream_pass, offset = divmod(position, self.blocks.shape[0])
        return int(self._order(stream_pass)[offset])

    def __getitem__(self, index: int) -> dict[str, Any]:
        position = self.epoch * self.round_blocks + index
        return {"input_ids": self.blocks[self.block_index(index)], "position": position}


class SeededMasking:
    """A collate_fn: ``collator`` (``DataCollatorForLanguageModeling``) under a seed drawn from ``seed`` and the
    batch's first stream position, with the global RNG left as it was.

    The masking of a batch then depends on the data only, not on when it is collated: Accelerate's loader collates
    one batch ahead, so a masking drawn from the global RNG would differ after a resume (the checkpoint's RNG state
    is that of a step whose next batch was already masked).
    """

    def __init__(self, collator: Any, seed: int = 0):
        self.collator = collator
        self.seed = seed

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not items or "position" not in items[0]:
            raise ValueError("SeededMasking needs items with a stream 'position' (BlockRounds items)")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, int(items[0]["position"]))) & (2**63 - 1))
            return self.collator([{"input_ids": item["input_ids"]} for item in items])


def masked_eval_set(blocks: torch.Tensor, collator: Any, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``blocks`` masked once by ``collator`` (a ``DataCollatorForLanguageModeling``) under a fixed ``seed``.

    Returns one item per block (``input_ids``, ``labels``); the global RNG is left as it was.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        batch = collator([{"input_ids": block} for block in blocks])
    return [
        {"input_ids": ids, "labels": labels} for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True)
    ]


stack_batch = torch.utils.data.default_collate  # the eval loader's collate_fn: equal-length items stacked
