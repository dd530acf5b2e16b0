"""Models for the recipes: one float32 loader, one check that a checkpoint's trained head fits the task, and the
preparation a run applies (the FFN activation, then LoRA).

- :func:`load_model`: ``from_pretrained`` in float32, the same config with random weights (``init="scratch"``), or a
  new model from a config object; GLUE (:func:`recipe_support.glue.load_glue_model`) and speech
  (:func:`recipe_support.speech.build_model`) load through it.
- :class:`Head` / :func:`check_head`: what a task needs of the output head; a checkpoint saved with a trained head of
  another size or other labels is refused before any weight is read.
- :func:`prepare_model`: ``--activation keep|relu|helu`` (:mod:`hf_helu.patching`) then ``--lora`` (PEFT), with a
  JSON-able description for results.json.
- :func:`check_stock_export`: the stock-ReLU export, loaded by a Python process that never imports hf_helu, predicts
  what the trained model predicts.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hf_helu.activation import DEFAULT_ALPHA
from hf_helu.errors import UsageError
from recipe_support.args import ACTIVATION_CHOICES, INITS, LoraSettings

# The architecture name suffix a checkpoint's config.architectures shows for each kind of trained head.
HEAD_SUFFIXES = {"classification": "ForSequenceClassification", "ctc": "ForCTC"}


# ----------------------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------------------


def load_model(auto_class: Any, source: str | Any, init: str = "pretrained", **config_overrides: Any) -> nn.Module:
    """A float32 ``auto_class`` model from ``source``, with ``config_overrides`` applied to its config.

    ``source`` is a checkpoint (local folder or hub id): ``init="pretrained"`` loads its weights, ``init="scratch"``
    keeps its config only (random weights). ``source`` may also be a config object: a new model with random weights
    (``init`` does not apply; the config is copied, not changed).
    """
    if init not in INITS:
        raise UsageError(f"init must be one of {INITS}, got {init!r}")
    if not isinstance(source, str):
        config = copy.deepcopy(source)
        for key, value in config_overrides.items():
            setattr(config, key, value)
        return auto_class.from_config(config, dtype=torch.float32)
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(source, **config_overrides)
    if init == "scratch":
        return auto_class.from_config(config, dtype=torch.float32)
    return auto_class.from_pretrained(source, config=config, dtype=torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# The trained-head check
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Head:
    """What a task needs of a model's output head.

    ``kind``: ``"classification"`` (``num_labels`` outputs) or ``"ctc"`` (``vocab_size`` outputs); ``size``: that
    number; ``labels``: the class names by id (None: regression or CTC, no names to match); ``task``: how messages
    name the task (``"task rte"``); ``detail``: what the outputs are (``"regression"``, the label names, ...).
    """

    kind: str
    size: int
    task: str
    labels: tuple[str, ...] | None = None
    detail: str = ""

    def __post_init__(self) -> None:
        if self.kind not in HEAD_SUFFIXES:
            raise ValueError(f"head kind must be one of {sorted(HEAD_SUFFIXES)}, got {self.kind!r}")


def check_model_source(source: str, kinds: tuple[str, ...], what: str) -> None:
    """Refuse ``--model`` when it is a local path that is missing, a file, or a checkpoint whose ``model_type`` has
    no model for ``kinds`` (names of transformers' ``MODEL_FOR_<KIND>_MAPPING_NAMES``); a hub id is left to the hub.
    """
    import json
    from pathlib import Path

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


def has_trained_head(config: Any, kind: str = "classification") -> bool:
    """Whether a checkpoint's config says it was saved with a trained head of ``kind`` (classification or ctc)."""
    suffix = HEAD_SUFFIXES[kind]
    return any(name.endswith(suffix) for name in getattr(config, "architectures", None) or [])


def _generic_labels(id2label: Mapping[int, str]) -> bool:
    return all(str(v) == f"LABEL_{k}" for k, v in id2label.items())


def check_head(config: Any, head: Head, name: str, require_trained: bool = False) -> None:
    """Raise if the checkpoint ``name`` (its ``config``) has a trained head that cannot serve ``head``.

    A checkpoint without a trained head passes (a new head is made), unless ``require_trained`` (evaluating it
    would score a random head). Generic label names (``LABEL_0``...) match any labels of the right number.
    """
    trained = has_trained_head(config, head.kind)
    if require_trained and not trained:
        raise UsageError(
            f"--eval_only: model {name} has no trained {_describe(head.kind)} head "
            f"(architectures={getattr(config, 'architectures', None)}); evaluate a checkpoint fine-tuned on {head.task}"
        )
    if not trained:
        return
    size = config.vocab_size if head.kind == "ctc" else config.num_labels
    if size != head.size:
        detail = f" ({head.detail})" if head.detail else ""
        kind = "CTC" if head.kind == "ctc" else "classification"
        raise UsageError(
            f"model {name} has a {size}-output {kind} head but {head.task} needs {head.size}{detail}; "
            "start from a checkpoint without a head or one fine-tuned on this task"
        )
    if head.labels is None:
        return
    id2label = {int(k): v for k, v in (config.id2label or {}).items()}
    expected = dict(enumerate(head.labels))
    if not _generic_labels(id2label) and id2label != expected:
        raise UsageError(f"model {name} head labels {id2label} do not match {head.task} labels {expected}")


def _describe(kind: str) -> str:
    return "sequence-classification" if kind == "classification" else "CTC"


# ----------------------------------------------------------------------------------------------------------------
# Activation and LoRA
# ----------------------------------------------------------------------------------------------------------------


def parse_scope(scope: str | Any) -> Any:
    """``--scope``: ``"ffn"``, ``"all"``, or comma-separated layer indices (``"0,1,5"``) -> a list of ints."""
    if not isinstance(scope, str) or scope in ("ffn", "all"):
        return scope
    try:
        return [int(part) for part in scope.split(",")]
    except ValueError:
        raise UsageError(f"--scope must be 'ffn', 'all' or layer indices such as '0,1,5', got {scope!r}") from None


def apply_activation(
    model: nn.Module, activation: str, alpha: float = DEFAULT_ALPHA, scope: Any = "ffn"
) -> dict[str, Any]:
    """Put ``activation`` (keep|relu|helu) into the model's FFN blocks (``scope``); return a JSON-able report.

    ``relu`` is HeLU patched in then swapped for ReLU, so both touch exactly the same modules and config attribute
    (:func:`hf_helu.conversion.patch_activation`, shared with the conversion methods).
    """
    if activation not in ACTIVATION_CHOICES:
        raise UsageError(f"activation must be one of {ACTIVATION_CHOICES}, got {activation!r}")
    if activation == "keep":
        return {"activation": "keep"}
    from hf_helu.conversion import patch_activation

    report = patch_activation(model, activation, alpha=alpha, scope=parse_scope(scope))
    alpha_used = alpha if activation == "helu" else None
    return {"activation": activation, "alpha": alpha_used, "scope": scope, "patch_report": report.to_dict()}


def apply_lora(model: nn.Module, lora: LoraSettings) -> nn.Module:
    """Wrap ``model`` with PEFT LoRA adapters."""
    from peft import LoraConfig, get_peft_model

    targets = list(lora.target_modules) if lora.target_modules is not None else None
    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets, task_type=lora.task_type
    )
    return get_peft_model(model, config)


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def prepare_model(
    model: nn.Module,
    activation: str = "keep",
    alpha: float = DEFAULT_ALPHA,
    scope: Any = "ffn",
    lora: LoraSettings | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Apply ``activation`` then (``lora`` given) LoRA to ``model``; return it with a description for results.json."""
    info = apply_activation(model, activation, alpha, scope)
    if lora is not None:
        model = apply_lora(model, lora)
        info["lora"] = {"r": lora.r, "alpha": lora.alpha, "trainable_params": trainable_parameters(model)}
    info["params"] = sum(p.numel() for p in model.parameters())
    return model, info


# ----------------------------------------------------------------------------------------------------------------
# The stock-ReLU export, checked without hf_helu
# ----------------------------------------------------------------------------------------------------------------

# Runs in `python -I` (no cwd, no PYTHONPATH) where `import hf_helu` fails: stock transformers loads the export and
# runs each batch: its logits, or with NEW_TOKENS > 0 its greedy continuation of exactly that many tokens.
_STOCK_RUN = """
import sys
sys.modules["hf_helu"] = None
import torch, transformers
export_dir, auto_class, inputs_path, outputs_path, new_tokens = sys.argv[1:6]
torch.set_num_threads(1)
model = getattr(transformers, auto_class).from_pretrained(export_dir, dtype=torch.float32).eval()
def run(batch):
    if not int(new_tokens):
        return model(**batch).logits
    return model.generate(**batch, do_sample=False, max_new_tokens=int(new_tokens), min_new_tokens=int(new_tokens),
                          pad_token_id=0)
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
    """Run ``export_dir`` in a Python process where hf_helu cannot be imported and compare with ``model`` (both in
    float32 on the CPU, one thread) on ``batches`` (labels dropped).

    ``new_tokens`` = 0: ``{"examples", "same_predictions", "max_abs_logit_diff"}`` (a prediction is the argmax, or
    for ``regression`` the output within 1e-4). ``new_tokens`` > 0: greedy generation of that many tokens,
    ``{"prompts", "new_tokens", "identical"}``. A subprocess failure (export not loadable) raises RuntimeError.
    """
    from hf_helu.conversion.batches import model_inputs

    inputs = [model_inputs(batch, torch.device("cpu")) for batch in batches]
    if new_tokens:
        inputs = [{"input_ids": b["input_ids"], "attention_mask": torch.ones_like(b["input_ids"])} for b in inputs]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        original = copy.deepcopy(model).cpu().float().eval()
        with torch.no_grad():
            options = dict(do_sample=False, max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0)
            run = (lambda b: original.generate(**b, **options)) if new_tokens else (lambda b: original(**b).logits)
            expected = torch.cat([run(batch) for batch in inputs])
    finally:
        torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory(prefix="hf_helu_export_check_") as tmp:
        inputs_path, outputs_path = f"{tmp}/inputs.pt", f"{tmp}/outputs.pt"
        torch.save(inputs, inputs_path)
        command = [sys.executable, "-I", "-c", _STOCK_RUN, str(export_dir), auto_class, inputs_path, outputs_path]
        done = subprocess.run([*command, str(new_tokens)], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"the stock-transformers check of {export_dir} failed:\n{done.stderr[-2000:]}")
        got = torch.load(outputs_path)
    if new_tokens:
        return {"prompts": len(expected), "new_tokens": new_tokens, "identical": bool(torch.equal(got, expected))}
    if regression:
        same = ((got - expected).abs().reshape(len(got), -1).amax(dim=1) <= 1e-4).sum()
    else:
        same = (got.argmax(dim=-1) == expected.argmax(dim=-1)).sum()
    return {
        "examples": len(expected),
        "same_predictions": int(same),
        "max_abs_logit_diff": float((got - expected).abs().max()) if len(expected) else 0.0,
    }


__all__ = [
    "HEAD_SUFFIXES",
    "Head",
    "apply_activation",
    "apply_lora",
    "check_head",
    "check_model_source",
    "check_stock_export",
    "has_trained_head",
    "load_model",
    "parse_scope",
    "prepare_model",
    "trainable_parameters",
]
