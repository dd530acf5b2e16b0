"""hf_helu.ActivationSparsityPenalty and hf_helu.diagnostics.decode_sparsity on tiny LLaMAs (ReLU, HeLU) and a
plain module: the term equals an independent computation (padding excluded, gradient included), the schedule is
a quarter-sine ramp, weight 0 leaves training bit-identical, a strong penalty raises the FFN zeros, bad weights
are refused, and decode sparsity counts exactly the batch-1 decode steps."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import hf_helu
from hf_helu.diagnostics import decode_sparsity

VOCAB = 40


def tiny_llama(activation: str, seed: int = 0) -> LlamaForCausalLM:
    """A 2-layer, 32-wide LLaMA with a gated FFN whose gate activation is ``activation`` (relu, helu, silu)."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        hidden_act=activation,
        pad_token_id=0,
    )
    return LlamaForCausalLM(config)


def batch(seed: int = 1, rows: int = 4, length: int = 12) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, length), generator=generator)
    return {"input_ids": ids, "labels": ids}


def reference_term(model: LlamaForCausalLM, inputs: dict, mask: torch.Tensor | None) -> torch.Tensor:
    """relu(gate_proj(x)) captured at each layer's gate projection (not at the activation module), its sum over the
    unpadded positions / (positions x units), averaged over the layers: written apart from the helper."""
    gates = []
    hooks = [
        layer.mlp.gate_proj.register_forward_hook(lambda m, a, out: gates.append(out)) for layer in model.model.layers
    ]
    try:
        model(**inputs, **({"attention_mask": mask} if mask is not None else {}))
    finally:
        for hook in hooks:
            hook.remove()
    keep = torch.ones(gates[0].shape[:-1]) if mask is None else mask.float()
    per_layer = [(torch.relu(g) * keep[..., None]).sum() / (keep.sum() * g.shape[-1]) for g in gates]
    return sum(per_layer) / len(per_layer)


@pytest.mark.parametrize("activation", ["relu", "helu"])
def test_term_and_gradient_equal_an_independent_computation_with_padding(activation):
    """With an attention mask that pads the ends of two rows, the weighted term equals the reference (padded
    positions left out) and its gradient on every gate projection equals the reference's: with HeLU too, since
    max(y, 0) passes no gradient where y == 0 (the band gets no push past -alpha)."""
    model = tiny_llama(activation)
    inputs = batch()
    mask = torch.ones_like(inputs["input_ids"])
    mask[0, 8:] = 0
    mask[2, 5:] = 0
    penalty = hf_helu.ActivationSparsityPenalty(model, 0.7)
    model(**inputs, attention_mask=mask)
    term = penalty.loss()
    grads = torch.autograd.grad(term, [layer.mlp.gate_proj.weight for layer in model.model.layers])
    penalty.remove()
    expected = 0.7 * reference_term(model, inputs, mask)
    expected_grads = torch.autograd.grad(expected, [layer.mlp.gate_proj.weight for layer in model.model.layers])
    torch.testing.assert_close(term, expected, rtol=1e-5, atol=0)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)
        assert want.abs().max() > 0
    unmasked = 0.7 * reference_term(model, inputs, None)
    # the padding does change the term, by far more than the tolerance above
    assert abs(unmasked.item() - expected.item()) > 1e-3 * expected.item()
    # the mask given positionally (LlamaForCausalLM.forward(input_ids, attention_mask, ...)) is read as well
    with hf_helu.ActivationSparsityPenalty(model, 0.7) as positional:
        model(inputs["input_ids"], mask, labels=inputs["labels"])
        torch.testing.assert_close(positional.loss(), expected, rtol=1e-5, atol=0)


def test_schedule_is_a_quarter_sine_ramp_and_terms_are_per_forward():
    """Step t (0-based) gets weight * sin(pi/2 * min(1, (t+1)/W)); loss() returns the forwards since the last call,
    and forwards without gradients (evaluation) record nothing."""
    model = tiny_llama("relu")
    penalty = hf_helu.ActivationSparsityPenalty(model, 2.0, warmup_steps=4)
    weights = []
    for _ in range(6):
        weights.append(penalty.current_weight)
        penalty.step()
    # cos of the remaining quarter turn: the same curve, written differently
    expected = [2.0 * math.cos(math.pi / 2 * (1 - min(1, (t + 1) / 4))) for t in range(6)]
    assert weights == pytest.approx(expected, rel=1e-12)
    assert weights[0] < weights[1] < weights[2] < weights[3] == weights[5] == 2.0
    assert penalty.state_dict() == {"completed_steps": 6}
    with torch.no_grad():
        model(**batch())
    assert penalty.loss().item() == 0.0
    model(**batch(1))
    model(**batch(2))
    two = penalty.loss()
    assert penalty.loss().item() == 0.0  # consumed
    penalty.remove()
    expected = 2.0 * (reference_term(model, batch(1), None) + reference_term(model, batch(2), None)) / 2
    torch.testing.assert_close(two, expected, rtol=1e-5, atol=0)


def train(model: nn.Module, steps: int, weight: float | None, lr: float = 1e-2) -> dict[str, torch.Tensor]:
    """``steps`` AdamW steps on fixed batches, the LM loss plus the penalty's term (``weight`` None: no penalty)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    penalty = None if weight is None else hf_helu.ActivationSparsityPenalty(model, weight)
    model.train()
    for step in range(steps):
        loss = model(**batch(step)).loss
        if penalty is not None:
            loss = loss + penalty.loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if penalty is not None:
            penalty.step()
    if penalty is not None:
        penalty.remove()
    return model.state_dict()


def test_zero_weight_registers_nothing_and_training_is_bit_identical():
    """Weight 0: no hook on any module, loss() is a constant 0, and 3 training steps end with exactly the weights
    of the same steps without the helper."""
    model = tiny_llama("helu")
    penalty = hf_helu.ActivationSparsityPenalty(model, 0.0)
    assert not penalty.enabled and penalty.names == []
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert penalty.loss().item() == 0.0 and not penalty.loss().requires_grad
    penalty.remove()
    with_zero = train(tiny_llama("helu"), 3, 0.0)
    without = train(tiny_llama("helu"), 3, None)
    assert with_zero.keys() == without.keys()
    assert all(torch.equal(with_zero[k], without[k]) for k in without)
    tiny = train(tiny_llama("helu"), 3, 1e-3)
    assert not all(torch.equal(tiny[k], without[k]) for k in without)  # any non-zero weight does change training


def ffn_zeros(model: nn.Module) -> float:
    model.eval()
    with hf_helu.ActivationMonitor(model) as monitor, torch.no_grad():
        for seed in (100, 101):
            model(**batch(seed))
    return monitor.stats().zero_fraction


@pytest.mark.parametrize("activation", ["relu", "helu"])
def test_strong_penalty_raises_ffn_zeros_by_ten_points(activation):
    """8 steps with weight 1 leave at least 10 points more FFN zeros (held-out batches) than the same 8 steps with
    weight 0; the forward stays the plain activation (the hooks are gone after training)."""
    plain, penalised = tiny_llama(activation), tiny_llama(activation)
    train(plain, 8, 0.0)
    train(penalised, 8, 1.0)
    assert all(not m._forward_hooks for m in penalised.modules())
    base, sparse = ffn_zeros(plain), ffn_zeros(penalised)
    assert sparse - base >= 0.10, (base, sparse)


def test_plain_module_with_explicit_sites():
    """A model the site discovery does not know (an nn.Sequential) takes sites={name: module}; without them the
    helper refuses with a UsageError naming the way out."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    x = torch.randn(5, 6)
    with hf_helu.ActivationSparsityPenalty(model, 0.5, sites={"act": model[1]}) as penalty:
        out = model(x)
        term = penalty.loss()
    assert torch.equal(out, model(x))  # the forward is unchanged
    torch.testing.assert_close(term, 0.5 * torch.relu(model[0](x)).mean(), rtol=1e-6, atol=0)
    with pytest.raises(hf_helu.UsageError, match="pass sites="):
        hf_helu.ActivationSparsityPenalty(nn.Sequential(nn.Linear(2, 2)), 0.5)


@pytest.mark.parametrize("weight", [-0.1, float("nan"), float("inf"), True, "1"])
def test_bad_weights_are_refused(weight):
    with pytest.raises(hf_helu.UsageError, match="weight must be a finite number >= 0"):
        hf_helu.ActivationSparsityPenalty(tiny_llama("relu"), weight)


def test_bad_warmup_is_refused():
    with pytest.raises(hf_helu.UsageError, match="warmup_steps must be an int >= 0, got -1"):
        hf_helu.ActivationSparsityPenalty(tiny_llama("relu"), 0.1, warmup_steps=-1)


def test_decode_sparsity_counts_the_decode_steps():
    """Over batch-1 greedy decoding of 6 tokens after two 5-token prompts, decode_sparsity counts 5 one-row calls per
    prompt and layer (not the prompt's forward) and their zero fraction equals relu(gate_proj) at those positions of
    one uncached forward over prompt + generated tokens (float rounding may flip a sign at ~0: 1% tolerance)."""
    model = tiny_llama("relu").eval()
    prompts = torch.randint(1, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    result = decode_sparsity(model, prompts, new_tokens=6)
    assert result["rows"] == [10, 10] and result["prompts"] == 2 and result["new_tokens"] == 6
    zeros, elements = [0, 0], [0, 0]
    for prompt in prompts:
        ids = model.generate(prompt[None], do_sample=False, max_new_tokens=6, min_new_tokens=6, pad_token_id=0)
        gates = []
        hooks = [
            layer.mlp.gate_proj.register_forward_hook(lambda m, a, o, kept=gates: kept.append(o))
            for layer in model.model.layers
        ]
        with torch.no_grad():
            model(ids)
        for hook in hooks:
            hook.remove()
        for i, gate in enumerate(gates):
            decoded = gate[0, 5:10]  # the inputs of the 5 decode steps: positions P .. P + new_tokens - 2
            zeros[i] += int((decoded <= 0).sum())
            elements[i] += decoded.numel()
    expected = [z / e for z, e in zip(zeros, elements, strict=True)]
    assert result["layers"] == pytest.approx(expected, abs=0.01)
    assert result["zero_fraction"] == pytest.approx(sum(zeros) / sum(elements), abs=0.01)
    assert not model.training
