"""ActivationStats / LayerActivationStats (hf_helu.diagnostics.stats): fractions, totals, JSON form and table,
from hand-written counts."""

import json

from hf_helu.diagnostics import ActivationStats, LayerActivationStats


def layer(name, units, dead, tokens, zeros, band=None, alpha=None, index=None, **extra):
    return LayerActivationStats(
        name=name,
        layer_index=index,
        units=units,
        dead_units=len(dead),
        tokens=tokens,
        zero_elements=zeros,
        band_elements=band,
        alpha=alpha,
        calls=2,
        unmasked_calls=extra.pop("unmasked_calls", 0),
        nan_calls=extra.pop("nan_calls", 0),
        dead_indices=tuple(dead),
    )


def two_layers() -> ActivationStats:
    return ActivationStats(
        (
            layer("a.0.act", 4, [1], tokens=10, zeros=12, band=3, alpha=0.1, index=0),
            layer("a.1.act", 8, [0, 5, 7], tokens=10, zeros=40, index=1),
        )
    )


def test_layer_fractions():
    first, second = two_layers().layers
    assert (first.elements, first.dead_fraction, first.zero_fraction, first.band_fraction) == (40, 0.25, 0.3, 0.075)
    assert second.band_fraction is None and second.zero_fraction == 0.5
    empty = layer("x", 4, [0, 1, 2, 3], tokens=0, zeros=0, band=0, alpha=0.1)
    assert empty.zero_fraction is None and empty.band_fraction is None and empty.dead_fraction == 1.0


def test_totals_over_layers():
    stats = two_layers()
    assert stats.dead_fraction == 4 / 12
    assert stats.zero_fraction == 52 / 120
    assert stats.band_fraction == 3 / 40  # only the layers that have a band
    assert stats.dead_fractions == [0.25, 3 / 8]
    assert stats.history_entry(3) == {"step": 3, "dead_fraction": [0.25, 3 / 8]}
    assert ActivationStats((two_layers().layers[1],)).band_fraction is None


def test_to_dict_is_json_and_indices_are_optional():
    stats = two_layers()
    data = stats.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert (data["units"], data["dead_units"]) == (12, 4)
    assert data["layers"][0] == {
        "name": "a.0.act",
        "layer_index": 0,
        "units": 4,
        "dead_units": 1,
        "dead_fraction": 0.25,
        "tokens": 10,
        "zero_fraction": 0.3,
        "band_fraction": 0.075,
        "alpha": 0.1,
        "calls": 2,
        "unmasked_calls": 0,
        "nan_calls": 0,
    }
    assert [entry["dead_indices"] for entry in stats.to_dict(include_indices=True)["layers"]] == [[1], [0, 5, 7]]


def test_table_rows_and_notes():
    stats = two_layers()
    lines = stats.table().splitlines()
    assert lines[0].split() == [
        "layer",
        "activation",
        "units",
        "dead",
        "dead",
        "%",
        "zeros",
        "%",
        "band",
        "%",
        "tokens",
    ]
    assert lines[2].split() == ["0", "a.0.act", "4", "1", "25.00", "30.00", "7.50", "10"]
    assert lines[3].split() == ["1", "a.1.act", "8", "3", "37.50", "50.00", "-", "10"]
    assert lines[5].split() == ["all", "12", "4", "33.33", "43.33", "7.50"]
    assert "alpha 0.1" in lines[-1] and "NaN" not in stats.table()
    assert str(stats) == stats.table()
    flagged = ActivationStats((layer("x", 2, [], tokens=1, zeros=0, nan_calls=1, unmasked_calls=1),))
    assert "NaN/inf outputs (statistics unreliable) in: x" in flagged.table()
    assert "no padding mask could be applied to some calls of: x" in flagged.table()
