"""Scratch Wav2Vec2 configs (recipe_support.speech.tasks): size presets with ``--config_overrides`` applied by
``PretrainedConfig.update_from_string``."""

from __future__ import annotations

import pytest
from recipe_support import speech

from hf_helu.errors import UsageError


def test_overrides_set_typed_fields_of_the_preset():
    config = speech.scratch_config("tiny", "hidden_size=48,hidden_dropout=0.25,do_stable_layer_norm=false")
    assert (config.hidden_size, config.hidden_dropout, config.do_stable_layer_norm) == (48, 0.25, False)
    assert config.num_hidden_layers == speech.SIZES["tiny"]["num_hidden_layers"]  # the rest of the preset kept
    assert speech.scratch_config("tiny").hidden_size == speech.SIZES["tiny"]["hidden_size"]


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("hidden_sizes=4", "key hidden_sizes isn't in the original config"),
        ("hidden_size=wide", "invalid literal for int"),
        ("hidden_size", "key=value"),
    ],
)
def test_bad_overrides_are_usage_errors_naming_the_text(text, match):
    with pytest.raises(UsageError, match=rf"--config_overrides '{text}': .*{match}"):
        speech.scratch_config("tiny", text)
    with pytest.raises(UsageError, match="unknown model size 'huge'"):
        speech.scratch_config("huge")
