"""Table and plots of a sparsity-pressure sweep: ``run_clm.py --sparsity_penalty`` runs, ReLU against HeLU.

    python recipes/sparsity_compare.py runs/sparsity_protocol            # table.md, pareto.png, dead_units.png
    python recipes/sparsity_compare.py runs/sparsity_protocol --best     # print the penalty for a second seed

Reads every ``ROOT/*/results.json`` (a complete run_clm.py run; its activation, penalty and seed from its config).
The table has, per run, the final WikiText-2 perplexity, FFN zeros and dead units on the validation blocks, the zeros
while decoding greedily at batch 1, and HeLU's band share (pre-activations in ``(-alpha, 0]``). ``pareto.png``: final
perplexity against FFN zeros, one colour per activation, each activation's Pareto front (no other run of it has both
more zeros and a lower perplexity) drawn as a line. ``dead_units.png``: dead units per layer, one panel per
activation, one line per seed-0 run.

``--best``: the non-zero penalty whose seed-0 runs keep, for every activation, a perplexity within ``--tolerance`` of
that activation's penalty-0 run, and of those the one with the most decode zeros (mean over activations); when none
qualifies, the smallest non-zero penalty.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from clm_compare import load_runs

from hf_helu.atomic import atomic_write_text
from hf_helu.errors import UsageError

COLORS = {"relu": "tab:blue", "helu": "tab:orange", "keep": "tab:gray"}


def discover(root: Path) -> dict[str, dict]:
    """The complete runs under ``root`` (each subfolder with a results.json), by folder name, in sorted order."""
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder of run_clm.py runs")
    names = sorted(p.parent.name for p in root.glob("*/results.json"))
    if not names:
        raise UsageError(f"no */results.json under {root}: run recipes/sparsity_protocol.sh first")
    runs = load_runs(root, names)
    incomplete = [name for name, result in runs.items() if result.get("status") != "complete"]
    if incomplete:
        raise UsageError(f"incomplete runs under {root}: {', '.join(incomplete)}")
    return runs


def summary(result: dict) -> dict[str, Any]:
    """One run's row: activation, penalty, seed, perplexity, tokens and the sparsity figures (fractions)."""
    config, final = result["config"], result["evaluations"]["final"]
    ffn = final.get("ffn") or {}
    decode = result.get("decode_sparsity") or {}
    return {
        "activation": config["activation"],
        "penalty": float(config.get("sparsity_penalty", 0.0)),
        "seed": config["seed"],
        "perplexity": result["perplexity"]["final"],
        "converted": result["perplexity"].get("converted"),
        "tokens": result["train"]["train_tokens"],
        "zeros": ffn.get("zero_fraction"),
        "dead": ffn.get("dead_fraction"),
        "band": ffn.get("band_fraction"),
        "decode": decode.get("zero_fraction"),
        "dead_per_layer": [layer["dead_fraction"] for layer in ffn.get("layers", [])],
    }


def rows(runs: dict[str, dict]) -> list[dict[str, Any]]:
    """Every run's :func:`summary` with its folder name, ordered by activation, penalty, seed."""
    found = [{"name": name, **summary(result)} for name, result in runs.items()]
    return sorted(found, key=lambda r: (r["activation"], r["penalty"], r["seed"]))


def _percent(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def table(found: list[dict[str, Any]]) -> str:
    lines = [
        "| activation | penalty | seed | perplexity | after conversion | recovery tokens | FFN zeros % |"
        " dead units % | decode zeros % | band % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in found:
        converted = "-" if r["converted"] is None else f"{r['converted']:.1f}"
        lines.append(
            f"| {r['activation']} | {r['penalty']:g} | {r['seed']} | {r['perplexity']:.2f} | {converted} |"
            f" {r['tokens']} | {_percent(r['zeros'])} | {_percent(r['dead'], 2)} | {_percent(r['decode'])} |"
            f" {_percent(r['band'], 2)} |"
        )
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (zeros, perplexity) points no other point beats on both (more or equal zeros and lower or equal
    perplexity, one of them strictly), by increasing zeros."""
    front = []
    for x, y in points:
        beaten = any((ox >= x and oy <= y) and (ox > x or oy < y) for ox, oy in points)
        if not beaten:
            front.append((x, y))
    return sorted(set(front))


def plot_pareto(found: list[dict[str, Any]], path: Path):
    """Perplexity against FFN zeros (%), per activation: every run a point, its Pareto front a line. Returns the
    figure (axes[0].lines: one front per activation, in order of first appearance)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5.5, 4.0), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    for activation in dict.fromkeys(r["activation"] for r in found):
        mine = [r for r in found if r["activation"] == activation and r["zeros"] is not None]
        points = [(100 * r["zeros"], r["perplexity"]) for r in mine]
        color = COLORS.get(activation)
        ax.scatter([p[0] for p in points], [p[1] for p in points], color=color, s=18, label=f"{activation} runs")
        for r, (x, y) in zip(mine, points, strict=True):
            ax.annotate(f"{r['penalty']:g}", (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
        front = pareto_front(points)
        ax.plot([p[0] for p in front], [p[1] for p in front], color=color, label=f"{activation} front")
    ax.set_xlabel("FFN activations exactly 0 (%)")
    ax.set_ylabel("WikiText-2 perplexity")
    ax.set_title("perplexity against sparsity (labels: penalty)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    figure.savefig(path, format="png", dpi=110)
    return figure


def plot_dead_units(found: list[dict[str, Any]], path: Path):
    """Dead units per layer (%) of the seed-0 runs, one panel per activation, one line per penalty. Returns the
    figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    first_seed = min(r["seed"] for r in found)
    activations = list(dict.fromkeys(r["activation"] for r in found))
    figure = Figure(figsize=(4.5 * len(activations), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, len(activations), sharey=True, squeeze=False)[0]
    for ax, activation in zip(axes, activations, strict=True):
        for r in (r for r in found if r["activation"] == activation and r["seed"] == first_seed):
            ax.plot([100 * d for d in r["dead_per_layer"]], marker="o", markersize=3, label=f"penalty {r['penalty']:g}")
        ax.set_title(f"{activation} (seed {first_seed})")
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0].set_ylabel("dead FFN units (%)")
    figure.savefig(path, format="png", dpi=110)
    return figure


def best_penalty(found: list[dict[str, Any]], tolerance: float) -> float:
    """See the module doc (``--best``)."""
    seed = min(r["seed"] for r in found)
    first = [r for r in found if r["seed"] == seed]
    activations = sorted({r["activation"] for r in first if r["penalty"] > 0})
    baseline = {r["activation"]: r["perplexity"] for r in first if r["penalty"] == 0}
    if not activations:
        raise UsageError("no run with a non-zero penalty")
    missing = [a for a in activations if a not in baseline]
    if missing:
        raise UsageError(f"no penalty-0 run of seed {seed} for {', '.join(missing)}: nothing to compare against")
    penalties = sorted({r["penalty"] for r in first if r["penalty"] > 0})
    scores = {}
    for penalty in penalties:
        at = {r["activation"]: r for r in first if r["penalty"] == penalty}
        if set(at) != set(activations):
            continue
        if all(at[a]["perplexity"] <= baseline[a] * (1 + tolerance) for a in activations):
            scores[penalty] = sum(at[a]["decode"] or 0.0 for a in activations) / len(activations)
    return max(scores, key=scores.get) if scores else penalties[0]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="folder holding one run_clm.py output folder per run")
    parser.add_argument("--best", action="store_true", help="print the penalty for a second seed and stop")
    parser.add_argument("--tolerance", type=float, default=0.05, help="--best: relative perplexity increase allowed")
    args = parser.parse_args(argv)
    if not math.isfinite(args.tolerance) or args.tolerance < 0:
        raise UsageError(f"--tolerance must be a finite number >= 0, got {args.tolerance}")
    found = rows(discover(args.root))
    if args.best:
        print(f"{best_penalty(found, args.tolerance):g}")
        return
    text = table(found)
    print(text)
    atomic_write_text(args.root / "table.md", text + "\n")
    plot_pareto(found, args.root / "pareto.png")
    plot_dead_units(found, args.root / "dead_units.png")
    atomic_write_text(args.root / "summary.json", json.dumps(found, indent=1) + "\n")
    print(f"plots: {args.root / 'pareto.png'}, {args.root / 'dead_units.png'}")


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:  # bad input: one line, exit 2; anything else keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
