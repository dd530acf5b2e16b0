"""plot_dead_fraction (hf_helu.diagnostics.plot): a PNG written atomically, and bad histories refused."""

import pytest

from hf_helu.diagnostics import plot_dead_fraction
from hf_helu.diagnostics.plot import dead_fraction_figure


def test_plot_dead_fraction_writes_a_png_atomically(tmp_path):
    import matplotlib.image

    history = {
        name: [{"step": step, "dead_fraction": [0.01 * step * (i + k) for i in range(3)]} for step in (0, 1, 2)]
        for k, name in enumerate(["gelu", "relu", "helu"])
    }
    path = plot_dead_fraction(history, tmp_path / "plots" / "dead.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(path).shape
    assert width > 2 * height  # three panels side by side
    assert sorted(p.name for p in path.parent.iterdir()) == ["dead.png"]
    for bad in ({}, {"relu": []}, {"relu": [{"step": 0}]}, {"relu": [{"step": 0, "dead_fraction": [1.5]}]}):
        with pytest.raises(ValueError, match="history"):
            plot_dead_fraction(bad, tmp_path / "bad.png")
    ragged = {"relu": [{"step": 0, "dead_fraction": [0.1]}, {"step": 1, "dead_fraction": [0.1, 0.2]}]}
    with pytest.raises(ValueError, match="layers"):
        plot_dead_fraction(ragged, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_the_figure_plots_each_layer_in_percent_in_step_order():
    """Each panel is one activation, each line one layer: x the steps sorted, y 100 x that layer's dead fraction."""
    history = {
        "relu": [{"step": 20, "dead_fraction": [0.5, 0.25]}, {"step": 10, "dead_fraction": [0.1, 0.0]}],
        "helu": [{"step": 10, "dead_fraction": [0.05, 0.2]}, {"step": 20, "dead_fraction": [0.0, 0.4]}],
    }
    figure = dead_fraction_figure(history)
    assert [ax.get_title() for ax in figure.axes] == ["relu", "helu"]
    for ax, points in zip(figure.axes, history.values(), strict=True):
        by_step = {p["step"]: p["dead_fraction"] for p in points}
        steps = sorted(by_step)
        assert len(ax.lines) == 2
        for layer, line in enumerate(ax.lines):
            assert list(line.get_xdata()) == steps
            assert list(line.get_ydata()) == pytest.approx([100 * by_step[s][layer] for s in steps])
