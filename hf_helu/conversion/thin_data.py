"""How many calibration tokens a refit needs, and the warning when a conversion had fewer.

The refit of an output projection is least squares; below about ten tokens per unknown it memorises its tokens and
its reported error stops predicting the converted model's quality (the argument is below).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

from torch import nn

from hf_helu.conversion.calibrate import _projection_weight
from hf_helu.conversion.report import CalibrationReport
from hf_helu.conversion.sites import ffn_sites
from hf_helu.families import ActivationSite, unwrap_model

# A refit of one output projection is a least-squares problem per output unit with p = d_ff (+1 for the bias)
# unknowns and n rows (tokens). With fewer rows than unknowns it is underdetermined: only the ridge keeps it
# solvable, and the fit memorises the calibration tokens. With n > p + 1 and noise (what ReLU inputs cannot explain)
# of variance s^2, ordinary least squares has an expected in-sample error s^2 (1 - p/n) and held-out error about
# s^2 (1 + p/(n - p - 1)): the reported fit error is optimistic, and the model worse than reported, by about p/n.
# n >= 10 p bounds both at about 10% of the error (5% on the relative error the report prints). The measurement
# agrees: SmolLM2-135M (p = 1536) reaches WikiText-2 perplexity 205 on 4,096 tokens (2.7 per feature) and 38 on
# 32,768 (21 per feature; RESULTS.md section 5). ReLU inputs are mostly zeros (64% there), which lowers the rows a
# rarely firing unit sees: one more reason not to go below the bound.
MIN_TOKENS_PER_FEATURE = 10


def minimum_calibration_tokens(model: nn.Module, sites: Sequence[ActivationSite] | None = None) -> int:
    """The fewest calibration tokens (non-padding positions) a refit of ``model``'s FFN output projections needs:
    :data:`MIN_TOKENS_PER_FEATURE` per input feature of the widest projection (plus its bias)."""
    model = unwrap_model(model)
    sites = ffn_sites(model) if sites is None else list(sites)
    features = 0
    for site in sites:
        if site.output_projection is None:
            continue
        projection = model.get_submodule(site.output_projection)
        try:
            weight = _projection_weight(projection)
        except TypeError:
            continue
        features = max(features, weight.shape[0] + int(getattr(projection, "bias", None) is not None))
    return MIN_TOKENS_PER_FEATURE * features


class ThinCalibrationWarning(UserWarning):
    """Calibration fitted on fewer tokens than :func:`minimum_calibration_tokens`: the fit memorises them."""


def check_calibration_tokens(report: CalibrationReport, model: nn.Module) -> None:
    """Warn (:class:`ThinCalibrationWarning`, with the figures) when a layer was fitted on too few tokens."""
    if not report.layers:
        return
    needed = minimum_calibration_tokens(model, None)
    tokens = min(layer.tokens for layer in report.layers)
    if tokens < needed:
        warnings.warn(
            f"calibration fitted {len(report.layers)} FFN output projection(s) on {tokens} tokens, fewer than the "
            f"{needed} ({MIN_TOKENS_PER_FEATURE} per input feature) a least-squares refit needs: the fit memorises "
            "these tokens and the converted model can be far worse than its fit error says. Calibrate on more text.",
            ThinCalibrationWarning,
            stacklevel=3,
        )
