"""``hf-helu patch``: the saved checkpoint, its extras, refused destinations and architectures."""

from __future__ import annotations

import json

import pytest
import transformers
from cli_helpers import helu_modules, leftovers, save_bert_checkpoint

from hf_helu.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_patch_saves_helu_and_the_extras(tmp_path, capsys):
    bert_folder = save_bert_checkpoint(tmp_path / "src")
    patched = tmp_path / "patched"
    assert main(["patch", str(bert_folder), str(patched), "--alpha", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "3 module(s) changed" in out and "config.hidden_act: 'gelu' -> 'helu_0.1'" in out
    assert json.loads((patched / "config.json").read_text())["hidden_act"] == "helu_0.1"
    assert (patched / "vocab.txt").read_text() == "[PAD]\n[UNK]\n"
    assert (patched / "1_Pooling" / "config.json").is_file()
    model = transformers.BertForMaskedLM.from_pretrained(patched)
    assert len(helu_modules(model)) == 3 and set(helu_modules(model).values()) == {0.1}
    assert not leftovers(tmp_path, "patched")


def test_unsupported_architecture_leaves_no_partial_destination(tmp_path, capsys):
    src = tmp_path / "resnet"
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], num_channels=3)
    transformers.ResNetModel(config).save_pretrained(src)
    assert main(["patch", str(src), str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err
    assert "ResNetModel" in err and "Supported families: bert" in err
    assert not (tmp_path / "dst").exists() and not leftovers(tmp_path, "dst")


def test_existing_destination_needs_overwrite(tmp_path, capsys):
    bert_folder = save_bert_checkpoint(tmp_path / "src")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main(["patch", str(bert_folder), str(dst)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    assert main(["patch", str(bert_folder), str(dst), "--overwrite", "--scope", "all"]) == 0
    assert not (dst / "keep.txt").exists() and (dst / "config.json").is_file()
    assert not leftovers(tmp_path, "dst")


def test_destination_inside_the_source_or_holding_it_is_refused(tmp_path, capsys):
    src = save_bert_checkpoint(tmp_path / "src")
    before = sorted(p.name for p in src.iterdir())
    assert main(["patch", str(src), str(src / "sub")]) == 2
    assert f"DST {str(src / 'sub')!r} is inside SRC" in capsys.readouterr().err
    assert sorted(p.name for p in src.iterdir()) == before  # no sub/, no temp folder copied into anything
    assert main(["patch", str(src), str(tmp_path), "--overwrite"]) == 2
    assert "writing DST would replace SRC" in capsys.readouterr().err
    assert sorted(p.name for p in src.iterdir()) == before


def test_an_architecture_that_is_no_model_class_is_refused(tmp_path, capsys, monkeypatch):
    src = save_bert_checkpoint(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    calls = []
    monkeypatch.setattr(transformers, "pipeline", lambda *args, **kwargs: calls.append(args))
    for name in ("pipeline", "AutoTokenizer"):
        (src / "config.json").write_text(json.dumps({**config, "architectures": [name]}))
        for argv in (["patch", str(src), str(tmp_path / "dst")], ["inspect", str(src)]):
            assert main(argv) == 2
            assert f"config.architectures names {name!r}, which is not a transformers model class" in (
                capsys.readouterr().err
            )
    assert calls == [] and not (tmp_path / "dst").exists()
