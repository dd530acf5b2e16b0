"""``hf_helu.onnx_export``: ONNX reproduces PyTorch, int8 runs in a process without torch, bad requests fail."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
import transformers
from helpers import tiny_bert

from hf_helu import HeLU, patch_model
from hf_helu.onnx_export import INT8_FILE, MANIFEST_FILE, ONNX_FILE, export_onnx

pytestmark = pytest.mark.usefixtures("one_thread")
transformers.logging.set_verbosity_error()


def padded_batch(batch: int, seq: int, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Random ids, a ragged attention mask (row i keeps seq - 2i tokens) and two segments."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, vocab, (batch, seq), dtype=np.int64)
    mask = (np.arange(seq)[None, :] < (seq - 2 * np.arange(batch))[:, None]).astype(np.int64)
    segments = (np.arange(seq)[None, :] >= seq // 3).astype(np.int64).repeat(batch, axis=0)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": segments}


def torch_logits(model, batch: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model(**{k: torch.from_numpy(v) for k, v in batch.items()}).logits.numpy()


def op_types(path) -> set[str]:
    return {node.op_type for node in onnx.load(str(path)).graph.node}


def helu_classifier():
    model = tiny_bert(0, transformers.BertForSequenceClassification, intermediate_size=37, vocab_size=99)
    with torch.no_grad():  # a head of std 1, not 0.02: logits of order 1, so relative errors mean something
        model.classifier.weight.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    patch_model(model, alpha=0.1)
    return model


def test_fp32_onnx_of_a_helu_model_matches_pytorch_at_other_shapes(tmp_path):
    model = helu_classifier()
    report = export_onnx(model, tmp_path / "onnx")
    assert any(isinstance(m, HeLU) for m in model.modules()), "the caller's model must keep its HeLU modules"
    graph_ops = op_types(tmp_path / "onnx" / ONNX_FILE)
    assert "Relu" in graph_ops and "Erf" not in graph_ops  # HeLU is ReLU in the graph; no GELU left
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / ONNX_FILE), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    for batch_size, seq in ((1, 5), (4, 29)):  # neither is the traced (2, 16): the axes are dynamic
        batch = padded_batch(batch_size, seq, 99, seed=seq)
        (logits,) = session.run(["logits"], batch)
        assert np.abs(logits - torch_logits(model, batch)).max() < 1e-5
    manifest = json.loads((tmp_path / "onnx" / MANIFEST_FILE).read_text())
    assert manifest["outputs"] == ["logits"] and manifest["activation"] == "relu"
    assert report.fp32_max_abs_diff < 1e-5 and report.int8_max_abs_diff is None
    assert json.loads((tmp_path / "onnx" / "config.json").read_text())["hidden_act"] == "relu"


def test_encoder_without_segments_exports_its_hidden_states(tmp_path):
    config = transformers.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=2, hidden_dim=37)
    torch.manual_seed(0)
    model = transformers.DistilBertModel(config).eval()
    report = export_onnx(model, tmp_path / "onnx")
    assert report.inputs == ("input_ids", "attention_mask") and report.outputs == ("last_hidden_state",)
    batch = padded_batch(3, 11, 99, seed=0)
    batch.pop("token_type_ids")
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / ONNX_FILE), providers=["CPUExecutionProvider"])
    (hidden,) = session.run(None, batch)
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in batch.items()}).last_hidden_state.numpy()
    assert hidden.shape == (3, 11, 32) and np.abs(hidden - want).max() < 1e-5


# Runs ONNX Runtime with torch, transformers and hf_helu unimportable, then checks none of them got loaded.
_NO_TORCH_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "transformers", "hf_helu"}:
                raise ImportError(f"{name} is blocked in this process")
    sys.meta_path.insert(0, Block())
    import numpy as np, onnxruntime
    folder, inputs, out = sys.argv[1:4]
    config = json.load(open(f"{folder}/config.json"))
    session = onnxruntime.InferenceSession(f"{folder}/model_quantized.onnx", providers=["CPUExecutionProvider"])
    batch = dict(np.load(inputs))
    np.save(out, session.run(["logits"], batch)[0])
    assert not {"torch", "transformers", "hf_helu"} & set(sys.modules), sorted(sys.modules)
    print(config["hidden_act"])
    """
)


def test_int8_export_runs_in_a_process_without_torch_or_hf_helu(tmp_path):
    model = helu_classifier()
    report = export_onnx(model, tmp_path / "onnx", quantize="int8")
    assert report.files == (ONNX_FILE, INT8_FILE)
    assert "MatMulInteger" in op_types(tmp_path / "onnx" / INT8_FILE)  # the weights really are int8
    batch = padded_batch(4, 23, 99, seed=3)
    np.savez(tmp_path / "batch.npz", **batch)
    script = tmp_path / "serve.py"
    script.write_text(_NO_TORCH_SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "onnx"), str(tmp_path / "batch.npz"), str(tmp_path / "out.npy")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "relu"
    int8, fp32 = np.load(tmp_path / "out.npy"), torch_logits(model, batch)
    error = np.abs(int8 - fp32).max()
    assert 0 < error < 0.05 * np.abs(fp32).max()  # lossy (so really quantized) but close


def test_bad_requests_fail_before_writing(tmp_path):
    model = helu_classifier()
    with pytest.raises(ValueError, match=r"quantize='int4' is not supported"):
        export_onnx(model, tmp_path / "a", quantize="int4")
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=99, n_positions=64)
    with pytest.raises(ValueError, match=r"cannot export model_type 'gpt2' to ONNX"):
        export_onnx(transformers.GPT2LMHeadModel(config).eval(), tmp_path / "b")
    partial = tiny_bert(0, transformers.BertForSequenceClassification)
    patch_model(partial, scope=[0])
    with pytest.raises(ValueError, match=r"cannot export BertForSequenceClassification"):
        export_onnx(partial, tmp_path / "c")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_onnx(model, tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # nothing written, no temp folders left
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["keep.txt"]
