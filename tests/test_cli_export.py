"""``hf-helu export``: a patched checkpoint back to stock ReLU, identical outputs; a partial patch refused; ``--onnx``
(``--quantize int8``) writes an ONNX folder matching PyTorch; bad ONNX requests refused before any work."""

from __future__ import annotations

import json

import numpy as np
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


def test_export_onnx_int8_writes_a_servable_folder_matching_pytorch(tmp_path, capsys):
    import onnxruntime

    patched, dst = tmp_path / "patched", tmp_path / "onnx"
    assert main(["patch", str(save_bert_checkpoint(tmp_path / "src")), str(patched)]) == 0
    assert main(["export", str(patched), str(dst), "--onnx", "--quantize", "int8"]) == 0
    assert "max abs difference to PyTorch" in capsys.readouterr().out
    for name in ("model.onnx", "model_quantized.onnx", "config.json", "onnx_export.json", "vocab.txt"):
        assert (dst / name).is_file(), name
    assert (dst / "1_Pooling" / "config.json").is_file()  # sentence-transformers extras travel too
    assert not list(dst.glob("*.safetensors")) and not leftovers(tmp_path, "onnx")
    model = transformers.BertForMaskedLM.from_pretrained(patched).eval()
    ids = torch.randint(3, 99, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": np.zeros_like(ids.numpy())}
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits.numpy()
    for name, tolerance in (("model.onnx", 1e-5), ("model_quantized.onnx", 0.1 * np.abs(want).max())):
        session = onnxruntime.InferenceSession(str(dst / name), providers=["CPUExecutionProvider"])
        assert np.abs(session.run(["logits"], feed)[0] - want).max() < tolerance, name


def test_quantize_without_onnx_is_refused_before_loading(tmp_path, capsys):
    src = save_bert_checkpoint(tmp_path / "src")
    assert main(["export", str(src), str(tmp_path / "dst"), "--quantize", "int8"]) == 2
    assert "--quantize int8 needs --onnx" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists()


def test_onnx_export_of_an_unsupported_architecture_is_refused(tmp_path, capsys):
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=99, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "gpt2")
    assert main(["export", str(tmp_path / "gpt2"), str(tmp_path / "dst"), "--onnx"]) == 2
    err = capsys.readouterr().err
    assert "cannot export model_type 'gpt2' to ONNX" in err and "bert" in err
    assert not (tmp_path / "dst").exists() and not leftovers(tmp_path, "dst")


def test_onnx_export_keeps_the_traceback_of_a_bug(tmp_path, capsys, monkeypatch):
    """Only a UsageError is the user's error: a ValueError raised inside the export is a bug and propagates."""
    import hf_helu.onnx_export as onnx_export

    patched = tmp_path / "patched"
    assert main(["patch", str(save_bert_checkpoint(tmp_path / "src")), str(patched)]) == 0

    def broken_trace(*args, **kwargs):
        raise ValueError("internal tracing failure")

    monkeypatch.setattr(onnx_export, "_trace_to_onnx", broken_trace)
    with pytest.raises(ValueError, match="internal tracing failure") as raised:
        main(["export", str(patched), str(tmp_path / "dst"), "--onnx"])
    assert type(raised.value) is ValueError
    assert "error:" not in capsys.readouterr().err
    assert not (tmp_path / "dst").exists() and not leftovers(tmp_path, "dst")
