"""``hf-helu inspect``: sites, activations and alphas of a checkpoint, as JSON and as a table."""

from __future__ import annotations

import json

import pytest
from cli_helpers import save_bert_checkpoint, save_partial_patch

from hf_helu.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_inspect_of_a_patched_checkpoint(tmp_path, capsys):
    bert_folder = save_bert_checkpoint(tmp_path / "src")
    patched = tmp_path / "patched"
    assert main(["patch", str(bert_folder), str(patched), "--alpha", "0.1"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(patched), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["model_class"] == "BertForMaskedLM" and info["num_ffn"] == 2 and info["helu_alphas"] == [0.1]
    ffn = [s for s in info["sites"] if s["kind"] == "ffn"]
    assert [s["layer"] for s in ffn] == [0, 1]
    assert all(s["activation"] == "helu_0.1" and s["config_value"] == "helu_0.1" for s in ffn)
    assert ffn[0]["output_projection"] == "bert.encoder.layer.0.output.dense"
    assert main(["inspect", str(patched)]) == 0
    table = capsys.readouterr().out
    assert "BertForMaskedLM (model_type bert): 2 FFN activation(s)" in table and "HeLU alpha: 0.1" in table
    assert "bert.encoder.layer.1.intermediate.intermediate_act_fn" in table


def test_inspect_rebuilds_a_recorded_partial_patch(tmp_path, capsys):
    bert_folder = save_bert_checkpoint(tmp_path / "src")
    # inspect rebuilds the recorded partial patch from config.hf_helu
    partial = save_partial_patch(bert_folder, tmp_path / "partial")
    assert main(["inspect", str(partial), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [s["activation"] for s in info["sites"] if s["kind"] == "ffn"] == ["helu", "GELUActivation"]
    assert info["recorded_overrides"] == {"bert.encoder.layer.0.intermediate.intermediate_act_fn": "helu"}
