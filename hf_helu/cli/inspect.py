"""``hf-helu inspect SRC``: architecture, activation sites, activation and alpha of a checkpoint, weights unread."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hf_helu.activation import HeLU
from hf_helu.cli.common import load_config, reapply_recorded_patch, resolve_source, source_model_class
from hf_helu.errors import UsageError
from hf_helu.families import all_activation_sites
from hf_helu.patching import OVERRIDES_ATTR, describe_activation, read_overrides


def add_inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="model folder, GGUF file (or folder with one) or Hub id")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def describe_checkpoint(folder: Path) -> dict:
    """Architecture and activation sites of the checkpoint in ``folder``, without loading its weights."""
    config = load_config(folder)
    cls = source_model_class(folder, config)
    try:
        with torch.device("meta"):
            model = cls.from_config(config) if cls.__name__.startswith("AutoModel") else cls(config)
    except Exception as error:
        raise UsageError(f"cannot build a {cls.__name__} from {folder}/config.json: {error}") from None
    reapply_recorded_patch(model)
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


def print_sites(sites: list[dict]) -> None:
    """One line per activation site of :func:`describe_checkpoint`'s ``sites``."""
    width = max(len(s["name"]) for s in sites)
    print(f"  {'module':<{width}}  kind   layer  {'activation':<20}  config               output projection")
    for s in sites:
        config = f"{s['config_attr']}={s['config_value']}" if s["config_attr"] else "-"
        layer = "-" if s["layer"] is None else str(s["layer"])
        gated = " (gated)" if s["gated"] else ""
        print(
            f"  {s['name']:<{width}}  {s['kind']:<5}  {layer:>5}  {s['activation']:<20}  {config:<20} "
            f"{s['output_projection'] or '-'}{gated}"
        )


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
    print_sites(info["sites"])
    return 0
