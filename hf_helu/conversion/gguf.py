"""Models loaded from a GGUF file (``from_pretrained(folder, gguf_file=...)``) as plain, saveable models.

transformers dequantizes a GGUF checkpoint's weights into ordinary ``nn.Linear`` modules at load (unless its GGUF
kernels keep them packed), but it keeps the GGUF quantizer on the model: ``model.hf_quantizer``, whose
``is_serializable()`` is False, and ``config.quantization_config``. ``save_pretrained`` refuses such a model, and
a saved config would claim a quantization its weights no longer have. Once the weights are plain tensors the marker
is wrong: :func:`drop_gguf_quantization` removes it the way transformers does after a dequantization
(``HfQuantizer.remove_quantization_config``), so the model saves, patches and exports as an unquantized model in
its load dtype.
"""

from __future__ import annotations

from torch import nn

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


__all__ = ["PACKED_MODULES", "drop_gguf_quantization", "is_gguf_model"]
