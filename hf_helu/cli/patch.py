"""``hf-helu patch SRC DST``: replace the FFN (or all config) activations of a checkpoint with HeLU."""

from __future__ import annotations

import argparse

from hf_helu.activation import DEFAULT_ALPHA
from hf_helu.cli.common import transform_and_save
from hf_helu.families import SCOPES
from hf_helu.inputs import alpha
from hf_helu.patching import patch_model


def add_patch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="model folder, GGUF file (or folder with one) or Hub id")
    parser.add_argument("dst", help="output folder (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--alpha", type=alpha, default=DEFAULT_ALPHA, help=f"HeLU margin (default {DEFAULT_ALPHA})")
    parser.add_argument("--scope", choices=SCOPES, default="ffn", help="'ffn' (default) or 'all' config activations")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")


def run_patch(args: argparse.Namespace) -> int:
    return transform_and_save(args, lambda model: patch_model(model, alpha=args.alpha, scope=args.scope))
