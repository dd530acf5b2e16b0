"""Compare FFN activations on GLUE: tasks x activations (keep, relu, helu[, alphas]) x conversions x seeds.

    python recipes/run_glue_compare.py --tasks rte mrpc stsb cola --seeds 0 1 2 --output_dir runs/glue_compare \\
        -- --data_dir ../shared/data/glue --num_train_epochs 3 --max_length 128

Everything after ``--`` (or any option this script does not know) goes to every ``recipes/run_glue.py`` run. Each
run is its own process (``python recipes/run_glue.py ...``) and writes OUTPUT_DIR/<task>/<variant>/seed<seed>/
results.json, which this script reads back; runs already complete are not redone, and an interrupted one resumes
from its last checkpoint, so an interrupted comparison is continued by running the same command again. At the end
(and after every run) OUTPUT_DIR/compare.md (a Markdown table: mean ± std over seeds of each task's GLUE score,
x100, and the average over tasks; plus the dead FFN units), OUTPUT_DIR/compare.json, OUTPUT_DIR/compare.png (bar
chart) and OUTPUT_DIR/dead_units_<task>.png (dead FFN units per layer at each evaluation, one panel per variant) are
written atomically. ``--alphas 0.05 0.5`` sweeps HeLU's margin (one column per alpha); ``--conversions none
calibrate anneal calibrate+anneal`` adds one column per conversion method for relu and helu (``keep`` is never
converted). The default, ``auto``, is run_glue.py's: calibrate+anneal for a pretrained GELU checkpoint, none for
``--init scratch``. ``auto`` (or ``none`` without ``auto``) labels its columns ``relu``/``helu``; with both, the
naive swap's are ``relu+none``/``helu+none``. A run folder holding a complete run made with another conversion is
refused, not read back.

Runs go one after another. ``--launcher "accelerate launch --num_processes 4"`` (or ``"torchrun --nproc_per_node
4"``) starts each of them on several processes; the comparison itself is one plain ``python`` process.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from recipe_support import glue
from recipe_support.args import ACTIVATION_CHOICES
from recipe_support.results import RESULTS_FILE
from recipe_support.training import checkpoint_names

from hf_helu.activation import DEFAULT_ALPHA
from hf_helu.atomic import atomic_write_bytes, atomic_write_json, atomic_write_text
from hf_helu.conversion import AUTO, CONVERSION_CHOICES
from hf_helu.diagnostics import plot_dead_fraction
from hf_helu.errors import UsageError
from hf_helu.inputs import alpha as alpha_value

RUN_GLUE = Path(__file__).resolve().with_name("run_glue.py")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--tasks", nargs="+", default=["rte", "mrpc", "stsb", "cola"])
    parser.add_argument("--activations", nargs="+", choices=ACTIVATION_CHOICES, default=list(ACTIVATION_CHOICES))
    parser.add_argument("--alphas", nargs="+", type=alpha_value, default=[DEFAULT_ALPHA], help="HeLU margins to sweep.")
    parser.add_argument(
        "--conversions",
        nargs="+",
        choices=CONVERSION_CHOICES,
        default=[AUTO],
        help="Conversion methods to compare (default: auto, run_glue.py's default).",
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output_dir", default="runs/glue_compare")
    parser.add_argument("--keep_models", action="store_true", help="Keep each run's model and checkpoints.")
    parser.add_argument("--title", default=None, help="Heading of compare.md (default: the protocol).")
    parser.add_argument(
        "--launcher",
        default=shlex.quote(sys.executable),
        help='How each run_glue.py run starts (default: this Python), e.g. "accelerate launch --num_processes 4".',
    )
    args, passthrough = parser.parse_known_args(argv)
    passthrough = [a for a in passthrough if a != "--"]
    args.tasks = [glue.get_task(t).name for t in args.tasks]
    for forbidden in ("--task", "--activation", "--alpha", "--conversion", "--seed", "--output_dir"):
        if forbidden in passthrough:
            raise UsageError(
                f"{forbidden} is set per run by run_glue_compare; use --tasks/--activations/--alphas/--conversions/"
                "--seeds"
            )
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UsageError(
            "run the comparison itself with python; --launcher 'accelerate launch --num_processes N' starts each run "
            "on several processes"
        )
    return args, passthrough


def variants(
    activations: list[str], alphas: list[float], conversions: tuple[str, ...] | list[str] = (AUTO,)
) -> list[tuple[str, str, float | None, str]]:
    """(label, activation, alpha, conversion) for each column of the table, e.g. "helu_0.5+calibrate"."""
    # auto (the default) or none alone is unlabelled ("helu"); asked together, none is "helu+none".
    unlabelled = {AUTO} if AUTO in conversions else {"none"}
    out = []
    for activation in activations:
        if activation == "keep":
            out.append((activation, activation, None, "none"))
            continue
        if activation == "helu":
            named = [("helu" if len(alphas) == 1 and a == DEFAULT_ALPHA else f"helu_{a:g}", a) for a in alphas]
        else:
            named = [(activation, None)]
        for conversion in conversions:
            suffix = "" if conversion in unlabelled else f"+{conversion}"
            out.extend((name + suffix, activation, alpha, conversion) for name, alpha in named)
    return out


def run_dir(root: Path, task: str, label: str, seed: int) -> Path:
    return root / task / label / f"seed{seed}"


def load_complete(path: Path, conversion: str | None = None) -> dict | None:
    """The complete run in ``path``, or None; a ValueError if it was made with another ``conversion`` than asked."""
    try:
        results = json.loads((path / RESULTS_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if results.get("status") != "complete":
        return None
    made_with = results.get("config", {}).get("conversion", "none")  # runs from before auto existed: none
    if conversion is not None and made_with != conversion:
        raise UsageError(
            f"{path} holds a complete run made with --conversion {made_with}, but this column asks for {conversion}; "
            "use another --output_dir (or delete that folder)"
        )
    return results


def run_argv(
    task: str, activation: str, alpha: float | None, seed: int, out: Path, passthrough: list[str], conversion: str
) -> list[str]:
    """The run_glue.py options of one run: resumed from its last checkpoint if it has one, else started afresh."""
    argv = ["--task", task, "--activation", activation, "--seed", str(seed), "--output_dir", str(out)]
    argv += ["--alpha", str(alpha)] if alpha is not None else []
    argv += ["--conversion", conversion]
    argv += ["--resume_from_checkpoint", "latest"] if checkpoint_names(out) else ["--overwrite_output_dir"]
    return [*argv, "--save_total_limit", "1", *passthrough]


def run_one(
    task: str,
    activation: str,
    alpha: float | None,
    seed: int,
    out: Path,
    passthrough: list[str],
    conversion: str = AUTO,
    launcher: str = shlex.quote(sys.executable),
) -> dict:
    """One recipes/run_glue.py run in its own process (a finished one is read back, an interrupted one resumed)."""
    done = load_complete(out, conversion)
    if done is not None:
        return done
    command = [
        *shlex.split(launcher),
        str(RUN_GLUE),
        *run_argv(task, activation, alpha, seed, out, passthrough, conversion),
    ]
    completed = subprocess.run(command, check=False)
    results = load_complete(out, conversion)
    if completed.returncode != 0 or results is None:
        raise SystemExit(f"run failed (exit status {completed.returncode}): {shlex.join(command)}")
    return results


def _score(task: str, results: dict) -> float:
    spec = glue.get_task(task)
    splits = list(results["final"].values())  # MNLI: the mean over matched and mismatched
    return float(np.mean([glue.glue_score(spec, split) for split in splits]))


def summarise(table: dict[str, dict[str, dict[int, dict]]], tasks: list[str], labels: list[str]) -> dict:
    """Per task and variant: scores per seed, mean, std (ddof=1), dead FFN fraction; plus the task average."""
    summary: dict = {"tasks": {}, "average": {}}
    for task in tasks:
        summary["tasks"][task] = {}
        for label in labels:
            runs = table.get(task, {}).get(label, {})
            scores = {seed: _score(task, r) for seed, r in sorted(runs.items())}
            dead = [r["dead_units"]["dead_fraction"] for r in runs.values() if r.get("dead_units")]
            values = list(scores.values())
            summary["tasks"][task][label] = {
                "scores": scores,
                "mean": float(np.mean(values)) if values else None,
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                "dead_fraction": float(np.mean(dead)) if dead else None,
                "wall_time_s": float(sum(r.get("wall_time_s", 0.0) for r in runs.values())),
            }
    for label in labels:
        cells = [summary["tasks"][t][label] for t in tasks]
        if any(c["mean"] is None for c in cells):
            summary["average"][label] = {"mean": None, "std": None}
            continue
        # Average over tasks per seed (seeds every task has), then mean ± std over those seeds.
        seeds = set.intersection(*(set(c["scores"]) for c in cells))
        per_seed = [np.mean([c["scores"][s] for c in cells]) for s in sorted(seeds)]
        summary["average"][label] = {
            "mean": float(np.mean([c["mean"] for c in cells])),
            "std": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else None,
        }
    return summary


def _cell(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "–"
    return f"{mean:.1f} ± {std:.1f}" if std is not None else f"{mean:.1f}"


def markdown(summary: dict, tasks: list[str], labels: list[str], title: str, command: str) -> str:
    metric = {t: "/".join(glue.get_task(t).metrics) for t in tasks}
    lines = [f"## {title}", "", f"Command: `{command}`", ""]
    lines += ["GLUE dev score x100 (mean ± std over seeds; MRPC/QQP: mean of accuracy and F1, STS-B: mean of Pearson "
              "and Spearman, CoLA: Matthews correlation, others: accuracy).", ""]  # fmt: skip
    lines += ["| task (metric) | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for task in tasks:
        cells = [_cell(summary["tasks"][task][lb]["mean"], summary["tasks"][task][lb]["std"]) for lb in labels]
        lines.append(f"| {task} ({metric[task]}) | " + " | ".join(cells) + " |")
    avg = [_cell(summary["average"][lb]["mean"], summary["average"][lb]["std"]) for lb in labels]
    lines.append("| **average** | " + " | ".join(f"**{c}**" for c in avg) + " |")
    lines += ["", "Dead FFN units on the dev set after fine-tuning (% of units that never fire, mean over seeds):", ""]
    lines += ["| task | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for task in tasks:
        cells = []
        for lb in labels:
            dead = summary["tasks"][task][lb]["dead_fraction"]
            cells.append("–" if dead is None else f"{100 * dead:.1f}")
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    seeds = sorted({s for t in tasks for lb in labels for s in summary["tasks"][t][lb]["scores"]})
    lines += ["", f"Seeds: {seeds}. Per-seed scores are in compare.json.", ""]
    return "\n".join(lines)


def bar_chart(summary: dict, tasks: list[str], labels: list[str], path: Path, title: str) -> Path:
    """Grouped bars (one group per task and the average), error bars = std over seeds; written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [*tasks, "average"]
    cells = [*(summary["tasks"][t] for t in tasks), summary["average"]]
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(1.6 * len(groups) + 2, 4))
    for i, label in enumerate(labels):
        means = [c[label]["mean"] if c[label]["mean"] is not None else np.nan for c in cells]
        stds = [c[label]["std"] or 0.0 for c in cells]
        xs = np.arange(len(groups)) + (i - (len(labels) - 1) / 2) * width
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=label)
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel("GLUE dev score x100")
    ax.set_title(title, fontsize=9)
    ax.axhline(0, color="black", linewidth=0.5)
    ax.legend(fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def dead_unit_history(runs: dict[str, dict[int, dict]]) -> dict[str, list[dict]]:
    """Per variant, the dead fraction per layer at each evaluation of its lowest-seed run (for the plot)."""
    history = {}
    for label, by_seed in runs.items():
        epochs = by_seed[min(by_seed)]["epochs"]
        points = [
            {"step": e["step"], "dead_fraction": [layer["dead_fraction"] for layer in e["dead_units"]["layers"]]}
            for e in epochs
            if e.get("dead_units")
        ]
        if points:
            history[label] = points
    return history


def write_report(root: Path, table: dict, tasks: list[str], labels: list[str], title: str, command: str) -> dict:
    summary = summarise(table, tasks, labels)
    atomic_write_json(root / "compare.json", {"command": command, "title": title, **summary})
    atomic_write_text(root / "compare.md", markdown(summary, tasks, labels, title, command))
    bar_chart(summary, tasks, labels, root / "compare.png", title)
    for task, runs in table.items():
        history = dead_unit_history(runs)
        if history:
            plot_dead_fraction(history, root / f"dead_units_{task}.png")
    return summary


def main(argv: list[str] | None = None) -> dict:
    args, passthrough = parse_args(argv)
    root = Path(args.output_dir)
    columns = variants(args.activations, args.alphas, args.conversions)
    labels = [label for label, *_ in columns]
    command = shlex.join(["python", "recipes/run_glue_compare.py", *(argv if argv is not None else sys.argv[1:])])
    title = args.title or f"GLUE: {', '.join(args.tasks)} x {', '.join(labels)} x seeds {args.seeds}"
    table: dict[str, dict[str, dict[int, dict]]] = {}
    start = time.perf_counter()
    total = len(args.tasks) * len(columns) * len(args.seeds)
    count = 0
    for seed in args.seeds:  # seed-major: a cut-short comparison still has every cell for the first seeds
        for task in args.tasks:
            for label, activation, alpha, conversion in columns:
                count += 1
                out = run_dir(root, task, label, seed)
                print(f"[{count}/{total}] {task} {label} seed {seed} ({time.perf_counter() - start:.0f} s)", flush=True)
                results = run_one(task, activation, alpha, seed, out, passthrough, conversion, args.launcher)
                if not args.keep_models:
                    for sub in ("model", "model_relu", "checkpoints"):
                        shutil.rmtree(out / sub, ignore_errors=True)
                table.setdefault(task, {}).setdefault(label, {})[seed] = results
                write_report(root, table, args.tasks, labels, title, command)
    summary = summarise(table, args.tasks, labels)
    print((root / "compare.md").read_text())
    return summary


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:  # bad input: one line; any other exception is a bug and keeps its traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
