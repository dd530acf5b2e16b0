"""The model card (README.md) of a model hf_helu wrote: what was converted, how, and what was measured.

A converted checkpoint is not its source: copying the source's card would claim the source's results for weights
that differ. :func:`conversion_card` builds a ``huggingface_hub.ModelCard`` from what the conversion itself reports,
so the card says only what was done and measured.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

from hf_helu.inputs import is_hub_id

TAGS = ["hf_helu"]


def _figure(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def conversion_card(
    source: str,
    *,
    activation: str,
    alpha: float | None,
    method: str,
    calibration_tokens: int | None = None,
    results: Mapping[str, Any] | None = None,
    details: str = "",
) -> ModelCard:
    """A model card for a model made from ``source`` (a Hub id, folder or GGUF file) by putting ``activation``
    (``"helu"``, ``"relu"``; HeLU margin ``alpha``) into its FFN blocks with ``method`` (``"calibrate"``,
    ``"hf-helu patch"``, ...). ``calibration_tokens``: the tokens the fit used; ``results``: measured figures
    (e.g. ``ConversionResult.quality.to_dict()``), listed as they are; ``details``: a report printed verbatim.
    ``card.save(folder / "README.md")`` writes it."""
    data = ModelCardData(library_name="transformers", tags=[*TAGS, f"activation-{activation}"])
    if is_hub_id(source):
        data.base_model = source
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {activation} conversion of `{source}`",
        "",
        f"The FFN activations of `{source}` were replaced with {activation}"
        + (f" (HeLU margin alpha = {alpha:g}; forward identical to ReLU)" if alpha is not None else "")
        + f" by [hf_helu](https://pypi.org/project/hf-helu/), method `{method}`.",
        "",
        "## How",
        "",
        f"- source: `{source}`",
        f"- activation: `{activation}`" + (f", alpha {alpha:g}" if alpha is not None else ""),
        f"- method: `{method}`",
    ]
    if calibration_tokens is not None:
        lines.append(f"- calibration tokens (fit): {calibration_tokens}")
    lines += ["", "## Measured results", ""]
    if results:
        lines += [
            f"- {key}: {_figure(value)}"
            for key, value in results.items()
            if not isinstance(value, Mapping) and value not in (None, "")
        ]
    else:
        lines.append("Nothing was measured: evaluate the model before use; its quality may differ from the source's.")
    if details:
        lines += ["", "## Report", "", "```", details.strip(), "```"]
    return ModelCard("\n".join(lines) + "\n")


__all__ = ["conversion_card"]
