"""``hf-helu patch|export|inspect`` through ``hf_helu.cli.main`` and once through the installed script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from hf_helu import HeLU
from hf_helu.cli import main

transformers.logging.set_verbosity_error()

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def bert_folder(tmp_path):
    """A tiny BERT checkpoint with a tokenizer file and a sentence-transformers style subfolder."""
    torch.manual_seed(0)
    folder = tmp_path / "src"
    transformers.BertForMaskedLM(transformers.BertConfig(**TINY)).save_pretrained(folder)
    (folder / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    return folder


def leftovers(parent, name):
    """Temp or backup folders ``atomic_directory`` may leave beside ``name``."""
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def helu_modules(model):
    return {name: module.alpha for name, module in model.named_modules() if isinstance(module, HeLU)}


def test_patch_then_export_then_inspect(bert_folder, tmp_path, capsys):
    patched, exported = tmp_path / "patched", tmp_path / "exported"
    assert main(["patch", str(bert_folder), str(patched), "--alpha", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "3 module(s) changed" in out and "config.hidden_act: 'gelu' -> 'helu_0.1'" in out
    assert json.loads((patched / "config.json").read_text())["hidden_act"] == "helu_0.1"
    assert (patched / "vocab.txt").read_text() == "[PAD]\n[UNK]\n"
    assert (patched / "1_Pooling" / "config.json").is_file()
    model = transformers.BertForMaskedLM.from_pretrained(patched)
    assert len(helu_modules(model)) == 3 and set(helu_modules(model).values()) == {0.1}

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

    assert main(["export", str(patched), str(exported)]) == 0
    assert json.loads((exported / "config.json").read_text())["hidden_act"] == "relu"
    assert (exported / "vocab.txt").is_file()
    reloaded = transformers.BertForMaskedLM.from_pretrained(exported)
    assert not helu_modules(reloaded)
    ids = torch.randint(3, 99, (1, 6), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert not leftovers(tmp_path, "patched") and not leftovers(tmp_path, "exported")


def test_missing_folder_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["patch", str(missing), str(tmp_path / "dst")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["inspect", str(missing)]) == 2
    assert not (tmp_path / "dst").exists()


def test_folder_that_is_not_a_model_is_a_clear_error(tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    assert main(["export", str(folder), str(tmp_path / "dst")]) == 2
    assert "not a transformers model folder (no config.json" in capsys.readouterr().err
    (folder / "config.json").write_text("{}")
    assert main(["inspect", str(folder)]) == 2
    assert "config.json transformers cannot read" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists() and not leftovers(tmp_path, "dst")


def test_unsupported_architecture_leaves_no_partial_destination(tmp_path, capsys):
    src = tmp_path / "resnet"
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], num_channels=3)
    transformers.ResNetModel(config).save_pretrained(src)
    assert main(["patch", str(src), str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err
    assert "ResNetModel" in err and "Supported families: bert" in err
    assert not (tmp_path / "dst").exists() and not leftovers(tmp_path, "dst")


def test_hub_id_offline_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", "hf-helu-tests/does-not-exist-anywhere"]) == 2
    assert "Hugging Face Hub" in capsys.readouterr().err


def test_existing_destination_needs_overwrite(bert_folder, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main(["patch", str(bert_folder), str(dst)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    assert main(["patch", str(bert_folder), str(dst), "--overwrite", "--scope", "all"]) == 0
    assert not (dst / "keep.txt").exists() and (dst / "config.json").is_file()
    assert not leftovers(tmp_path, "dst")


def test_export_of_a_partial_patch_is_refused(bert_folder, tmp_path, capsys):
    from hf_helu import patch_model

    partial = tmp_path / "partial"
    model = transformers.BertForMaskedLM.from_pretrained(bert_folder)
    patch_model(model, scope=[0])
    model.save_pretrained(partial)
    assert main(["export", str(partial), str(tmp_path / "dst")]) == 2
    assert "cannot export BertForMaskedLM" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists() and not leftovers(tmp_path, "dst")
    # inspect rebuilds the recorded partial patch from config.hf_helu
    assert main(["inspect", str(partial), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [s["activation"] for s in info["sites"] if s["kind"] == "ffn"] == ["helu", "GELUActivation"]
    assert info["recorded_overrides"] == {"bert.encoder.layer.0.intermediate.intermediate_act_fn": "helu"}


@pytest.mark.parametrize("argv", [["patch", "a", "b", "--alpha", "-1"], ["patch", "a", "b", "--scope", "x"], []])
def test_bad_arguments_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage: hf-helu" in capsys.readouterr().err


def test_installed_script_runs(bert_folder):
    script = shutil.which("hf-helu") or shutil.which("hf-helu", path=str(Path(sys.executable).parent))
    assert script, "the hf-helu console script is not installed (pip install -e .)"
    result = subprocess.run(
        [script, "inspect", str(bert_folder), "--json"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["num_ffn"] == 2
