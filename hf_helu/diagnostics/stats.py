"""The statistics an :class:`~hf_helu.diagnostics.ActivationMonitor` reports: per layer, and all layers together."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LayerActivationStats:
    """Accumulated statistics of one activation module (one FFN layer)."""

    name: str
    layer_index: int | None
    units: int
    dead_units: int
    tokens: int
    zero_elements: int
    band_elements: int | None
    alpha: float | None
    calls: int
    unmasked_calls: int
    nan_calls: int = 0
    dead_indices: tuple[int, ...] = ()

    @property
    def elements(self) -> int:
        return self.tokens * self.units

    @property
    def dead_fraction(self) -> float:
        return self.dead_units / self.units

    @property
    def zero_fraction(self) -> float | None:
        """None when every position was masked out (nothing observed)."""
        return self.zero_elements / self.elements if self.elements else None

    @property
    def band_fraction(self) -> float | None:
        if self.band_elements is None:
            return None
        return self.band_elements / self.elements if self.elements else None

    def to_dict(self, include_indices: bool = False) -> dict[str, Any]:
        """JSON-able form; ``include_indices`` adds the list of dead unit indices."""
        data = {
            "name": self.name,
            "layer_index": self.layer_index,
            "units": self.units,
            "dead_units": self.dead_units,
            "dead_fraction": self.dead_fraction,
            "tokens": self.tokens,
            "zero_fraction": self.zero_fraction,
            "band_fraction": self.band_fraction,
            "alpha": self.alpha,
            "calls": self.calls,
            "unmasked_calls": self.unmasked_calls,
            "nan_calls": self.nan_calls,
        }
        if include_indices:
            data["dead_indices"] = list(self.dead_indices)
        return data


@dataclass(frozen=True)
class ActivationStats:
    """Per-layer statistics of a monitored model; ``to_dict()`` is JSON-able, ``table()`` printable."""

    layers: tuple[LayerActivationStats, ...]

    @property
    def dead_fraction(self) -> float:
        """Dead units over all monitored units (all layers together)."""
        return sum(layer.dead_units for layer in self.layers) / sum(layer.units for layer in self.layers)

    @property
    def zero_fraction(self) -> float | None:
        """Zero outputs over all observed output elements (all layers together)."""
        elements = sum(layer.elements for layer in self.layers)
        return sum(layer.zero_elements for layer in self.layers) / elements if elements else None

    @property
    def band_fraction(self) -> float | None:
        """Band elements over the observed elements of the layers that have a band (else None)."""
        banded = [layer for layer in self.layers if layer.band_elements is not None]
        elements = sum(layer.elements for layer in banded)
        if not banded:
            return None
        return sum(layer.band_elements for layer in banded) / elements if elements else None

    @property
    def dead_fractions(self) -> list[float]:
        """Dead fraction of each layer, in monitor order (what :func:`plot_dead_fraction` plots)."""
        return [layer.dead_fraction for layer in self.layers]

    def history_entry(self, step: int) -> dict[str, Any]:
        """``{"step": step, "dead_fraction": [per layer]}``: one point of a training history."""
        return {"step": int(step), "dead_fraction": self.dead_fractions}

    def to_dict(self, include_indices: bool = False) -> dict[str, Any]:
        """JSON-able form (what the recipes store in results.json)."""
        return {
            "dead_fraction": self.dead_fraction,
            "zero_fraction": self.zero_fraction,
            "band_fraction": self.band_fraction,
            "units": sum(layer.units for layer in self.layers),
            "dead_units": sum(layer.dead_units for layer in self.layers),
            "layers": [layer.to_dict(include_indices) for layer in self.layers],
        }

    def table(self) -> str:
        """The per-layer table as text (percentages), with an ``all`` row."""
        width = max(len("activation"), *(len(layer.name) for layer in self.layers))
        header = f"{'layer':>5}  {'activation':<{width}}  {'units':>6}  {'dead':>6}  {'dead %':>7}  "
        header += f"{'zeros %':>7}  {'band %':>7}  {'tokens':>9}"
        lines = [header, "-" * len(header)]

        def percent(fraction: float | None) -> str:
            return "-" if fraction is None else f"{100 * fraction:7.2f}"

        def row(index: str, name: str, units: int, dead: int, dead_f, zero_f, band_f, tokens: str) -> str:
            return (
                f"{index:>5}  {name:<{width}}  {units:>6}  {dead:>6}  {percent(dead_f):>7}  "
                f"{percent(zero_f):>7}  {percent(band_f):>7}  {tokens:>9}"
            )

        for position, layer in enumerate(self.layers):
            index = str(layer.layer_index if layer.layer_index is not None else position)
            lines.append(
                row(
                    index,
                    layer.name,
                    layer.units,
                    layer.dead_units,
                    layer.dead_fraction,
                    layer.zero_fraction,
                    layer.band_fraction,
                    str(layer.tokens),
                )
            )
        lines.append("-" * len(header))
        lines.append(
            row(
                "all",
                "",
                sum(layer.units for layer in self.layers),
                sum(layer.dead_units for layer in self.layers),
                self.dead_fraction,
                self.zero_fraction,
                self.band_fraction,
                "",
            )
        )
        nan = [layer.name for layer in self.layers if layer.nan_calls]
        if nan:
            lines.append(f"warning: NaN/inf outputs (statistics unreliable) in: {', '.join(nan)}")
        unmasked = [layer.name for layer in self.layers if layer.unmasked_calls]
        if unmasked:
            lines.append(f"note: no padding mask could be applied to some calls of: {', '.join(unmasked)}")
        alphas = sorted({layer.alpha for layer in self.layers if layer.alpha is not None})
        if alphas:
            lines.append(
                "band % = inputs in (-alpha, 0]: zero output, gradient still passes (alpha "
                + ", ".join(map(str, alphas))
                + ")"
            )
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()
