"""Loading checkpoints: what the library and the CLI check before and after ``from_pretrained``.

* :func:`load_complete` loads with ``output_loading_info=True`` and refuses a checkpoint with missing or unexpected
  weights, naming them (transformers would fill the missing ones with random values and only log it).
* :func:`gguf_architecture` / :func:`check_gguf_architecture` read ``general.architecture`` from a GGUF file's
  header (its first metadata entries; no tensor is read) and refuse what transformers cannot load, before the
  weights are dequantized.
* GGUF-loaded models as plain, saveable models (:func:`drop_gguf_quantization`), below.

Models loaded from a GGUF file (``from_pretrained(folder, gguf_file=...)``) as plain, saveable models.

transformers dequantizes a GGUF checkpoint's weights into ordinary ``nn.Linear`` modules at load (unless its GGUF
kernels keep them packed), but it keeps the GGUF quantizer on the model: ``model.hf_quantizer``, whose
``is_serializable()`` is False, and ``config.quantization_config``. ``save_pretrained`` refuses such a model, and
a saved config would claim a quantization its weights no longer have. Once the weights are plain tensors the marker
is wrong: :func:`drop_gguf_quantization` removes it the way transformers does after a dequantization
(``HfQuantizer.remove_quantization_config``), so the model saves, patches and exports as an unquantized model in
its load dtype.
"""

from __future__ import annotations

import os
import struct
from typing import Any

from torch import nn

from hf_helu.errors import UsageError
from hf_helu.families import unwrap_model

PACKED_MODULES = ("GgufLinear", "GgufExperts")  # transformers' modules that keep GGUF blocks packed


def _gguf_quantizer(model: nn.Module):
    quantizer = getattr(model, "hf_quantizer", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    return quantizer if str(getattr(method, "value", method)) == "gguf" else None


def is_gguf_model(model: nn.Module) -> bool:
    """True for a model that ``from_pretrained(..., gguf_file=...)`` loaded and that still carries the GGUF marker."""
    return _gguf_quantizer(unwrap_model(model)) is not None


def drop_gguf_quantization(model: nn.Module) -> bool:
    """Make a GGUF-loaded model an ordinary unquantized one (saveable); False when it was not GGUF-loaded.

    Raises ValueError when some weights are still packed GGUF blocks: load the file with
    ``quantization_config=transformers.GgufConfig(dequantize=True)`` then.
    """
    inner = unwrap_model(model)
    quantizer = _gguf_quantizer(inner)
    if quantizer is None:
        return False
    packed = [name for name, module in inner.named_modules() if type(module).__name__ in PACKED_MODULES]
    if packed:
        raise ValueError(
            f"{len(packed)} module(s) of this GGUF-loaded model keep their weights packed (e.g. {packed[0]}): load "
            "it with quantization_config=transformers.GgufConfig(dequantize=True) to patch, convert or save it"
        )
    quantizer.remove_quantization_config(inner)
    return True


# Sizes of the GGUF metadata value types with a fixed size (gguf.GGUFValueType: UINT8 .. FLOAT64); 8 is a string,
# 9 an array.
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_architecture(path: str | os.PathLike) -> str:
    """``general.architecture`` of a GGUF file, read from its header (a UsageError when it is no GGUF file).

    The metadata is read in order up to that key, which writers put first: ``gguf.GGUFReader`` would parse every
    field, a whole vocabulary included (about 6 s for SmolLM2's 49k tokens), before the key could be looked up."""
    where = os.fspath(path)
    try:
        with open(where, "rb") as file:
            magic, version = file.read(4), file.read(4)
            order = ">" if version.startswith(b"\0\0") else "<"  # a small version number's zero bytes come first
            if magic != b"GGUF" or struct.unpack(order + "I", version)[0] not in (2, 3):
                raise ValueError(f"no GGUF v2/v3 header (magic {magic!r})")

            def number(fmt: str) -> int:
                return struct.unpack(order + fmt, file.read(struct.calcsize(fmt)))[0]

            def string() -> bytes:
                return file.read(number("Q"))

            def skip(kind: int) -> None:
                if kind == _GGUF_STRING:
                    file.seek(number("Q"), os.SEEK_CUR)
                elif kind == _GGUF_ARRAY:
                    item, count = number("I"), number("Q")
                    if item in _GGUF_SCALAR_SIZES:
                        file.seek(count * _GGUF_SCALAR_SIZES[item], os.SEEK_CUR)
                    else:
                        for _ in range(count):
                            skip(item)
                else:
                    file.seek(_GGUF_SCALAR_SIZES[kind], os.SEEK_CUR)

            number("Q")  # tensor count
            for _ in range(number("Q")):
                key, kind = string(), number("I")
                if key == b"general.architecture" and kind == _GGUF_STRING:
                    return string().decode("utf-8")
                skip(kind)
    except (OSError, ValueError, KeyError, struct.error) as error:  # UnicodeDecodeError is a ValueError
        raise UsageError(f"{where} is not a GGUF file that can be read: {error}") from None
    raise UsageError(f"{where} has no general.architecture in its GGUF header")


def check_gguf_architecture(path: str | os.PathLike) -> str:
    """The architecture of a GGUF file when transformers can load it, else a UsageError naming it and the supported
    ones. Checks the name the way transformers' loader does (``llama`` also covers Mistral, ``t5encoder`` T5)."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    architecture = gguf_architecture(path)
    aliases = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "gpt-oss": "gpt_oss", "minimax-m2": "minimax_m2"}
    name = aliases.get(architecture, "t5" if "t5" in architecture else architecture)
    if architecture not in GGUF_SUPPORTED_ARCHITECTURES and name not in GGUF_SUPPORTED_ARCHITECTURES:
        raise UsageError(
            f"{os.fspath(path)} holds a GGUF model of architecture {architecture!r}, which transformers cannot load "
            f"(supported: {', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))})"
        )
    return architecture


def check_has_ffn(cls: Any, config: Any, where: str | os.PathLike) -> None:
    """Refuse, from the config alone (the model is built on the meta device: no weight is read or allocated), a
    checkpoint whose model has no FFN activation hf_helu can patch (a state-space model such as Mamba)."""
    from accelerate import init_empty_weights

    from hf_helu.families import all_activation_sites
    from hf_helu.patching import unsupported_model_error

    with init_empty_weights():
        skeleton = cls.from_config(config) if hasattr(cls, "from_config") else cls._from_config(config)
    if not any(site.kind == "ffn" for site in all_activation_sites(skeleton)):
        raise UsageError(f"{os.fspath(where)}: {unsupported_model_error(skeleton)}")


def load_complete(cls: Any, where: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """``cls.from_pretrained(where, **kwargs)``, refused (UsageError naming them) when the checkpoint lacks weights
    the model has, or holds weights the model does not have: transformers would initialise the missing ones at
    random and drop the others, and the result would be saved as if it were the checkpoint."""
    model, info = cls.from_pretrained(where, output_loading_info=True, **kwargs)
    problems = []
    kinds = (("missing_keys", "missing"), ("unexpected_keys", "unexpected"), ("mismatched_keys", "of another shape"))
    for key, what in kinds:
        names = sorted(str(name if isinstance(name, str) else name[0]) for name in info.get(key) or ())
        if names:
            shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
            problems.append(f"{len(names)} weight(s) {what}: {shown}")
    if problems:
        raise UsageError(f"{os.fspath(where)} does not hold the weights of a {cls.__name__}: {'; '.join(problems)}")
    return model


__all__ = [
    "PACKED_MODULES",
    "check_gguf_architecture",
    "check_has_ffn",
    "drop_gguf_quantization",
    "gguf_architecture",
    "is_gguf_model",
    "load_complete",
]
