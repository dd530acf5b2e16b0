"""``hf-helu``: patch a checkpoint with HeLU, export it back to stock ReLU, or inspect its activations.

    hf-helu patch SRC DST [--alpha A] [--scope ffn|all] [--overwrite]
    hf-helu export SRC DST [--overwrite]
    hf-helu inspect SRC [--json]
    hf-helu inspect-activations SRC --data PATH [--max-samples N] [--alpha A] [--json FILE]

SRC is a local model folder or a Hugging Face Hub id (online only). DST is written through a temp
folder beside it and renamed at the end, so a failure never leaves a partial DST. Everything in a
local SRC that is not weights or config (tokenizer, processor, sentence-transformers files) is copied.

Each subcommand is a ``(add_arguments, run)`` pair in :data:`COMMANDS`; adding one is adding a pair.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import transformers
from torch import nn

import hf_helu
from hf_helu.activation import DEFAULT_ALPHA, HeLU, validate_alpha
from hf_helu.atomic import atomic_directory
from hf_helu.diagnostics import add_inspect_activations_arguments, run_inspect_activations
from hf_helu.families import SCOPES, all_activation_sites
from hf_helu.patching import (
    OVERRIDES_ATTR,
    describe_activation,
    export_for_inference,
    patch_model,
    read_overrides,
    reapply_patch,
)

# Files ``save_pretrained`` writes (or that hold weights in another format): never copied from SRC.
_MODEL_FILE = re.compile(
    r"^(config\.json|generation_config\.json|.*\.safetensors(\.index\.json)?|.*\.bin(\.index\.json)?|.*\.pt|.*\.pth"
    r"|.*\.h5|.*\.msgpack|.*\.ckpt|.*\.onnx|.*\.ot|.*\.tflite)$"
)
_SKIPPED_DIRS = {".git", "onnx", "openvino", "coreml", ".cache"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def resolve_source(src: str) -> Path:
    """A local folder for ``src``: the folder itself, or a Hub snapshot (online only)."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CLIError(f"SRC {src!r} is a file, expected a model folder or a Hub id")
        if not (path / "config.json").is_file():
            raise CLIError(f"SRC {src!r} is not a transformers model folder (no config.json in it)")
        return path
    if src.startswith((".", "/", "~")) or not _HUB_ID.match(src):
        raise CLIError(f"SRC {src!r} does not exist (expected a model folder or a Hub id like 'org/name')")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            src, ignore_patterns=["*.h5", "*.msgpack", "*.onnx", "onnx/*", "openvino/*", "*.ot", "*.tflite"]
        )
    except Exception as error:
        raise CLIError(
            f"SRC {src!r} is not an existing folder, and fetching it from the Hugging Face Hub failed: {error}"
        ) from None
    return resolve_source(local)


def _model_class(config) -> type:
    """The class named in ``config.architectures`` (keeps the task head), else ``AutoModel``."""
    for name in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


def load_config(folder: Path) -> transformers.PretrainedConfig:
    try:
        return transformers.AutoConfig.from_pretrained(folder)
    except Exception as error:
        raise CLIError(f"{folder} has a config.json transformers cannot read: {error}") from None


def load_model(folder: Path) -> nn.Module:
    """The model in ``folder`` (stored dtype), with any partial HeLU patch recorded in its config."""
    config = load_config(folder)
    cls = _model_class(config)
    try:
        model = cls.from_pretrained(folder, config=config)
    except Exception as error:
        raise CLIError(f"cannot load a {cls.__name__} from {folder}: {error}") from None
    try:
        reapply_patch(model)
    except ValueError as error:
        raise CLIError(str(error)) from None
    return model


def copy_extras(src: Path, dst: Path) -> list[str]:
    """Copy what ``save_pretrained`` did not write (tokenizer, processor, ...) from ``src`` to ``dst``."""
    copied = []
    for entry in sorted(src.iterdir()):
        target = dst / entry.name
        if target.exists() or entry.name in _SKIPPED_DIRS:
            continue
        if entry.is_dir():
            shutil.copytree(entry, target)
        elif _MODEL_FILE.match(entry.name):
            continue
        else:
            shutil.copy2(entry, target)
        copied.append(entry.name)
    return copied


def _save(model: nn.Module, src: Path, dst: str, overwrite: bool) -> None:
    try:
        with atomic_directory(dst, overwrite=overwrite) as tmp:
            model.save_pretrained(tmp)
            copy_extras(src, tmp)
    except FileExistsError as error:
        raise CLIError(str(error)) from None


def _check_destination(dst: str, overwrite: bool) -> None:
    """Fail before the (slow) load when DST would be refused anyway."""
    path = Path(dst)
    if path.exists() and not path.is_dir():
        raise CLIError(f"DST {dst!r} exists and is not a folder")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise CLIError(f"DST {dst!r} exists and is not empty; pass --overwrite to replace it")


# --- patch --------------------------------------------------------------------------------------


def _alpha(text: str) -> float:
    try:
        return validate_alpha(float(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_patch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="model folder or Hub id")
    parser.add_argument("dst", help="output folder (must not exist or be empty, unless --overwrite)")
    parser.add_argument("--alpha", type=_alpha, default=DEFAULT_ALPHA, help=f"HeLU margin (default {DEFAULT_ALPHA})")
    parser.add_argument("--scope", choices=SCOPES, default="ffn", help="'ffn' (default) or 'all' config activations")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")


def _transform_and_save(args: argparse.Namespace, transform, saved_note: str = "") -> int:
    """Load SRC, apply ``transform`` (a ValueError is the user's error), save to DST atomically, print the report."""
    _check_destination(args.dst, args.overwrite)
    src = resolve_source(args.src)
    model = load_model(src)
    try:
        report = transform(model)
    except ValueError as error:
        raise CLIError(str(error)) from None
    _save(model, src, args.dst, args.overwrite)
    print(report)
    print(f"saved to {args.dst}{saved_note}")
    return 0


def run_patch(args: argparse.Namespace) -> int:
    return _transform_and_save(args, lambda model: patch_model(model, alpha=args.alpha, scope=args.scope))


# --- export -------------------------------------------------------------------------------------


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="HeLU-patched model folder or Hub id")
    parser.add_argument("dst", help="output folder, loadable by stock transformers (ReLU)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty DST")


def run_export(args: argparse.Namespace) -> int:
    return _transform_and_save(args, export_for_inference, " (stock transformers can load it; no hf_helu needed)")


# --- inspect ------------------------------------------------------------------------------------


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="model folder or Hub id")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def describe_checkpoint(folder: Path) -> dict:
    """Architecture and activation sites of the checkpoint in ``folder``, without loading its weights."""
    config = load_config(folder)
    cls = _model_class(config)
    try:
        with torch.device("meta"):
            model = cls(config) if cls.__name__ != "AutoModel" else cls.from_config(config)
    except Exception as error:
        raise CLIError(f"cannot build a {cls.__name__} from {folder}/config.json: {error}") from None
    try:
        reapply_patch(model)
    except ValueError as error:
        raise CLIError(str(error)) from None
    sites = all_activation_sites(model)
    alphas = sorted({s.module.alpha for s in sites if isinstance(s.module, HeLU)})
    return {
        "model_class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "num_ffn": sum(s.kind == "ffn" for s in sites),
        "helu_alphas": alphas,
        "recorded_overrides": read_overrides(config),
        "sites": [
            {
                "name": s.name,
                "kind": s.kind,
                "layer": s.layer_index,
                "activation": describe_activation(s.module),
                "config_attr": s.config_attr,
                "config_value": getattr(config, s.config_attr) if s.config_attr else None,
                "output_projection": s.output_projection,
                "gated": s.gated,
            }
            for s in sites
        ],
    }


def run_inspect(args: argparse.Namespace) -> int:
    info = describe_checkpoint(resolve_source(args.src))
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    alphas = ", ".join(map(str, info["helu_alphas"])) or "none (no HeLU)"
    print(f"{info['model_class']} (model_type {info['model_type']}): {info['num_ffn']} FFN activation(s)")
    print(f"HeLU alpha: {alphas}")
    if info["recorded_overrides"]:
        print(f"config.{OVERRIDES_ATTR} records a partial patch: load with from_pretrained + hf_helu.reapply_patch")
    if not info["sites"]:
        print("no activation module found")
        return 0
    width = max(len(s["name"]) for s in info["sites"])
    print(f"  {'module':<{width}}  kind   layer  {'activation':<20}  config               output projection")
    for s in info["sites"]:
        config = f"{s['config_attr']}={s['config_value']}" if s["config_attr"] else "-"
        layer = "-" if s["layer"] is None else str(s["layer"])
        gated = " (gated)" if s["gated"] else ""
        print(
            f"  {s['name']:<{width}}  {s['kind']:<5}  {layer:>5}  {s['activation']:<20}  {config:<20} "
            f"{s['output_projection'] or '-'}{gated}"
        )
    return 0


Command = tuple[str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

COMMANDS: list[Command] = [
    ("patch", "replace the FFN activations of a checkpoint with HeLU", add_patch_arguments, run_patch),
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
    except CLIError as error:
        print(f"hf-helu {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
