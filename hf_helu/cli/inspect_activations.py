"""``hf-helu inspect-activations SRC --data PATH``: per-layer dead units and sparsity of a text model on a dataset."""

from __future__ import annotations

import argparse

import torch

from hf_helu.atomic import atomic_write_json
from hf_helu.cli.common import check_text_model, check_writable_file, load_checkpoint, load_tokenizer, resolve_source
from hf_helu.cli.texts import iter_text_batches, read_texts
from hf_helu.diagnostics import ActivationMonitor
from hf_helu.errors import UsageError
from hf_helu.families import SCOPES
from hf_helu.inputs import alpha, positive_int


def add_inspect_activations_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``hf-helu inspect-activations`` (an entry of ``hf_helu.cli.COMMANDS``)."""
    parser.add_argument("model", help="checkpoint folder or hub id, with its tokenizer")
    parser.add_argument(
        "--data", required=True, help="GLUE task folder (reads dev.tsv) or .tsv file, or a text file (one text a line)"
    )
    parser.add_argument("--max-samples", type=positive_int, default=512, help="use the first N texts (default 512)")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--max-length", type=positive_int, default=128, help="truncate to this many tokens")
    parser.add_argument("--scope", choices=SCOPES, default="ffn", help="FFN activations only, or all")
    parser.add_argument(
        "--alpha", type=alpha, default=None, help="report the band (-alpha, 0] for every activation, not only HeLU"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", dest="json_path", default=None, help="also write the statistics to this JSON file")


def run_inspect_activations(args: argparse.Namespace) -> int:
    """``hf-helu inspect-activations``: print the per-layer table of a checkpoint on a dataset."""
    if args.json_path:
        check_writable_file(args.json_path)  # before the (slow) load and forwards
    try:
        texts = read_texts(args.data)[: args.max_samples]
    except (OSError, ValueError) as error:
        raise UsageError(str(error)) from None
    folder = resolve_source(args.model)
    check_text_model(folder)
    try:
        tokenizer = load_tokenizer(folder)
    except Exception as error:
        raise UsageError(f"cannot load a tokenizer from {args.model!r} (text models only): {error}") from None
    model = load_checkpoint(folder).to(args.device).eval()
    if model.device.type == "cpu":
        model.float()
    with ActivationMonitor(model, scope=args.scope, alpha=args.alpha) as monitor, torch.inference_mode():
        for batch in iter_text_batches(tokenizer, texts, args.batch_size, args.max_length):
            model(**batch.to(args.device))
    stats = monitor.stats()
    print(f"{args.model} ({type(model).__name__}) on {len(texts)} texts of {args.data}")
    print(stats.table())
    if args.json_path:
        atomic_write_json(args.json_path, {"model": str(args.model), "data": str(args.data), **stats.to_dict()})
        print(f"wrote {args.json_path}")
    return 0
