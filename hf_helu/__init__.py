"""hf_helu: HeLU, the hysteresis ReLU, for Hugging Face transformers.

``import hf_helu`` registers ``"helu"`` (and ``"helu_<alpha>"``) in ``transformers.activations.ACT2FN``.
"""

from hf_helu.activation import DEFAULT_ALPHA, HeLU, activation_name, helu, parse_activation_name
from hf_helu.registry import register

register()

__all__ = [
    "DEFAULT_ALPHA",
    "HeLU",
    "activation_name",
    "helu",
    "parse_activation_name",
    "register",
]
__version__ = "0.1.0"
