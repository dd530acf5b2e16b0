"""``hf-helu export SRC DST``: turn HeLU back into ReLU so stock transformers loads the checkpoint.

With ``--onnx`` DST is an ONNX folder instead (``hf_helu.onnx_export``), served by ONNX Runtime without torch or
hf_helu; ``--quantize int8`` adds ONNX Runtime's dynamic int8 model beside the float32 one.
"""

from __future__ import annotations

import argparse

from hf_helu.cli.common import (
    check_source_and_destination,
    copy_extras,
    load_checkpoint,
    load_config,
    transform_and_save,
)
from hf_helu.cli.destination import sole_writer
from hf_helu.errors import UsageError
from hf_helu.patching import export_for_inference


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="HeLU-patched model folder, GGUF file (or folder with one) or Hub id")
    parser.add_argument("dst", help="output folder, loadable by stock transformers (ReLU), or ONNX with --onnx")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")
    parser.add_argument(
        "--onnx", action="store_true", help="write an ONNX folder (model.onnx, config, tokenizer) for ONNX Runtime"
    )
    parser.add_argument(
        "--quantize", choices=["int8"], default=None, help="with --onnx: also write model_quantized.onnx (dynamic int8)"
    )


def run_onnx_export(args: argparse.Namespace) -> int:
    """Check the request (flags, DST, architecture, onnxruntime) before loading the weights, then export."""
    from hf_helu.onnx_export import check_onnx_request, export_onnx

    src = check_source_and_destination(args.src, args.dst, args.overwrite)
    try:
        check_onnx_request(load_config(src), args.quantize)
    except (ValueError, ModuleNotFoundError) as error:
        raise UsageError(str(error)) from None
    with sole_writer(args.dst):
        model = load_checkpoint(src)
        try:
            report = export_onnx(
                model,
                args.dst,
                quantize=args.quantize,
                write_extras=lambda folder: copy_extras(src, folder),
                overwrite=args.overwrite,
            )
        except FileExistsError as error:  # DST appeared after the check; a ValueError is a bug, UsageError passes
            raise UsageError(str(error)) from None
    print(report)
    print(f"saved to {args.dst} (ONNX Runtime serves it; no torch or hf_helu needed)")
    return 0


def run_export(args: argparse.Namespace) -> int:
    if args.quantize is not None and not args.onnx:
        raise UsageError(f"--quantize {args.quantize} needs --onnx (quantized models are written as ONNX only)")
    if args.onnx:
        return run_onnx_export(args)
    return transform_and_save(args, export_for_inference, " (stock transformers can load it; no hf_helu needed)")
