"""``hf-helu convert SRC DST --data PATH``: patch a checkpoint with HeLU and calibrate it on unlabeled text.

Calibration (:func:`hf_helu.conversion.calibrate_ffn`) refits each FFN output projection so that the ReLU forward
reproduces the original activation's outputs on the tokens of ``--samples`` texts: the swap then costs far less
(RESULTS.md 2.1, 2.3). Annealing needs the fine-tuning loop, so this command calibrates only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from torch import nn

from hf_helu.activation import DEFAULT_ALPHA
from hf_helu.cli.common import check_source_and_destination, check_text_model, load_tokenizer, transform_and_save
from hf_helu.cli.texts import iter_text_batches, read_texts
from hf_helu.conversion import DEFAULT_RIDGE, check_ridge, convert_model
from hf_helu.conversion.auto import gated_decoder
from hf_helu.errors import UsageError
from hf_helu.inputs import alpha, positive_int

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
    parser.add_argument("--samples", type=positive_int, default=800, help="calibrate on the first N texts (800)")
    parser.add_argument("--ridge", type=_ridge, default=DEFAULT_RIDGE, help=f"ridge lambda x tokens ({DEFAULT_RIDGE})")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--max-length", type=positive_int, default=128, help="truncate to this many tokens")
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


def run_convert(args: argparse.Namespace) -> int:
    """``hf-helu convert``: the texts and the tokenizer first (fail fast), then load, patch, calibrate, save."""
    src = check_source_and_destination(args.src, args.dst, args.overwrite)
    check_text_model(src)
    texts = calibration_texts(args.data, args.samples)
    try:
        tokenizer = load_tokenizer(src)
    except UsageError:
        raise
    except Exception as error:
        raise UsageError(f"cannot load a tokenizer from {args.src!r} (text models only): {error}") from None
    if tokenizer.pad_token is None:  # decoder LMs often have none; padding is masked out of the fit anyway
        tokenizer.pad_token = tokenizer.eos_token
    batches = list(iter_text_batches(tokenizer, texts, args.batch_size, args.max_length))

    def convert(model: nn.Module) -> str:
        dtype = next(model.parameters()).dtype
        model.float()  # the fit runs in float32/float64 whatever the stored dtype; saved back in it
        target = "model" if gated_decoder(model) else "layer"  # what auto measured best per family
        result = convert_model(
            model,
            "calibrate",
            activation="helu",
            alpha=args.alpha,
            calibration_batches=batches,
            ridge=args.ridge,
            target=target,
        )
        model.to(dtype)
        kept = f"\nkept {result.quality}" if result.quality is not None else ""
        return f"{result.patch_report}\n{result.calibration}\non {len(texts)} texts of {args.data}{kept}"

    note = " (calibrated; annealing needs training: see hf-helu convert --help)"
    return transform_and_save(args, convert, saved_note=note)
