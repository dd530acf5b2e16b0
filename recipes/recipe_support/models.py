"""Models for the recipes: one float32 loader, the check that a checkpoint's trained head fits the task, the FFN
activation and LoRA a run applies, and the check that the stock-ReLU export predicts without hf_helu."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_helu.activation import DEFAULT_ALPHA
from hf_helu.errors import UsageError

# The architecture name suffix a checkpoint's config.architectures shows for each kind of trained head.
HEAD_SUFFIXES = {"classification": "ForSequenceClassification", "ctc": "ForCTC"}


def load_model(auto_class: Any, source: str | Any, init: str = "pretrained", **config_overrides: Any) -> nn.Module:
    """A float32 ``auto_class`` model from a checkpoint ``source`` (``init="scratch"``: its config, random weights)
    or from a config object (copied, not changed), with ``config_overrides`` applied to its config."""
    from transformers import AutoConfig

    if not isinstance(source, str):
        config = copy.deepcopy(source)
        config.update(config_overrides)
        return auto_class.from_config(config, dtype=torch.float32)
    config = AutoConfig.from_pretrained(source, **config_overrides)
    if init == "scratch":
        return auto_class.from_config(config, dtype=torch.float32)
    return auto_class.from_pretrained(source, config=config, dtype=torch.float32)


@dataclass(frozen=True)
class Head:
    """What a task needs of a model's output head: ``kind`` classification (``num_labels`` outputs) or ctc
    (``vocab_size``), that ``size``, the class names by id (None: regression or CTC), how messages name the task."""

    kind: str
    size: int
    task: str
    labels: tuple[str, ...] | None = None
    detail: str = ""


def check_model_source(source: str, kinds: tuple[str, ...], what: str) -> None:
    """Refuse ``--model_name_or_path`` when it is a local path that is missing, a file, or a checkpoint whose
    ``model_type`` has no model for ``kinds`` (transformers' ``MODEL_FOR_<KIND>_MAPPING_NAMES``); a hub id passes."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    from transformers.models.auto import modeling_auto

    path = Path(source).expanduser()
    if not path.exists():
        try:
            validate_repo_id(source)
        except HFValidationError:
            raise UsageError(f"--model_name_or_path {source}: no such folder (and not a hub model id)") from None
        return
    if not path.is_dir():
        raise UsageError(f"--model_name_or_path {source} is a file; give the checkpoint folder (with config.json)")
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError) as error:
        raise UsageError(
            f"--model_name_or_path {source} is not a transformers checkpoint (config.json: {error})"
        ) from None
    supported = set().union(*(getattr(modeling_auto, f"MODEL_FOR_{kind}_MAPPING_NAMES") for kind in kinds))
    if model_type not in supported:
        raise UsageError(f"--model_name_or_path {source} is a {model_type!r} checkpoint; this recipe needs {what}")


def has_trained_head(config: Any, kind: str = "classification") -> bool:  # saved with a trained head of that kind
    return any(name.endswith(HEAD_SUFFIXES[kind]) for name in getattr(config, "architectures", None) or [])


def check_head(config: Any, head: Head, name: str, require_trained: bool = False) -> None:
    """Refuse a checkpoint whose trained head cannot serve ``head`` (one without a head passes, a new one is made,
    unless ``require_trained``). Generic label names (``LABEL_0``...) match any labels of the right number."""
    trained = has_trained_head(config, head.kind)
    kind = "CTC" if head.kind == "ctc" else "classification"
    if require_trained and not trained:
        raise UsageError(
            f"--eval_only: model {name} has no trained {'CTC' if head.kind == 'ctc' else 'sequence-classification'} "
            f"head (architectures={getattr(config, 'architectures', None)}); evaluate a checkpoint fine-tuned on "
            f"{head.task}"
        )
    size = config.vocab_size if head.kind == "ctc" else config.num_labels
    if trained and size != head.size:
        detail = f" ({head.detail})" if head.detail else ""
        raise UsageError(
            f"model {name} has a {size}-output {kind} head but {head.task} needs {head.size}{detail}; "
            "start from a checkpoint without a head or one fine-tuned on this task"
        )
    id2label = {int(k): v for k, v in (config.id2label or {}).items()}
    generic = all(str(v) == f"LABEL_{k}" for k, v in id2label.items())
    if trained and head.labels is not None and not generic and id2label != dict(enumerate(head.labels)):
        raise UsageError(
            f"model {name} head labels {id2label} do not match {head.task} labels {dict(enumerate(head.labels))}"
        )


def parse_scope(scope: str | Any) -> Any:
    """``--scope``: ``"ffn"``, ``"all"``, or comma-separated layer indices (``"0,1,5"``) -> a list of ints."""
    if not isinstance(scope, str) or scope in ("ffn", "all"):
        return scope
    try:
        return [int(part) for part in scope.split(",")]
    except ValueError:
        raise UsageError(f"--scope must be 'ffn', 'all' or layer indices such as '0,1,5', got {scope!r}") from None


def apply_activation(model: nn.Module, activation: str, alpha: float = DEFAULT_ALPHA, scope: Any = "ffn") -> dict:
    """Put ``activation`` (keep|relu|helu) into the model's FFN blocks (``scope``) with
    :func:`hf_helu.conversion.patch_activation`; return a JSON-able report."""
    if activation == "keep":
        return {"activation": "keep"}
    from hf_helu.conversion import patch_activation

    report = patch_activation(model, activation, alpha=alpha, scope=parse_scope(scope)).to_dict()
    info = {"activation": activation, "alpha": alpha if activation == "helu" else None, "scope": scope}
    return info | {"patch_report": report}


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def prepare_model(model: nn.Module, activation="keep", alpha=DEFAULT_ALPHA, scope="ffn", lora=None) -> tuple:
    """Apply ``activation`` then (a PEFT ``LoraConfig`` given) LoRA; return the model and its results.json record."""
    info = apply_activation(model, activation, alpha, scope)
    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora)
        info["lora"] = {"r": lora.r, "alpha": lora.lora_alpha, "trainable_params": trainable_parameters(model)}
    info["params"] = sum(p.numel() for p in model.parameters())
    return model, info


# Runs in `python -I` (no cwd, no PYTHONPATH) where `import hf_helu` fails: stock transformers loads the export and
# runs each batch: its logits, or with NEW_TOKENS > 0 its greedy continuation of exactly that many tokens.
_STOCK_RUN = """
import sys
sys.modules["hf_helu"] = None
import torch, transformers
export_dir, auto_class, inputs_path, outputs_path, new_tokens = sys.argv[1:6]
torch.set_num_threads(1)
model = getattr(transformers, auto_class).from_pretrained(export_dir, dtype=torch.float32).eval()
n = int(new_tokens)
def run(b):
    return model.generate(**b, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0) if n else \
        model(**b).logits
with torch.no_grad():
    torch.save(torch.cat([run(batch) for batch in torch.load(inputs_path)]), outputs_path)
"""


def check_stock_export(
    export_dir: str,
    model: nn.Module,
    batches: Iterable[Mapping[str, Any]],
    auto_class: str = "AutoModelForSequenceClassification",
    regression: bool = False,
    new_tokens: int = 0,
) -> dict[str, Any]:
    """Run ``export_dir`` in a Python process where hf_helu cannot be imported and compare with ``model`` (float32,
    CPU, one thread) on ``batches``: the same predictions (argmax, or a regression output within 1e-4), or with
    ``new_tokens`` the same greedy tokens. A subprocess failure raises RuntimeError."""
    from hf_helu.conversion.batches import model_inputs

    inputs = [model_inputs(batch, torch.device("cpu")) for batch in batches]
    if new_tokens:
        inputs = [{"input_ids": b["input_ids"], "attention_mask": torch.ones_like(b["input_ids"])} for b in inputs]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        original = copy.deepcopy(model).cpu().float().eval()
        options = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
        with torch.no_grad():
            expected = torch.cat(
                [original.generate(**b, **options) if new_tokens else original(**b).logits for b in inputs]
            )
    finally:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="hf_helu_export_check_") as tmp:
        torch.save(inputs, f"{tmp}/inputs.pt")
        command = [sys.executable, "-I", "-c", _STOCK_RUN, str(export_dir), auto_class, f"{tmp}/inputs.pt"]
        done = subprocess.run([*command, f"{tmp}/outputs.pt", str(new_tokens)], capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the stock-transformers check of {export_dir} failed:\n{done.stderr[-2000:]}")
        got = torch.load(f"{tmp}/outputs.pt")
    if new_tokens:
        return {"prompts": len(expected), "new_tokens": new_tokens, "identical": bool(torch.equal(got, expected))}
    if regression:
        same = ((got - expected).abs().reshape(len(got), -1).amax(dim=1) <= 1e-4).sum()
    else:
        same = (got.argmax(dim=-1) == expected.argmax(dim=-1)).sum()
    diff = float((got - expected).abs().max()) if len(expected) else 0.0
    return {"examples": len(expected), "same_predictions": int(same), "max_abs_logit_diff": diff}
