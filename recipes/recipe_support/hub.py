"""What a recipe's saved model carries out: a model card (``huggingface_hub.ModelCard``) that says what was
converted, how, and what it measured, and, with ``--push_to_hub``, the upload (``create_repo`` before any training,
``upload_folder`` at the end)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

from hf_helu.atomic import atomic_write_text
from hf_helu.errors import UsageError
from hf_helu.model_card import conversion_card


def command_line(script: str, argv: list[str] | None) -> str:
    """How the run was started (``python recipes/<script> ...``), for results.json and the model card; the value of
    ``--hub_token`` is never written."""
    shown, hide = [], False
    for arg in sys.argv[1:] if argv is None else map(str, argv):
        shown.append("***" if hide else "--hub_token=***" if arg.startswith("--hub_token=") else arg)
        hide = arg == "--hub_token"
    return shlex.join(["python", f"recipes/{Path(script).name}", *shown])


def check_hub(args: Any) -> None:
    """With ``--push_to_hub``: create (or find) the repository now, so an offline hub or a bad token or name stops
    the run before it trains; sets ``args.hub_repo_id``."""
    if not args.push_to_hub:
        return
    from huggingface_hub import create_repo

    name = args.hub_model_id or Path(args.output_dir).resolve().name
    try:
        args.hub_repo_id = create_repo(name, token=args.hub_token, exist_ok=True).repo_id
    except Exception as error:  # any failure to reach or use the hub: network, offline mode, token, repo name
        raise UsageError(f"--push_to_hub: cannot create the hub repository {name!r}: {error}") from None


def _flat(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            rows.update(_flat(value, f"{prefix}{key} "))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            rows[f"{prefix}{key}"] = value
    return rows


def write_model_card(
    folder: str | Path, source: str | None, model_info: dict[str, Any], metrics: dict, command: str, note: str = ""
) -> None:
    """OUTPUT_DIR/model/README.md through hf_helu's :func:`~hf_helu.model_card.conversion_card`: the source
    checkpoint, the activation and conversion (``model_info`` as results.json records it), the ``metrics`` the run
    measured and the command that made it."""
    activation = model_info.get("activation") or model_info.get("hidden_act", "keep")
    conversion = model_info.get("conversion") or model_info.get("conversion_choice") or {}
    method = conversion.get("choice", conversion).get("method", "none")
    card = conversion_card(
        source or "a new model",
        activation=activation,
        alpha=model_info.get("alpha"),
        method=method,
        results=_flat(metrics),
        details="\n".join(filter(None, [note, command])),
    )
    atomic_write_text(Path(folder) / "README.md", str(card))


def publish(accelerator: Any, args: Any, source: str | None, results: dict[str, Any], metrics: dict) -> None:
    """Model cards in OUTPUT_DIR/model (and model_relu), then, with ``--push_to_hub``, OUTPUT_DIR/model uploaded to
    ``args.hub_repo_id`` (from :func:`check_hub`)."""
    if not accelerator.is_main_process:
        return
    info = results.get("model", {})
    write_model_card(results["model_dir"], source, info, metrics, args.command)
    if results.get("relu_export_dir"):
        note = "This is the stock-ReLU export of the HeLU model (same forward; loads without hf_helu)."
        write_model_card(results["relu_export_dir"], source, info, metrics, args.command, note)
    if args.push_to_hub:
        from huggingface_hub import upload_folder

        folder = results.get("relu_export_dir") or results["model_dir"]
        upload_folder(repo_id=args.hub_repo_id, folder_path=folder, token=args.hub_token, commit_message="hf-helu")
        accelerator.print(f"pushed {folder} to https://huggingface.co/{args.hub_repo_id}")


__all__ = ["check_hub", "command_line", "publish", "write_model_card"]
