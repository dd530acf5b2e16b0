"""The paper's NLP protocol at a chosen scale: pretrain one BERT per activation, fine-tune each on GLUE, one table.

    python recipes/run_pretrain_compare.py --activations gelu relu helu helu_0.5 --tasks sst2 stsb --seeds 0 1 2 \\
        --output_dir runs/pretrain_compare --mlm_args "--size mini --max_tokens 2000000" \\
        --glue_args "--data_dir ../shared/data/glue --num_train_epochs 3"

Each activation is pretrained once (``recipes/run_mlm.py --hidden_act ACT``, OUTPUT_DIR/pretrain/ACT), then each
model is fine-tuned on every task and seed (``recipes/run_glue.py --model_name_or_path OUTPUT_DIR/pretrain/ACT/model
--init pretrained``, OUTPUT_DIR/glue/TASK/ACT/seedS). Every run is its own process; complete runs are read back, an
interrupted one resumes from its last checkpoint, so the same command continues a cut-short comparison.
Fine-tuned models are deleted after their run unless ``--keep_models``.

Writes, atomically, after every run: OUTPUT_DIR/compare.md (the paper's Table 2 layout: one row per activation, one
column per task, the average; then the pretraining columns: valid MLM loss and accuracy, dead and near-dead FFN
units at the end of pretraining), compare.json, compare.png (the table as grouped bars) and, beside it, the
dead-unit curves of pretraining: dead_units.png (per layer, one panel per activation) and dead_curves.png (dead and
near-dead units over all layers, the activations overlaid).
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from recipe_support import glue
from recipe_support.mlm import check_hidden_act
from recipe_support.results import RESULTS_FILE
from recipe_support.training import checkpoint_names

from hf_helu.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from hf_helu.diagnostics import plot_dead_fraction
from hf_helu.errors import UsageError

RECIPES = Path(__file__).resolve().parent
RUN_MLM, RUN_GLUE = RECIPES / "run_mlm.py", RECIPES / "run_glue.py"
SET_PER_RUN = ("--hidden_act", "--output_dir", "--task", "--model_name_or_path", "--init", "--seed", "--activation")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--activations", nargs="+", default=["gelu", "relu", "helu", "helu_0.5"])
    parser.add_argument("--tasks", nargs="+", default=["sst2", "mrpc", "stsb", "rte", "cola"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="Fine-tuning seeds.")
    parser.add_argument("--pretrain_seed", type=int, default=42, help="The one pretraining seed (paper: 42).")
    parser.add_argument("--output_dir", default="runs/pretrain_compare")
    parser.add_argument("--mlm_args", default="", help="Options for every run_mlm.py run (one string).")
    parser.add_argument("--glue_args", default="", help="Options for every run_glue.py run (one string).")
    parser.add_argument("--keep_models", action="store_true", help="Keep fine-tuned models and checkpoints.")
    parser.add_argument("--title", default=None)
    parser.add_argument("--launcher", default=shlex.quote(sys.executable), help='e.g. "accelerate launch".')
    args = parser.parse_args(argv)
    for name in args.activations:
        check_hidden_act(name)
    if len(set(args.activations)) != len(args.activations):
        raise UsageError(f"--activations has duplicates: {args.activations}")
    args.tasks = [glue.get_task(task).name for task in args.tasks]
    args.mlm_argv, args.glue_argv = shlex.split(args.mlm_args), shlex.split(args.glue_args)
    for flag in SET_PER_RUN:
        if flag in args.mlm_argv or flag in args.glue_argv:
            raise UsageError(f"{flag} is set per run by run_pretrain_compare; use --activations/--tasks/--seeds")
    return args


def load_complete(path: Path) -> dict | None:
    """The complete results.json in ``path``, or None."""
    try:
        results = json.loads((path / RESULTS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return results if results.get("status") == "complete" else None


def run_recipe(launcher: str, script: Path, out: Path, argv: list[str]) -> dict:
    """One recipe run in its own process: read back if complete, resumed if it has checkpoints, else started."""
    done = load_complete(out)
    if done is not None:
        return done
    resume = ["--resume_from_checkpoint", "latest"] if checkpoint_names(out) else ["--overwrite_output_dir"]
    command = [*shlex.split(launcher), str(script), *argv, "--output_dir", str(out), *resume, "--no_progress"]
    print(f"$ {shlex.join(command)}", flush=True)
    completed = subprocess.run(command, check=False)
    results = load_complete(out)
    if completed.returncode != 0 or results is None:
        raise SystemExit(f"run failed (exit status {completed.returncode}): {shlex.join(command)}")
    return results


def glue_score(task: str, results: dict) -> float:
    """The GLUE score x100 of a run (MNLI: mean over matched and mismatched)."""
    spec = glue.get_task(task)
    return float(np.mean([glue.glue_score(spec, split) for split in results["final"].values()]))


def summarise(pretrain: dict[str, dict], finetune: dict[str, dict[str, dict[int, dict]]], tasks: list[str]) -> dict:
    """Per activation: pretraining's final valid metrics, and per task the scores per seed, mean and std."""
    rows = {}
    for act, results in pretrain.items():
        cells = {}
        for task in tasks:
            scores = {s: glue_score(task, r) for s, r in sorted(finetune.get(task, {}).get(act, {}).items())}
            values = list(scores.values())
            cells[task] = {
                "scores": scores,
                "mean": float(np.mean(values)) if values else None,
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            }
        means = [cells[t]["mean"] for t in tasks]
        final = results["final"]["valid"]
        rows[act] = {
            "tasks": cells,
            "average": float(np.mean(means)) if means and None not in means else None,
            "pretrain": {k: final[k] for k in ("mlm_loss", "mlm_accuracy", "dead", "near_dead")},
            "pretrain_wall_time_s": results["wall_time_s"],
            "pretrain_tokens": results["config"]["budget"]["tokens"],
        }
    return rows


def _cell(cell: dict) -> str:
    if cell["mean"] is None:
        return "–"
    return f"{cell['mean']:.1f} ± {cell['std']:.1f}" if cell["std"] is not None else f"{cell['mean']:.1f}"


def markdown(rows: dict, tasks: list[str], title: str, command: str) -> str:
    """The table in the paper's layout (rows: activations; columns: tasks, average), then pretraining columns."""
    head = [f"{t} ({'/'.join(glue.get_task(t).metrics)})" for t in tasks]
    lines = [f"## {title}", "", f"Command: `{command}`", ""]
    note = "GLUE dev score x100, mean ± std over fine-tuning seeds; pretraining columns on the valid blocks at the end "
    note += "of pretraining (dead: FFN units that never fire; near-dead: fire on < 1% of tokens)."
    lines += [note, ""]
    columns = ["activation", *head, "average", "MLM loss", "MLM acc %", "dead %", "near-dead %", "pretrain min"]
    lines += ["| " + " | ".join(columns) + " |", "|---|" + "---:|" * (len(columns) - 1)]
    for act, row in rows.items():
        pre = row["pretrain"]
        average = "–" if row["average"] is None else f"**{row['average']:.1f}**"
        cells = [act, *(_cell(row["tasks"][t]) for t in tasks), average, f"{pre['mlm_loss']:.3f}"]
        cells += [f"{100 * pre['mlm_accuracy']:.1f}", f"{100 * pre['dead']:.2f}", f"{100 * pre['near_dead']:.2f}"]
        cells.append(f"{row['pretrain_wall_time_s'] / 60:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Per-seed scores and the dead-unit curves are in compare.json; plots: compare.png, dead_units.png, "
              "dead_curves.png.", ""]  # fmt: skip
    return "\n".join(lines)


def curves(pretrain: dict[str, dict]) -> dict[str, list[dict[str, Any]]]:
    """Per activation: step, dead and near-dead fractions (all layers and per layer) at each evaluation."""
    out = {}
    for act, results in pretrain.items():
        points = [(0, results["model"]["initial_eval"]["eval"]["valid"])]
        points += [(epoch["step"], epoch["eval"]["valid"]) for epoch in results["epochs"]]
        layers = results["model"]["config"]["num_hidden_layers"]
        out[act] = [
            {
                "step": step,
                "dead": m["dead"],
                "near_dead": m["near_dead"],
                "dead_fraction": [m[f"dead_{i}"] for i in range(layers)],
                "near_dead_fraction": [m[f"near_dead_{i}"] for i in range(layers)],
                "mlm_loss": m["mlm_loss"],
            }
            for step, m in points
        ]
    return out


def _figure_png(figure: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    return atomic_write_bytes(path, buffer.getvalue())


def plot_table(rows: dict, tasks: list[str], path: Path, title: str) -> Path:
    """Grouped bars: one group per task and the average, one bar per activation (error bars: std over seeds)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    groups = [*tasks, "average"]
    figure = Figure(figsize=(1.6 * len(groups) + 2, 4), layout="constrained")
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    width = 0.8 / len(rows)
    for i, (act, row) in enumerate(rows.items()):
        means = [row["tasks"][t]["mean"] for t in tasks] + [row["average"]]
        stds = [row["tasks"][t]["std"] or 0.0 for t in tasks] + [0.0]
        xs = np.arange(len(groups)) + (i - (len(rows) - 1) / 2) * width
        ax.bar(xs, [np.nan if m is None else m for m in means], width, yerr=stds, capsize=3, label=act)
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel("GLUE dev score x100")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    return _figure_png(figure, path)


def plot_curves(history: dict[str, list[dict]], path: Path) -> Path:
    """Dead and near-dead FFN units (% of all layers' units) over pretraining, the activations overlaid."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(9, 3.6), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, 2)
    for key, ax in zip(("dead", "near_dead"), axes, strict=True):
        for act, points in history.items():
            ax.plot([p["step"] for p in points], [100 * p[key] for p in points], marker="o", markersize=3, label=act)
        ax.set_title("dead (never fire)" if key == "dead" else "near-dead (fire on < 1% of tokens)")
        ax.set_xlabel("pretraining step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("FFN units (%)")
    axes[1].legend(fontsize="small")
    return _figure_png(figure, path)


def write_report(root: Path, pretrain: dict, finetune: dict, tasks: list[str], title: str, command: str) -> dict:
    rows = summarise(pretrain, finetune, tasks)
    history = curves(pretrain)
    atomic_write_json(root / "compare.json", {"command": command, "title": title, "rows": rows, "curves": history})
    atomic_write_text(root / "compare.md", markdown(rows, tasks, title, command))
    if finetune:
        plot_table(rows, tasks, root / "compare.png", title)
    plot_dead_fraction(history, root / "dead_units.png")
    plot_curves(history, root / "dead_curves.png")
    return rows


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    root = Path(args.output_dir)
    command = shlex.join(["python", "recipes/run_pretrain_compare.py", *(argv if argv is not None else sys.argv[1:])])
    title = args.title or f"Pretraining from scratch: {', '.join(args.activations)} x {', '.join(args.tasks)}"
    pretrain: dict[str, dict] = {}
    for act in args.activations:
        argv_mlm = ["--hidden_act", act, "--seed", str(args.pretrain_seed), *args.mlm_argv]
        pretrain[act] = run_recipe(args.launcher, RUN_MLM, root / "pretrain" / act, argv_mlm)
        write_report(root, pretrain, {}, args.tasks, title, command)
    finetune: dict[str, dict[str, dict[int, dict]]] = {}
    for seed in args.seeds:
        for task in args.tasks:
            for act in args.activations:
                out = root / "glue" / task / act / f"seed{seed}"
                model = root / "pretrain" / act / "model"
                argv_glue = [
                    "--task",
                    task,
                    "--model_name_or_path",
                    str(model),
                    "--init",
                    "pretrained",
                    "--seed",
                    str(seed),
                ]
                argv_glue += ["--save_total_limit", "1", *args.glue_argv]
                finetune.setdefault(task, {}).setdefault(act, {})[seed] = run_recipe(
                    args.launcher, RUN_GLUE, out, argv_glue
                )
                if not args.keep_models:
                    for name in ("model", "model_relu", "checkpoints"):
                        shutil.rmtree(out / name, ignore_errors=True)
                write_report(root, pretrain, finetune, args.tasks, title, command)
    rows = write_report(root, pretrain, finetune, args.tasks, title, command)
    print((root / "compare.md").read_text())
    return rows


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:  # bad input: one line; any other exception is a bug and keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
