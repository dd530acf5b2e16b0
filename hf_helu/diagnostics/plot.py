"""Dead fraction per layer over training, one panel per activation, as a PNG (matplotlib, imported on use)."""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hf_helu.atomic import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _check_history(history: Mapping[str, Sequence[Mapping[str, Any]]]) -> None:
    if not isinstance(history, Mapping) or not history:
        raise ValueError(
            'history must be a non-empty mapping {activation: [{"step": int, "dead_fraction": [per layer]}, ...]}, '
            f"got {history!r}"
        )
    for name, points in history.items():
        if isinstance(points, (str, bytes)) or not isinstance(points, Sequence) or not points:
            raise ValueError(f"history[{name!r}] must be a non-empty list of points, got {points!r}")
        layers = None
        for point in points:
            if not isinstance(point, Mapping) or "step" not in point or "dead_fraction" not in point:
                raise ValueError(
                    f'history[{name!r}] has a point {point!r}; expected {{"step": ..., "dead_fraction": [...]}}'
                )
            step, fractions = point["step"], point["dead_fraction"]
            if isinstance(step, bool) or not isinstance(step, int):
                raise ValueError(f"history[{name!r}] has step {step!r}; expected an int")
            if isinstance(fractions, (str, bytes)) or not isinstance(fractions, Sequence) or not fractions:
                raise ValueError(f"history[{name!r}] at step {step} has dead_fraction {fractions!r}; expected a list")
            for value in fractions:
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                    raise ValueError(f"history[{name!r}] at step {step} has dead fraction {value!r}; expected 0..1")
            if layers is not None and len(fractions) != layers:
                raise ValueError(
                    f"history[{name!r}] has {layers} layers at one step and {len(fractions)} at step {step}"
                )
            layers = len(fractions)


def dead_fraction_figure(history: Mapping[str, Sequence[Mapping[str, Any]]]) -> Figure:
    """The matplotlib Figure :func:`plot_dead_fraction` saves: one panel per activation, a line per layer, dead
    units in percent over steps (sorted by step)."""
    _check_history(history)
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.2 * len(history), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(history), sharey=True, squeeze=False)[0]
    top = max(max(p["dead_fraction"]) for points in history.values() for p in points)
    colors = colormaps["viridis"]
    for ax, (name, points) in zip(axes, history.items(), strict=True):
        points = sorted(points, key=lambda point: point["step"])
        steps = [point["step"] for point in points]
        layers = len(points[0]["dead_fraction"])
        for layer in range(layers):
            values = [100 * point["dead_fraction"][layer] for point in points]
            color = colors(layer / max(layers - 1, 1))
            ax.plot(steps, values, marker="o", markersize=3, color=color, label=f"layer {layer}")
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylim(0, max(1.0, 105 * top))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("dead FFN units (%)")
    axes[-1].legend(fontsize="small", loc="best")
    figure.suptitle("FFN units that never fire, per layer")
    return figure


def plot_dead_fraction(history: Mapping[str, Sequence[Mapping[str, Any]]], path: str | os.PathLike) -> Path:
    """Plot dead fraction per layer over training, one panel per activation; write a PNG atomically.

    ``history`` maps an activation name (e.g. "gelu", "relu", "helu") to its evaluations,
    ``[{"step": int, "dead_fraction": [per layer]}, ...]`` (``ActivationStats.history_entry``).
    """
    figure = dead_fraction_figure(history)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    path = Path(path)
    atomic_write_bytes(path, buffer.getvalue())
    return path
