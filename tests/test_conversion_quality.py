"""What conversion reports it kept (held-out loss ratio and FFN errors), its warnings, and ``auto`` per family.

References: the original model kept as a deep copy (stock transformers loss with labels, and
:func:`ffn_output_errors` against it), and stock transformers loading the exported checkpoint.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conversion_helpers import random_batches, tiny_bert
from gguf_helpers import tiny_llama_lm
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from hf_helu import conversion, export_for_inference, patch_model
from hf_helu.conversion import quality as quality_module
from hf_helu.patching import UnconvertedSwapWarning


def lm_batches(count: int = 8, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Right-padded random batches in the 31-token vocabulary of :func:`tiny_llama_lm`."""
    batches = random_batches(count=count, seed=seed)
    return [{"input_ids": b["input_ids"] % 31, "attention_mask": b["attention_mask"]} for b in batches]


def stock_loss(model, batch) -> float:
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    with torch.no_grad():
        return model(**batch, labels=labels).loss.item()


def test_patch_model_warns_once_for_a_non_relu_checkpoint_and_points_to_convert():
    with pytest.warns(UnconvertedSwapWarning) as caught:
        patch_model(tiny_bert(2, act="gelu"))
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "2 FFN activation(s) of BertModel (GELUActivation)" in message
    assert "convert_model" in message and "hf-helu convert" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        patch_model(tiny_bert(2, act="relu"))  # ReLU -> HeLU changes no output: no warning
        model = tiny_bert(2, act="gelu")
        conversion.convert_model(model, "none")  # an explicit choice: no advice
        patch_model(model)  # already HeLU: nothing swapped


def test_convert_model_measures_what_it_kept_on_held_out_batches():
    model = tiny_llama_lm()
    original = copy.deepcopy(model)
    batches = lm_batches()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = conversion.convert_model(model, "calibrate", calibration_batches=batches, holdout=2)
    fit, held_out = batches[:6], batches[6:]
    assert result.calibration.batches == len(fit)
    quality = result.quality
    assert quality.batches == 2
    assert quality.tokens == sum(int(b["attention_mask"].sum()) for b in held_out)
    # The held-out loss is the mean over every token that has a next token (HF's shifted labels), pooled over batches.
    weights = [int(b["attention_mask"][:, 1:].sum()) for b in held_out]
    assert quality.predicted_tokens == sum(weights)

    def mean(values):
        return sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)

    assert quality.loss_original == pytest.approx(mean([stock_loss(original, b) for b in held_out]), rel=1e-5)
    assert quality.loss_converted == pytest.approx(mean([stock_loss(model, b) for b in held_out]), rel=1e-5)
    assert quality.loss_ratio == pytest.approx(quality.loss_converted / quality.loss_original)
    errors = conversion.ffn_output_errors(model, original, held_out)
    assert quality.ffn_errors == pytest.approx(errors, rel=1e-5)
    assert min(errors.values()) <= quality.ffn_relative_error <= max(errors.values())
    assert result.to_dict()["quality"]["kept"] == quality.kept


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_convert_model_warns_with_the_figure_when_the_quality_is_not_kept(family, monkeypatch):
    build = tiny_llama_lm if family == "llama" else lambda: tiny_bert(2)
    # Enough fit tokens for the 65 unknowns of each refit (minimum_calibration_tokens: 650): no thin-data warning.
    batches = lm_batches(count=16) if family == "llama" else random_batches(count=16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # generous thresholds: kept, no warning at all
        monkeypatch.setattr(quality_module, "KEPT_PERPLEXITY_RATIO", 1e9)
        monkeypatch.setattr(quality_module, "KEPT_FFN_ERROR", 1e9)
        measured = conversion.convert_model(build(), "calibrate", calibration_batches=batches).quality
    assert measured.kept
    if family == "llama":
        monkeypatch.setattr(quality_module, "KEPT_PERPLEXITY_RATIO", measured.perplexity_ratio / 2)
        figure = f"perplexity x{measured.perplexity_ratio:.2f}"
    else:
        monkeypatch.setattr(quality_module, "KEPT_FFN_ERROR", measured.ffn_relative_error / 2)
        figure = f"FFN output relative error {measured.ffn_relative_error:.3f}"
    with pytest.warns(UserWarning, match="did not keep the model's quality") as caught:
        result = conversion.convert_model(build(), "calibrate", calibration_batches=batches)
    assert not result.quality.kept
    assert figure in str(caught[0].message)


def test_auto_picks_per_family():
    llama = conversion.resolve_conversion("auto", activation="helu", model=tiny_llama_lm())
    assert (llama.method, llama.target) == ("calibrate", "model")
    assert "causal LM with gated FFNs" in llama.reason
    bert = conversion.resolve_conversion("auto", activation="helu", model=tiny_bert(2))
    assert (bert.method, bert.target) == ("calibrate+anneal", "layer")
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64))
    assert conversion.resolve_conversion("auto", activation="helu", model=gpt2).method == "calibrate+anneal"
    result = conversion.convert_model(tiny_llama_lm(), "auto", calibration_batches=lm_batches())
    assert (result.method, result.calibration.target, result.calibration.strategy) == (
        "calibrate",
        "model",
        "sequential",
    )


def test_a_converted_decoder_exports_exactly(tmp_path):
    """The calibrated HeLU LM, exported to ReLU and reloaded by stock transformers, gives identical logits."""
    model = tiny_llama_lm()
    conversion.convert_model(model, "auto", calibration_batches=lm_batches())
    batch = lm_batches(count=1, seed=5)[0]
    with torch.no_grad():
        want = model(**batch).logits
    export_for_inference(model)
    model.save_pretrained(tmp_path)
    assert '"hidden_act": "relu"' in (tmp_path / "config.json").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert isinstance(reloaded.model.layers[0].mlp.act_fn, torch.nn.ReLU)
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, want)
