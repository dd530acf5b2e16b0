"""``hf-helu export SRC DST``: turn HeLU back into ReLU so stock transformers loads the checkpoint."""

from __future__ import annotations

import argparse

from hf_helu.cli.common import transform_and_save
from hf_helu.patching import export_for_inference


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="HeLU-patched model folder or Hub id")
    parser.add_argument("dst", help="output folder, loadable by stock transformers (ReLU)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")


def run_export(args: argparse.Namespace) -> int:
    return transform_and_save(args, export_for_inference, " (stock transformers can load it; no hf_helu needed)")
