"""``hf-helu export``: a patched checkpoint back to stock ReLU, identical outputs; a partial patch refused."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from cli_helpers import helu_modules, leftovers, save_bert_checkpoint, save_partial_patch

from hf_helu.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_export_of_a_patched_checkpoint_loads_in_stock_transformers(tmp_path, capsys):
    bert_folder = save_bert_checkpoint(tmp_path / "src")
    patched, exported = tmp_path / "patched", tmp_path / "exported"
    assert main(["patch", str(bert_folder), str(patched), "--alpha", "0.1"]) == 0
    model = transformers.BertForMaskedLM.from_pretrained(patched)
    assert main(["export", str(patched), str(exported)]) == 0
    assert json.loads((exported / "config.json").read_text())["hidden_act"] == "relu"
    assert (exported / "vocab.txt").is_file()
    reloaded = transformers.BertForMaskedLM.from_pretrained(exported)
    assert not helu_modules(reloaded)
    ids = torch.randint(3, 99, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert not leftovers(tmp_path, "patched") and not leftovers(tmp_path, "exported")


def test_export_of_a_partial_patch_is_refused(tmp_path, capsys):
    partial = save_partial_patch(save_bert_checkpoint(tmp_path / "src"), tmp_path / "partial")
    assert main(["export", str(partial), str(tmp_path / "dst")]) == 2
    assert "cannot export BertForMaskedLM" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists() and not leftovers(tmp_path, "dst")
