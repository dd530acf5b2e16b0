"""``hf-helu convert SRC DST --data PATH``: patch a checkpoint with HeLU and calibrate it on unlabeled text.

Calibration (:func:`hf_helu.conversion.calibrate_ffn`) refits each FFN output projection so that the ReLU forward
reproduces the original activation's outputs on the tokens of ``--samples`` texts: the swap then costs far less
(RESULTS.md 2.1, 2.3). Annealing needs the fine-tuning loop, so this command calibrates only.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

from huggingface_hub import ModelCard
from torch import nn

from hf_helu.activation import DEFAULT_ALPHA
from hf_helu.cli.common import (
    check_source_and_destination,
    check_text_model,
    load_config,
    load_tokenizer,
    transform_and_save,
)
from hf_helu.cli.texts import iter_text_batches, read_texts
from hf_helu.conversion import DEFAULT_RIDGE, ConversionResult, check_ridge, convert_model, ffn_sites
from hf_helu.conversion.auto import gated_decoder
from hf_helu.conversion.heap import keep_freed_memory
from hf_helu.conversion.thin_data import MIN_TOKENS_PER_FEATURE, minimum_calibration_tokens
from hf_helu.errors import UsageError
from hf_helu.inputs import alpha, positive_int
from hf_helu.model_card import conversion_card

DEFAULT_MAX_LENGTH = 128
DEFAULT_SAMPLES = 800
# Texts per calibration batch: a batch's transients (a block's intermediates) are a share of the peak memory, while
# the fit sums the same tokens at any size. SmolLM2-135M's defaults: 16 texts peak 1.84 GB, 32 texts 2.05 GB, at the
# same CPU time and perplexity (BENCHMARKS.md, "Calibration").
DEFAULT_BATCH_SIZE = 16
HELP = (
    "patch the FFN activations with HeLU and calibrate the FFN output projections on unlabeled text "
    "(calibration only: annealing needs training; for calibrate+anneal fine-tune the original checkpoint with the "
    "recipes, whose --conversion auto does both, or with hf_helu.convert_model)"
)


def _ridge(text: str) -> float:
    try:
        return check_ridge(float(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hf-helu convert`` (an entry of ``hf_helu.cli.COMMANDS``)."""
    parser.add_argument(
        "src", help="model folder, GGUF file (or folder with one) or Hub id, with its tokenizer (text models)"
    )
    parser.add_argument("dst", help="output folder (must not exist or be empty, unless --overwrite)")
    parser.add_argument(
        "--data",
        required=True,
        help="unlabeled text: a text file (one text a line), a GLUE .tsv file, or a GLUE task folder (its train.tsv, "
        "else its dev set)",
    )
    parser.add_argument("--alpha", type=alpha, default=DEFAULT_ALPHA, help=f"HeLU margin (default {DEFAULT_ALPHA})")
    parser.add_argument(
        "--samples",
        type=positive_int,
        default=DEFAULT_SAMPLES,
        help=f"calibrate on the first N texts ({DEFAULT_SAMPLES})",
    )
    parser.add_argument("--ridge", type=_ridge, default=DEFAULT_RIDGE, help=f"ridge lambda x tokens ({DEFAULT_RIDGE})")
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=DEFAULT_BATCH_SIZE,
        help=f"texts per calibration batch ({DEFAULT_BATCH_SIZE})",
    )
    parser.add_argument(
        "--max-length",
        type=positive_int,
        default=None,
        help=f"truncate to this many tokens (default {DEFAULT_MAX_LENGTH}, or the model's positions when fewer)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")


def calibration_texts(data: str, samples: int) -> list[tuple[str, str | None]]:
    """The first ``samples`` texts of ``data``; a GLUE task folder gives its training set when it has one."""
    path = Path(data)
    train = path / "train.tsv"
    try:
        texts = read_texts(train if path.is_dir() and train.is_file() else path)
    except (OSError, ValueError) as error:
        raise UsageError(str(error)) from None
    return texts[:samples]


def max_positions(config: object) -> int | None:
    """The most positions the model's position embeddings cover (None when it has no such limit, e.g. T5)."""
    for name in ("max_position_embeddings", "n_positions", "max_source_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def fit_and_held_out(
    tokenizer, texts: list[tuple[str, str | None]], batch_size: int, max_length: int
) -> tuple[list[dict], list[dict]]:
    """Tokenised calibration batches: the fit batches and the held-out ones (the last eighth of the texts' batches,
    as :func:`hf_helu.conversion.convert.split_holdout` takes them), each sorted by length so that a batch pads little
    (the tokens fitted are the same; padding is computed but left out of the fit)."""
    batches = -(-len(texts) // batch_size)
    if batches >= 2:
        cut = (batches - max(1, batches // 8)) * batch_size
    else:  # one batch: its last eighth of the rows, at least one
        cut = len(texts) - max(1, len(texts) // 8) if len(texts) >= 2 else len(texts)

    def by_length(part: list[tuple[str, str | None]]) -> list[dict]:
        lengths = [len(tokenizer(a, b, truncation=True, max_length=max_length)["input_ids"]) for a, b in part]
        ordered = [part[i] for i in sorted(range(len(part)), key=lengths.__getitem__)]
        return list(iter_text_batches(tokenizer, ordered, batch_size, max_length))

    return by_length(texts[:cut]), by_length(texts[cut:]) if cut < len(texts) else []


def count_tokens(batches: list[dict]) -> int:
    return sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)


def estimate_seconds(model: nn.Module, tokens: int) -> float:
    """A rough wall-clock estimate of calibration: about two block passes per layer over the tokens (the original
    stream and the converted one) plus the normal equations (``2 d_ff^2`` per token and layer), at the float32
    matmul rate of this machine, measured at the call on a 512-square product."""
    import time

    import torch

    a = torch.randn(512, 512)
    a @ a
    start = time.perf_counter()
    for _ in range(8):
        a @ a
    rate = 8 * 2 * 512**3 / max(time.perf_counter() - start, 1e-9)
    blocks = sum(p.numel() for name, p in model.named_parameters() if ".layers." in name or ".layer." in name)
    sites = ffn_sites(model)
    widest = minimum_calibration_tokens(model, sites) / MIN_TOKENS_PER_FEATURE
    return tokens * (2 * 2 * blocks + 2 * widest**2 * len(sites)) / rate


def run_convert(args: argparse.Namespace) -> int:
    """``hf-helu convert``: the texts and the tokenizer first (fail fast), then load, check the data is enough,
    patch, calibrate (with a progress bar), save with a model card."""
    keep_freed_memory()  # this process calibrates: freed pages are reused, not faulted in afresh (BENCHMARKS.md)
    src = check_source_and_destination(args.src, args.dst, args.overwrite)
    check_text_model(src)
    limit = max_positions(load_config(src))
    if args.max_length is None:
        args.max_length = DEFAULT_MAX_LENGTH if limit is None else min(DEFAULT_MAX_LENGTH, limit)
    elif limit is not None and args.max_length > limit:
        raise UsageError(f"--max-length {args.max_length} exceeds the {limit} positions the model covers")
    texts = calibration_texts(args.data, args.samples)
    try:
        tokenizer = load_tokenizer(src)
    except UsageError:
        raise
    except Exception as error:
        raise UsageError(f"cannot load a tokenizer from {args.src!r} (text models only): {error}") from None
    padding = tokenizer  # DST gets SRC's tokenizer as it is; batches need a pad token
    if tokenizer.pad_token is None:  # decoder LMs often have none; padding is masked out of the fit anyway
        padding = copy.deepcopy(tokenizer)
        padding.pad_token = tokenizer.eos_token
    fit, held_out = fit_and_held_out(padding, texts, args.batch_size, args.max_length)
    del padding
    fit_tokens = count_tokens(fit)

    def convert(model: nn.Module) -> ConversionResult:
        needed = minimum_calibration_tokens(model)
        if fit_tokens < needed:
            raise UsageError(
                f"--data gives {fit_tokens} fit tokens ({len(texts)} texts, {len(held_out)} batch(es) held out), "
                f"fewer than the {needed} this model needs ({MIN_TOKENS_PER_FEATURE} per input feature of its FFN "
                "output projections): the fit would memorise them. Give more text (--samples, --max-length)."
            )
        print(
            f"calibrating on {fit_tokens} tokens ({len(fit)} batches; {count_tokens(held_out)} tokens held out), "
            f"{len(ffn_sites(model))} layers: about {estimate_seconds(model, fit_tokens) / 60:.1f} minutes "
            "(estimate)",
            file=sys.stderr,
            flush=True,
        )
        target = "model" if gated_decoder(model) else "layer"  # what auto measured best per family
        result = convert_model(
            model,
            "calibrate",
            activation="helu",
            alpha=args.alpha,
            calibration_batches=fit + held_out,
            ridge=args.ridge,
            target=target,
            holdout=len(held_out),
            progress=True,
        )
        return result

    def card(model: nn.Module, result: ConversionResult) -> ModelCard:
        quality = result.quality.to_dict() if result.quality is not None else None
        return conversion_card(
            args.src,
            activation="helu",
            alpha=args.alpha,
            method=f"calibrate (target {result.calibration.target}, ridge {args.ridge:g})",
            calibration_tokens=fit_tokens,
            results={key: value for key, value in (quality or {}).items() if key != "ffn_errors"},
            details=report(result),
        )

    def report(result: ConversionResult) -> str:
        kept = f"\nkept {result.quality}" if result.quality is not None else ""
        return f"{result.patch_report}\n{result.calibration}\non {len(texts)} texts of {args.data}{kept}"

    note = " (calibrated; annealing needs training: see hf-helu convert --help)"
    return transform_and_save(args, convert, saved_note=note, card=card, describe=report, tokenizer=tokenizer)
