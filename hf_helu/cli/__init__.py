"""``hf-helu``: patch a checkpoint with HeLU, export it back to stock ReLU, or inspect its activations.

    hf-helu patch SRC DST [--alpha A] [--scope ffn|all] [--overwrite]
    hf-helu convert SRC DST --data PATH [--alpha A] [--samples N] [--overwrite]   # patch + calibration
    hf-helu export SRC DST [--overwrite] [--onnx [--quantize int8]]
    hf-helu inspect SRC [--json]
    hf-helu inspect-activations SRC --data PATH [--max-samples N] [--alpha A] [--json FILE]

SRC is a local model folder, a GGUF file (or a folder holding one; loaded dequantized to float32, saved as an
ordinary model with the file's tokenizer) or a Hugging Face Hub id (online only). DST is written through a temp
folder beside it and renamed at the end, so a failure never leaves a partial DST. Everything in a
local SRC that is not weights or config (tokenizer, processor, sentence-transformers files) is copied,
never following a link out of SRC (:mod:`hf_helu.cli.extras`). DST may never be SRC, inside it or hold
it, and one writer per DST at a time (:mod:`hf_helu.cli.destination`); all of this is checked before
the model loads.

Each subcommand is a module of this package with an ``(add_arguments, run)`` pair, listed in :data:`COMMANDS`;
adding one is adding a module and a line. What the commands share is in :mod:`hf_helu.cli.common`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import hf_helu
from hf_helu.cli.convert import HELP as CONVERT_HELP
from hf_helu.cli.convert import add_convert_arguments, run_convert
from hf_helu.cli.export import add_export_arguments, run_export
from hf_helu.cli.inspect import add_inspect_arguments, run_inspect
from hf_helu.cli.inspect_activations import add_inspect_activations_arguments, run_inspect_activations
from hf_helu.cli.patch import add_patch_arguments, run_patch
from hf_helu.errors import UsageError

Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

COMMANDS: list[Command] = [
    ("patch", "replace the FFN activations of a checkpoint with HeLU", add_patch_arguments, run_patch),
    ("convert", CONVERT_HELP, add_convert_arguments, run_convert),
    ("export", "turn HeLU back into ReLU so stock transformers loads the model", add_export_arguments, run_export),
    ("inspect", "print the architecture, FFN activations, activation and alpha", add_inspect_arguments, run_inspect),
    (
        "inspect-activations",
        "per-layer dead units and sparsity of the FFN activations on a dataset",
        add_inspect_activations_arguments,
        run_inspect_activations,
    ),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-helu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=f"hf-helu {hf_helu.__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, help_text, add_arguments, run in COMMANDS:
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        add_arguments(sub)
        sub.set_defaults(run=run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``hf-helu``; returns the exit status (0 ok, 2 user error)."""
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UsageError as error:
        print(f"hf-helu {args.command}: error: {error}", file=sys.stderr)
        return 2


__all__ = ["COMMANDS", "build_parser", "main"]
