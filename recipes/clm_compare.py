"""Table and plot of a decoder-LM comparison: the ``results.json`` of ``run_clm.py`` runs side by side.

    python recipes/clm_compare.py runs/clm_protocol --runs keep relu helu

Prints a Markdown table (perplexity of the checkpoint, after conversion, after fine-tuning; FFN zeros and dead units
after fine-tuning) and writes ``OUT/ffn_zeros.png``: the share of zero FFN activations per layer after conversion
and after fine-tuning, one panel per run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hf_helu.atomic import atomic_write_text
from hf_helu.errors import UsageError


def load_runs(root: Path, names: list[str]) -> dict[str, dict]:
    runs = {}
    for name in names:
        path = root / name / "results.json"
        if not path.is_file():
            raise UsageError(f"no results.json at {path}: run recipes/run_clm.py with --output_dir {path.parent}")
        runs[name] = json.loads(path.read_text())
    return runs


def table(runs: dict[str, dict]) -> str:
    lines = [
        "| run | conversion | perplexity: checkpoint | after conversion | after fine-tuning | recovery tokens |"
        " FFN zeros % | dead units % |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, result in runs.items():
        ppl, final = result["perplexity"], result["evaluations"]["final"].get("ffn", {})
        conversion = result["model"].get("conversion", {})
        conversion = conversion.get("choice", conversion).get("method", "-")
        tokens = result["train"].get("train_tokens", "-")
        zeros = f"{100 * final['zero_fraction']:.1f}" if final else "-"
        dead = f"{100 * final['dead_fraction']:.2f}" if final else "-"
        converted = f"{ppl['converted']:.1f}" if "converted" in ppl else "-"
        lines.append(
            f"| {name} | {conversion} | {ppl['original']:.2f} | {converted} | {ppl['final']:.2f} | {tokens} |"
            f" {zeros} | {dead} |"
        )
    return "\n".join(lines)


def plot(runs: dict[str, dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = {n: r for n, r in runs.items() if "ffn" in r["evaluations"].get("final", {})}
    figure = Figure(figsize=(4.2 * max(len(panels), 1), 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, max(len(panels), 1), sharey=True, squeeze=False)[0]
    for ax, (name, result) in zip(axes, panels.items(), strict=False):
        for stage in ("converted", "final"):
            ffn = result["evaluations"].get(stage, {}).get("ffn")
            if ffn:
                ax.plot(
                    [100 * layer["zero_fraction"] for layer in ffn["layers"]], marker="o", markersize=3, label=stage
                )
        ax.set_title(name)
        ax.set_xlabel("layer")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    axes[0].set_ylabel("FFN activations exactly 0 (%)")
    figure.savefig(path, format="png", dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="folder holding one run_clm.py output folder per run")
    parser.add_argument("--runs", nargs="+", default=["keep", "relu", "helu"], help="run folder names, in order")
    args = parser.parse_args()
    runs = load_runs(args.root, args.runs)
    text = table(runs)
    print(text)
    atomic_write_text(args.root / "table.md", text + "\n")
    plot(runs, args.root / "ffn_zeros.png")
    print(f"plot: {args.root / 'ffn_zeros.png'}")


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        raise SystemExit(f"error: {error}") from None
