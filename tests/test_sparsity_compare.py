"""recipes/sparsity_compare.py on synthetic run_clm.py results: the table's figures, the Pareto plot's points and
fronts, the dead-unit plot's lines, the --best choice, and bad input."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import pytest
from helpers import REPO, load_script

SCRIPT = REPO / "recipes" / "sparsity_compare.py"


@functools.cache
def compare():
    sys.path.insert(0, str(REPO / "recipes"))  # clm_compare beside it
    return load_script(SCRIPT, "sparsity_compare")


# (activation, penalty, seed) -> (perplexity, FFN zeros, decode zeros, dead per layer)
RUNS = {
    ("relu", 0.0, 0): (26.0, 0.64, 0.66, [0.0, 0.01]),
    ("relu", 0.1, 0): (26.5, 0.75, 0.78, [0.02, 0.03]),
    ("relu", 1.0, 0): (40.0, 0.70, 0.90, [0.10, 0.20]),  # beaten by penalty 0.1: fewer zeros, worse perplexity
    ("helu", 0.0, 0): (26.2, 0.63, 0.65, [0.0, 0.0]),
    ("helu", 0.1, 0): (26.4, 0.80, 0.83, [0.01, 0.02]),
    ("helu", 1.0, 0): (30.0, 0.90, 0.92, [0.05, 0.04]),
    ("helu", 0.1, 1): (26.6, 0.79, 0.82, [0.01, 0.01]),
}


def write_run(root, activation: str, penalty: float, seed: int, figures) -> None:
    perplexity, zeros, decode, dead = figures
    layers = [{"dead_fraction": d, "zero_fraction": zeros} for d in dead]
    band = 0.012 if activation == "helu" else None
    result = {
        "status": "complete",
        "config": {"activation": activation, "sparsity_penalty": penalty, "seed": seed},
        "perplexity": {"original": 15.9, "converted": 38.0, "final": perplexity},
        "evaluations": {
            "final": {
                "ffn": {
                    "zero_fraction": zeros,
                    "dead_fraction": sum(dead) / len(dead),
                    "band_fraction": band,
                    "layers": layers,
                }
            }
        },
        "train": {"train_tokens": 49152},
        "decode_sparsity": {"zero_fraction": decode},
    }
    folder = root / f"{activation}_p{penalty:g}_s{seed}"
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(result))


@pytest.fixture
def sweep(tmp_path):
    for key, figures in RUNS.items():
        write_run(tmp_path, *key, figures)
    return tmp_path


def test_table_plots_and_best(sweep, capsys):
    """The table has one row per run with its percentages; the Pareto plot has every run's point and per
    activation the front (ReLU's penalty-1 run is beaten, so not on it); the dead-unit plot has one line per seed-0
    run with its per-layer percentages; --best picks the penalty within 5% of both baselines with most decode
    zeros (0.1: penalty 1 costs ReLU 54%)."""
    module = compare()
    module.main([str(sweep)])
    table = (sweep / "table.md").read_text().splitlines()
    assert len(table) == 2 + len(RUNS)
    assert "| helu | 0.1 | 1 | 26.60 | 38.0 | 49152 | 79.0 | 1.00 | 82.0 | 1.20 |" in table
    assert "| relu | 1 | 0 | 40.00 | 38.0 | 49152 | 70.0 | 15.00 | 90.0 | - |" in table
    assert (sweep / "pareto.png").stat().st_size > 0 and (sweep / "dead_units.png").stat().st_size > 0

    found = module.rows(module.discover(sweep))
    figure = module.plot_pareto(found, sweep / "check.png")
    ax = figure.axes[0]
    fronts = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata())) for line in ax.lines}
    assert fronts["helu front"] == (pytest.approx([63.0, 80.0, 90.0]), pytest.approx([26.2, 26.4, 30.0]))
    assert fronts["relu front"] == (pytest.approx([64.0, 75.0]), pytest.approx([26.0, 26.5]))
    points = sorted(tuple(p) for collection in ax.collections for p in collection.get_offsets().tolist())
    expected = sorted((100 * z, p) for (p, z, _, _) in RUNS.values())
    assert [x for x, _ in points] == pytest.approx([x for x, _ in expected])
    assert [y for _, y in points] == pytest.approx([y for _, y in expected])

    figure = module.plot_dead_units(found, sweep / "check.png")
    panels = {ax.get_title(): ax for ax in figure.axes}
    assert set(panels) == {"helu (seed 0)", "relu (seed 0)"}
    lines = {line.get_label(): list(line.get_ydata()) for line in panels["relu (seed 0)"].lines}
    assert lines == {
        "penalty 0": pytest.approx([0.0, 1.0]),
        "penalty 0.1": pytest.approx([2.0, 3.0]),
        "penalty 1": pytest.approx([10.0, 20.0]),
    }
    assert len(panels["helu (seed 0)"].lines) == 3  # the seed-1 run is not drawn

    capsys.readouterr()
    module.main([str(sweep), "--best"])
    assert capsys.readouterr().out.strip() == "0.1"
    module.main([str(sweep), "--best", "--tolerance", "0.6"])  # penalty 1 qualifies too, with more decode zeros
    assert capsys.readouterr().out.strip() == "1"


def test_pareto_front_written_apart():
    """A point is off the front when another has at least as many zeros and at most its perplexity."""
    front = compare().pareto_front([(60, 20.0), (70, 21.0), (65, 22.0), (70, 25.0), (80, 30.0)])
    assert front == [(60, 20.0), (70, 21.0), (80, 30.0)]


def test_bad_root_exits_2(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "results.json").write_text(json.dumps({"status": "running"}))
    proc = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: incomplete runs under {tmp_path}: run"
