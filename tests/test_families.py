"""Where each family keeps its activations: the table covers the tested families, the generic fallback agrees
with it, and the site fields that patching, conversion and the diagnostics rely on."""

from __future__ import annotations

import pytest
import transformers
from family_cases import CASES, FAMILY_IDS, build

from hf_helu import find_activation_sites
from hf_helu.families import FAMILIES, all_activation_sites

transformers.logging.set_verbosity_error()

pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_table_family_is_tested():
    tested = {case.config_cls.model_type for case in CASES.values()}
    assert set(FAMILIES) == tested


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_generic_fallback_agrees_with_the_family_table(family):
    model = build(CASES[family])

    def key(sites):
        return [(s.name, s.layer_index, s.kind, s.config_attr, s.output_projection, s.gated) for s in sites]

    assert key(all_activation_sites(model, use_table=False)) == key(all_activation_sites(model))


def test_ffn_sites_for_diagnostics_and_conversion():
    """The site fields other modules rely on: order, layer index, config attribute, output projection."""
    model = build(CASES["whisper"])
    sites = find_activation_sites(model)
    assert [(s.name, s.layer_index) for s in sites] == [
        ("model.encoder.layers.0.activation_fn", 0),
        ("model.encoder.layers.1.activation_fn", 1),
        ("model.decoder.layers.0.activation_fn", 0),
        ("model.decoder.layers.1.activation_fn", 1),
    ]
    assert {s.config_attr for s in sites} == {"activation_function"}
    assert [s.output_projection for s in sites] == [s.name.replace("activation_fn", "fc2") for s in sites]
    assert [s.name for s in find_activation_sites(model, [1])] == [sites[1].name, sites[3].name]
