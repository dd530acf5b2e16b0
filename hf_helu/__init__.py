"""hf_helu: HeLU, the hysteresis ReLU, for Hugging Face transformers.

``import hf_helu`` registers ``"helu"`` (and ``"helu_<alpha>"``) in ``transformers.activations.ACT2FN``.
"""

from hf_helu.activation import DEFAULT_ALPHA, HeLU, activation_name, helu, parse_activation_name
from hf_helu.conversion import (
    ActivationAnnealer,
    CalibrationReport,
    ConversionResult,
    FFNDistiller,
    calibrate_ffn,
    convert_model,
)
from hf_helu.diagnostics import ActivationMonitor, ActivationStats, LayerActivationStats, plot_dead_fraction
from hf_helu.errors import UsageError
from hf_helu.families import ActivationSite, find_activation_sites
from hf_helu.patching import (
    PatchReport,
    export_for_inference,
    patch_model,
    reapply_patch,
    unpatch_model,
)
from hf_helu.registry import register
from hf_helu.sparse import SparseInference, dense_inference, sparse_inference
from hf_helu.sparsity import ActivationSparsityPenalty

register()

__all__ = [
    "DEFAULT_ALPHA",
    "ActivationAnnealer",
    "ActivationMonitor",
    "ActivationSite",
    "ActivationSparsityPenalty",
    "ActivationStats",
    "CalibrationReport",
    "ConversionResult",
    "FFNDistiller",
    "HeLU",
    "LayerActivationStats",
    "PatchReport",
    "SparseInference",
    "UsageError",
    "activation_name",
    "calibrate_ffn",
    "convert_model",
    "dense_inference",
    "export_for_inference",
    "find_activation_sites",
    "helu",
    "parse_activation_name",
    "patch_model",
    "plot_dead_fraction",
    "reapply_patch",
    "register",
    "sparse_inference",
    "unpatch_model",
]
__version__ = "0.1.0"
