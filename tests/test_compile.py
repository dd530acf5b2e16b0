"""HeLU under torch.compile in default mode, torch.export, and FakeTensor tracing: no graph break, eager's values."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from helpers import tiny_bert_config
from ops_helpers import ALPHA, bits_of

import hf_helu
from hf_helu import helu


def _bert(act: str):
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    config = tiny_bert_config(hidden_act=act, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).train()


def _batch():
    gen = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, 100, (3, 12), generator=gen), "labels": torch.tensor([0, 1, 1])}


def test_explain_counts_as_many_graphs_for_helu_as_for_relu():
    """A training step of a helu BERT traces into as many graphs as the same model with relu: HeLU adds no break."""
    counts = {}
    for act in ("relu", "helu"):
        model, batch = _bert(act), _batch()
        torch._dynamo.reset()
        explained = torch._dynamo.explain(lambda model=model, batch=batch: model(**batch).loss)()
        counts[act] = (explained.graph_count, explained.graph_break_count)
    assert counts["helu"] == counts["relu"], counts
    assert counts["helu"][1] == 0, counts


def test_default_mode_compile_gives_eager_values_and_helu_gradients():
    """The activation alone, compiled by Inductor in default mode: forward and gradient bit for bit as eager, and
    the gradient is HeLU's (it passes in the band), not ReLU's."""
    x = torch.linspace(-0.2, 0.2, 64).reshape(8, 8) + 0.001
    grad = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: helu(t, ALPHA))
    results = []
    for fn in (compiled, lambda t: helu(t, ALPHA)):
        leaf = x.clone().requires_grad_(True)
        y = fn(leaf)
        y.backward(grad)
        results.append((y.detach(), leaf.grad))
    (y_c, g_c), (y_e, g_e) = results
    assert torch.equal(bits_of(y_c), bits_of(y_e)) and torch.equal(bits_of(g_c), bits_of(g_e))
    assert torch.equal(g_c, torch.where(x > -ALPHA, grad, torch.zeros(())))


def test_default_mode_compile_of_a_bert_training_step_matches_eager():
    """``torch.compile(model)`` (default mode, as Trainer's ``torch_compile=True``) gives eager's gradients, up to
    the float32 reassociation Inductor may do in the matmuls (about 1e-6 relative), and they differ from relu's."""
    grads = {}
    for act, compiled in (("helu", False), ("helu", True), ("relu", True)):
        model, batch = _bert(act), _batch()
        torch._dynamo.reset()
        step = torch.compile(model) if compiled else model
        step(**batch).loss.backward()
        grads[act, compiled] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    torch.testing.assert_close(grads["helu", True], grads["helu", False], rtol=1e-4, atol=1e-6)
    assert (grads["helu", True] - grads["relu", True]).abs().max() > 1e-4


FAKE_TENSOR_SCRIPT = """
import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from hf_helu import helu
with FakeTensorMode():
    x = torch.randn(4, 8, requires_grad=True)
    y = helu(x, 0.05)
    y.sum().backward()
assert isinstance(y, FakeTensor) and y.shape == (4, 8), y
assert isinstance(x.grad, FakeTensor) and x.grad.shape == (4, 8), x.grad
print("ok")
"""


@pytest.mark.parametrize("backend", ["auto", "c"])
def test_fake_tensors_take_the_torch_path(backend):
    """Under FakeTensorMode (torch.export, compile tracing, meta-device tools) the fused kernels, which read raw
    memory, never run, even when HF_HELU_BACKEND forces one: the torch path gives fake outputs and gradients.
    In a subprocess, because a kernel handed a fake pointer crashes the interpreter."""
    env = {**os.environ, "HF_HELU_BACKEND": backend}
    done = subprocess.run([sys.executable, "-c", FAKE_TENSOR_SCRIPT], env=env, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])


def test_torch_export_of_a_training_mode_helu_model_matches_eager():
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.Linear(8, 16)
            self.act = hf_helu.HeLU()
            self.down = torch.nn.Linear(16, 8)

        def forward(self, x):
            return self.down(self.act(self.up(x)))

    torch.manual_seed(0)
    block = Block().train()
    x = torch.randn(5, 8)
    exported = torch.export.export(block, (x,))
    assert torch.equal(exported.module()(x), block(x))
