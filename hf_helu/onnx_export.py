"""Export a transformers text encoder to an ONNX folder that ONNX Runtime serves alone (no torch, no hf_helu).

HeLU is ReLU at inference, so the exported graph holds plain ``Relu`` nodes: the model is first passed through
:func:`hf_helu.patching.export_for_inference` (on a float32 copy; the caller's model is left as it was).

Why ``torch.onnx`` + ``onnxruntime.quantization`` and not optimum: the ONNX exporter moved from optimum to
``optimum-onnx``, whose newest release (0.1.0) requires ``transformers<4.58``; this project runs transformers 5.
Of the two ``torch.onnx`` exporters, the dynamo one needs ``onnxscript`` (one more dependency); the TorchScript
one (``dynamo=False``) traces these encoders with dynamic batch and sequence axes, so it is the one used.

The folder holds ``model.onnx`` (float32), with ``quantize="int8"`` also ``model_quantized.onnx`` (ONNX Runtime
dynamic int8: 7-bit-range int8 weights per channel, activations quantized per batch), ``config.json``, the tokenizer
files the caller writes, and ``onnx_export.json`` (inputs, outputs, files, and the measured difference to PyTorch).
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hf_helu.atomic import atomic_directory
from hf_helu.patching import export_for_inference

ONNX_FILE = "model.onnx"
INT8_FILE = "model_quantized.onnx"
MANIFEST_FILE = "onnx_export.json"
QUANTIZATIONS = ("int8",)
OPSET = 17
# Text encoders whose forward needs only input_ids / attention_mask (/ token_type_ids): one graph, no KV cache.
ENCODER_MODEL_TYPES = ("albert", "bert", "camembert", "distilbert", "electra", "mpnet", "roberta", "xlm-roberta")
# fp32 ONNX vs PyTorch on the check batch: more than this (times the output scale) is a broken export.
FP32_TOLERANCE = 1e-4


@dataclass(frozen=True)
class OnnxExport:
    """What :func:`export_onnx` wrote, and how far the ONNX outputs are from PyTorch's on a padded check batch."""

    folder: str
    files: tuple[str, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    activation: str  # config.hidden_act of the exported graph
    fp32_max_abs_diff: float
    int8_max_abs_diff: float | None  # int8 is lossy: measured and reported, not checked here
    opset: int = OPSET

    def __str__(self) -> str:
        int8 = "" if self.int8_max_abs_diff is None else f"; int8 {self.int8_max_abs_diff:.3g} (lossy, not checked)"
        return (
            f"ONNX export ({self.activation}, opset {self.opset}): {', '.join(self.files)}\n"
            f"inputs {', '.join(self.inputs)} -> outputs {', '.join(self.outputs)}\n"
            f"max abs difference to PyTorch on a padded check batch: fp32 {self.fp32_max_abs_diff:.3g}{int8}"
        )


def require_onnxruntime() -> None:
    """Fail with the install hint when the optional ``onnx`` extra is missing."""
    missing = []
    for name in ("onnx", "onnxruntime"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ModuleNotFoundError(
            f"ONNX export needs {' and '.join(missing)}: pip install 'hf-helu[onnx]' (or onnx onnxruntime)"
        )


def check_onnx_request(config: Any, quantize: str | None) -> None:
    """Refuse, before any work, a quantization or an architecture this exporter does not handle."""
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise ValueError(f"quantize={quantize!r} is not supported; expected None or one of {QUANTIZATIONS}")
    model_type = getattr(config, "model_type", None)
    if model_type not in ENCODER_MODEL_TYPES:
        raise ValueError(
            f"cannot export model_type {model_type!r} to ONNX: supported are the text encoders "
            f"{', '.join(ENCODER_MODEL_TYPES)} (one graph of input_ids/attention_mask; decoders with a KV cache, "
            "encoder-decoders and speech/vision models are not)"
        )
    require_onnxruntime()


def onnx_input_names(model: nn.Module) -> tuple[str, ...]:
    """``input_ids``, ``attention_mask`` and, where the model uses segments, ``token_type_ids``."""
    accepted = inspect.signature(model.forward).parameters
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in accepted and getattr(model.config, "type_vocab_size", 0) > 1:
        names.append("token_type_ids")
    return tuple(names)


def check_batch(config: Any, names: Sequence[str], batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random token ids with the last row padded to half length (so the attention mask matters)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, min(config.vocab_size, 1000), (batch, seq), generator=generator)
    mask = torch.ones_like(ids)
    mask[-1, seq // 2 :] = 0
    tensors = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        tensors["token_type_ids"] = (torch.arange(seq) >= seq // 2).long().expand(batch, seq).contiguous()
    return {name: tensors[name] for name in names}


class _NamedOutputs(nn.Module):
    """Positional inputs in ``names`` order -> the tuple of the model's tensor outputs ``keys`` (what ONNX traces)."""

    def __init__(self, model: nn.Module, names: Sequence[str], keys: Sequence[str]):
        super().__init__()
        self.model, self.names, self.keys = model, tuple(names), tuple(keys)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(**dict(zip(self.names, tensors, strict=True)), return_dict=True)
        return tuple(out[key] for key in self.keys)


def _dynamic_axes(inputs: Sequence[str], outputs: dict[str, torch.Tensor]) -> dict[str, dict[int, str]]:
    axes = {name: {0: "batch", 1: "sequence"} for name in inputs}
    for name, value in outputs.items():
        axes[name] = {0: "batch", 1: "sequence"} if value.dim() >= 3 else {0: "batch"}
    return axes


def _trace_to_onnx(model: nn.Module, path: Path, inputs: Sequence[str]) -> tuple[str, ...]:
    """``torch.onnx.export`` (TorchScript exporter) with dynamic batch and sequence axes; the output names."""
    example = check_batch(model.config, inputs, batch=2, seq=16, seed=1)
    with torch.no_grad():
        out = model(**example, return_dict=True)
    outputs = {key: value for key, value in out.items() if isinstance(value, torch.Tensor)}
    wrapper = _NamedOutputs(model, inputs, list(outputs)).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer and deprecation chatter; the export is checked against PyTorch
        torch.onnx.export(
            wrapper,
            tuple(example.values()),
            str(path),
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes=_dynamic_axes(inputs, outputs),
            opset_version=OPSET,
            dynamo=False,
        )
    return tuple(outputs)


def max_abs_diff(
    onnx_path: Path, model: nn.Module, inputs: Sequence[str], outputs: Sequence[str]
) -> tuple[float, float]:
    """Max abs difference ONNX Runtime vs PyTorch over all outputs of a (3 x 13) padded batch; and the scale."""
    import onnxruntime

    batch = check_batch(model.config, inputs, batch=3, seq=13, seed=2)
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(list(outputs), {name: value.numpy() for name, value in batch.items()})
    with torch.no_grad():
        want = model(**batch, return_dict=True)
    diffs = [float((torch.from_numpy(g) - want[key]).abs().max()) for g, key in zip(got, outputs, strict=True)]
    scale = max(float(want[key].abs().max()) for key in outputs)
    return max(diffs), scale


def quantize_int8(fp32_path: Path, int8_path: Path) -> None:
    """ONNX Runtime dynamic quantization: 7-bit-range int8 weights per output channel, uint8 activations per batch.

    ``reduce_range``: on x86 CPUs without VNNI (AVX2) ONNX Runtime's u8 x s8 kernels sum pairs of products in int16
    and saturate; 7-bit weights avoid it. ``per_channel`` cuts the error of per-tensor scales. The error of each mode
    is in BENCHMARKS.md ("ONNX export and int8 quantization modes").
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # quantize_dynamic logs a generic "consider pre-processing" warning on every call
    try:
        quantize_dynamic(fp32_path, int8_path, per_channel=True, reduce_range=True, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)


def inference_copy(model: nn.Module) -> nn.Module:
    """A float32 eval copy with HeLU exported to ReLU (a partial patch raises ValueError, see export_for_inference)."""
    exported = copy.deepcopy(model).cpu().float().eval()
    export_for_inference(exported)
    return exported


def export_onnx(
    model: nn.Module,
    dst: str | Path,
    *,
    quantize: str | None = None,
    tokenizer: Any = None,
    write_extras: Callable[[Path], Any] | None = None,
    overwrite: bool = False,
) -> OnnxExport:
    """Write ``model`` (HeLU-patched, exported or stock) as an ONNX folder at ``dst``; atomically, checked.

    ``tokenizer`` (anything with ``save_pretrained``) and ``write_extras(folder)`` add files for the deployer.
    Raises ValueError for an unsupported request, before any work; RuntimeError if the fp32 graph's outputs
    differ from PyTorch's by more than ``FP32_TOLERANCE`` (times the output scale); nothing is left at ``dst`` then.
    """
    check_onnx_request(getattr(model, "config", None), quantize)
    dst = Path(dst)
    if dst.exists() and (not dst.is_dir() or (any(dst.iterdir()) and not overwrite)):
        raise FileExistsError(f"{dst} exists and is not an empty folder; pass overwrite=True to replace it")
    exported = inference_copy(model)
    inputs = onnx_input_names(exported)
    with atomic_directory(dst, overwrite=overwrite) as tmp:
        outputs = _trace_to_onnx(exported, tmp / ONNX_FILE, inputs)
        fp32_diff, scale = max_abs_diff(tmp / ONNX_FILE, exported, inputs, outputs)
        if not fp32_diff <= FP32_TOLERANCE * max(1.0, scale):
            raise RuntimeError(f"ONNX export differs from PyTorch by {fp32_diff:.3g} (output scale {scale:.3g})")
        files, int8_diff = [ONNX_FILE], None
        if quantize == "int8":
            quantize_int8(tmp / ONNX_FILE, tmp / INT8_FILE)
            int8_diff, _ = max_abs_diff(tmp / INT8_FILE, exported, inputs, outputs)
            files.append(INT8_FILE)
        exported.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if write_extras is not None:
            write_extras(tmp)
        activation = str(getattr(exported.config, "hidden_act", getattr(exported.config, "activation", "?")))
        report = OnnxExport(str(dst), tuple(files), inputs, outputs, activation, fp32_diff, int8_diff)
        (tmp / MANIFEST_FILE).write_text(json.dumps(asdict(report), indent=2) + "\n")
    return report


__all__ = [
    "ENCODER_MODEL_TYPES",
    "INT8_FILE",
    "MANIFEST_FILE",
    "ONNX_FILE",
    "QUANTIZATIONS",
    "OnnxExport",
    "check_onnx_request",
    "export_onnx",
]
