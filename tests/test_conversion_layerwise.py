"""Sequential calibration (hf_helu.conversion.layerwise): one pass per block on cached hidden states.

The reference is the per-layer re-run of the whole model (``strategy="rerun"``), which needs no cache. Both compute
the same block functions on the same inputs with the same arguments, so the fits agree up to float rounding: the
block-alone call sees exactly the tensors the model passes it (the chain check asserts identity), hence the
tolerance below only covers a different float32 summation order inside a kernel, amplified by the float64 ridge
solve (its condition number is bounded by the ridge), far below 1e-5 for weights of size ~0.2.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conversion_helpers import random_batches, tiny_bert, tiny_gpt2, tiny_llama
from torch import nn
from transformers import Qwen2Config, Qwen2Model

from hf_helu import conversion
from hf_helu.conversion import calibrate as calibrate_module
from hf_helu.conversion import layerwise
from hf_helu.patching import patch_model


def tiny_qwen2() -> Qwen2Model:
    """3 layers, the last two with sliding-window attention: blocks get different masks."""
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        initializer_range=0.2,
        use_sliding_window=True,
        sliding_window=4,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"],
    )
    return Qwen2Model(config).eval()


BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2, "bert": lambda: tiny_bert(3)}


def calibrated(model: nn.Module, strategy: str, target: str = "layer"):
    model = copy.deepcopy(model)
    originals = conversion.original_activations(model)
    patch_model(model)
    report = conversion.calibrate_ffn(model, random_batches(), originals, strategy=strategy, target=target)
    return model, report


def block_calls(model: nn.Module) -> tuple[list[int], list]:
    """Counts of forward calls per block of the model's layer stack (hooks left in place; remove them)."""
    stack = layerwise.block_stack(model, conversion.ffn_sites(model)).blocks
    counts = [0] * len(stack)
    handles = [
        block.register_forward_pre_hook(lambda m, a, i=i: counts.__setitem__(i, counts[i] + 1))
        for i, block in enumerate(stack)
    ]
    return counts, handles


@pytest.mark.parametrize("family", BUILDERS)
def test_sequential_calibration_equals_rerunning_the_model(family):
    model = BUILDERS[family]()
    sequential, report = calibrated(model, "sequential")
    rerun, reference = calibrated(model, "rerun")
    assert (report.strategy, reference.strategy) == ("sequential", "rerun")
    want = rerun.state_dict()
    for name, value in sequential.state_dict().items():
        torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-5, msg=name)
    assert [layer.tokens for layer in report.layers] == [layer.tokens for layer in reference.layers]
    for got, expected in zip(report.layers, reference.layers, strict=True):
        assert got.error_after == pytest.approx(expected.error_after, rel=1e-5, abs=1e-7)
    changed = [
        name for name, value in sequential.state_dict().items() if not torch.equal(value, model.state_dict()[name])
    ]
    assert changed and all("proj" in name or "dense" in name for name in changed)  # the fit did something


def test_sequential_runs_each_block_a_bounded_number_of_times():
    """Linear in depth: every block runs at most 3 times per batch (capture, fit, advance); re-running runs block 0
    once per layer it precedes."""
    model = tiny_qwen2()
    batches = random_batches()
    for strategy, bound in (("sequential", 3), ("rerun", None)):
        patched = copy.deepcopy(model)
        originals = conversion.original_activations(patched)
        patch_model(patched)
        counts, handles = block_calls(patched)
        try:
            conversion.calibrate_ffn(patched, batches, originals, strategy=strategy)
        finally:
            for handle in handles:
                handle.remove()
        if bound is not None:
            assert max(counts) <= bound * len(batches), counts
        else:
            assert counts[0] >= len(counts) * len(batches), counts


def test_models_whose_blocks_are_not_a_chain_fall_back_to_rerunning():
    """ALBERT runs one shared layer several times per forward: auto falls back, explicit sequential refuses."""
    from transformers import AlbertConfig, AlbertModel

    torch.manual_seed(0)
    config = AlbertConfig(
        vocab_size=100, embedding_size=16, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
        intermediate_size=64, hidden_act="gelu", initializer_range=0.2,
    )  # fmt: skip
    model = AlbertModel(config).eval()
    originals = conversion.original_activations(model)
    patch_model(model)
    assert conversion.calibrate_ffn(model, random_batches(count=1), originals).strategy == "rerun"
    with pytest.raises(ValueError, match=r"not possible for this model.*more than once"):
        conversion.calibrate_ffn(model, random_batches(count=1), originals, strategy="sequential")
    with pytest.raises(ValueError, match="strategy"):
        conversion.calibrate_ffn(model, random_batches(count=1), originals, strategy="fast")
    with pytest.raises(ValueError, match="target"):
        conversion.calibrate_ffn(model, random_batches(count=1), originals, target="global")


def recorded(model: nn.Module, batch: dict, names: dict[str, str]) -> dict[str, tuple]:
    """``{key: (first input, output)}`` of the named modules in one forward of ``batch``."""
    store: dict[str, tuple] = {}
    handles = [
        model.get_submodule(name).register_forward_hook(lambda m, a, o, key=key: store.__setitem__(key, (a[0], o)))
        for key, name in names.items()
    ]
    try:
        with torch.no_grad():
            model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    return store


def test_target_model_fits_the_original_models_block_outputs(monkeypatch):
    """Target "model": the last layer's down projection is the ridge fit of relu(gate) * up to the MLP output that
    makes the block's output the original model's, collected here with plain hooks on two stock models. Exact with
    the projection inputs kept in float32; kept in bfloat16 (the default, half the memory) the fit moves by far less
    than calibration's own error."""
    model = tiny_llama()
    default, _ = calibrated(model, "sequential", target="model")
    monkeypatch.setattr(calibrate_module, "KEPT_DTYPE", torch.float32)
    converted, report = calibrated(model, "sequential", target="model")
    assert report.target == "model"
    inputs = copy.deepcopy(model)  # the converted model up to layer 1, original down projection in layer 1
    inputs.layers[0] = converted.layers[0]
    features, targets = [], []
    for batch in random_batches():
        mask = batch["attention_mask"].bool()
        got = recorded(inputs, batch, {"mlp": "layers.1.mlp", "block": "layers.1"})
        want = recorded(model, batch, {"block": "layers.1"})
        x, y = got["mlp"]
        mlp = inputs.layers[1].mlp
        with torch.no_grad():
            features.append((torch.relu(mlp.gate_proj(x)) * mlp.up_proj(x))[mask].double())
        targets.append((y + want["block"][1] - got["block"][1])[mask].double())
    x, t = torch.cat(features), torch.cat(targets)
    w0 = model.layers[1].mlp.down_proj.weight.detach().double().T
    scale = (1e-3 * x.shape[0]) ** 0.5  # ridge 1e-3 x tokens towards the original weight, as augmented rows
    system = torch.cat([x, scale * torch.eye(x.shape[1], dtype=torch.float64)])
    expected = torch.linalg.lstsq(system, torch.cat([t, scale * w0])).solution.T
    torch.testing.assert_close(converted.layers[1].mlp.down_proj.weight.double(), expected, rtol=1e-4, atol=1e-5)
    moved = (default.layers[1].mlp.down_proj.weight.double() - expected).norm() / expected.norm()
    assert 0 < moved < 1e-2, moved
    layer_target, _ = calibrated(model, "sequential")
    assert not torch.allclose(layer_target.layers[1].mlp.down_proj.weight, converted.layers[1].mlp.down_proj.weight)


def test_target_model_refuses_a_post_norm_block():
    """BERT normalises after the residual add: the FFN output is not added unchanged to the block's output."""
    with pytest.raises(ValueError, match="not added unchanged"):
        calibrated(tiny_bert(2), "auto", target="model")


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential()
        self.mlp.fc1, self.mlp.act, self.mlp.down_proj = nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.mlp(hidden)


class _ScaledChain(nn.Module):
    """Blocks in a ModuleList, but the model halves the hidden states between them (outside any block)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(100, 16)
        self.layers = nn.ModuleList([_Block(), _Block()])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.embed(input_ids)
        for layer in self.layers:
            hidden = layer(hidden) * 0.5
        return hidden


def test_hidden_states_changed_between_blocks_are_not_calibrated_sequentially():
    """The chain check: block 1 does not take block 0's output itself, so cached hidden states would be wrong."""
    batches = random_batches()
    model = _ScaledChain().eval()
    fitted = {}
    for strategy in ("auto", "rerun"):
        converted = copy.deepcopy(model)
        report = conversion.calibrate_ffn(converted, batches, "gelu", strategy=strategy)
        fitted[strategy] = (report.strategy, converted.layers[1].mlp.down_proj.weight)
    assert fitted["auto"][0] == "rerun"
    torch.testing.assert_close(fitted["auto"][1], fitted["rerun"][1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="does not take the output of block 0"):
        conversion.calibrate_ffn(copy.deepcopy(model), batches, "gelu", strategy="sequential")
