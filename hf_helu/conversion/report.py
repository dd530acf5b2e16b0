"""What calibration reports: one fit per FFN output projection, with its error before and after."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

DEFAULT_RIDGE = 1e-3


@dataclass(frozen=True)
class LayerCalibration:
    """Fit of one FFN output projection: relative output error before and after, on the fit tokens."""

    activation: str  # qualified name of the FFN's activation module (its ActivationSite.name)
    output_projection: str
    tokens: int
    error_before: float
    error_after: float


@dataclass
class CalibrationReport:
    """What :func:`calibrate_ffn` did, one row per FFN block in execution order."""

    layers: list[LayerCalibration] = field(default_factory=list)
    ridge: float = DEFAULT_RIDGE
    batches: int = 0
    strategy: str = "sequential"  # "sequential" (one pass per block on cached states) or "rerun" (per layer)
    target: str = "layer"  # what each FFN is fitted to: its own original output, or the original model's

    def to_dict(self) -> dict[str, Any]:
        return {
            "ridge": self.ridge,
            "batches": self.batches,
            "strategy": self.strategy,
            "target": self.target,
            "layers": [vars(layer) for layer in self.layers],
        }

    def __str__(self) -> str:
        rows = [
            f"calibrated {len(self.layers)} FFN output projection(s), ridge {self.ridge:g}, {self.strategy}, "
            f"target {self.target}"
        ]
        rows.append(f"{'output projection':<48} {'tokens':>8} {'error before':>13} {'error after':>12}")
        for layer in self.layers:
            rows.append(
                f"{layer.output_projection:<48} {layer.tokens:>8} "
                f"{layer.error_before:>13.4f} {layer.error_after:>12.4f}"
            )
        return "\n".join(rows)
