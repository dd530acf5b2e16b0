"""convert_model on ordinary mistakes: thin data warns with its figures, what it kept is always measured (or said to
be unmeasurable), half-precision models convert, and a failure at any stage leaves the model exactly as it was."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from conversion_helpers import random_batches, tiny_bert
from gguf_helpers import tiny_llama_lm

from hf_helu import conversion, patch_model
from hf_helu.conversion import calibrate as calibrate_module
from hf_helu.conversion import convert as convert_module
from hf_helu.conversion.thin_data import ThinCalibrationWarning, minimum_calibration_tokens

pytestmark = pytest.mark.usefixtures("one_thread")


def lm_batches(count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Right-padded random batches (8 rows of up to 12 tokens) in the 31-token vocabulary of tiny_llama_lm."""
    return [{"input_ids": b["input_ids"] % 31, "attention_mask": b["attention_mask"]} for b in random_batches(count)]


def tokens(batches) -> int:
    return sum(int(b["attention_mask"].sum()) for b in batches)


def state(model) -> dict:
    """Everything a failed call must leave as it was: tensors (values, dtypes, identities), modules, config."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "params": {k: id(p) for k, p in model.named_parameters()},
        "modules": {k: type(m).__name__ for k, m in model.named_modules()},
        "config": model.config.to_dict(),
        "quantizer": getattr(model, "hf_quantizer", None),
    }


def assert_unchanged(model, before: dict) -> None:
    after = state(model)
    assert after["modules"] == before["modules"]
    assert after["config"] == before["config"]
    assert after["params"] == before["params"]
    assert after["quantizer"] is before["quantizer"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for key, value in before["tensors"].items():
        assert after["tensors"][key].dtype == value.dtype, key
        assert torch.equal(after["tensors"][key], value), key


def test_the_minimum_is_ten_tokens_per_input_feature_of_the_widest_projection():
    assert minimum_calibration_tokens(tiny_llama_lm()) == 10 * 64  # down_proj: 64 inputs, no bias
    assert minimum_calibration_tokens(tiny_bert()) == 10 * (64 + 1)  # output.dense: 64 inputs and a bias


def test_thin_calibration_warns_with_its_figures_and_enough_data_does_not():
    thin = lm_batches(3)  # 2 fit batches, about 120 tokens for 64 unknowns
    with pytest.warns(ThinCalibrationWarning) as caught:
        result = conversion.convert_model(tiny_llama_lm(), "calibrate", calibration_batches=thin)
    fitted = result.calibration.layers[0].tokens
    assert fitted == tokens(thin[:2])
    message = str(caught[0].message)
    assert f"on {fitted} tokens" in message and "640" in message
    with warnings.catch_warnings():
        warnings.simplefilter("error", ThinCalibrationWarning)
        enough = lm_batches(16)
        assert tokens(enough[:14]) >= 640
        conversion.convert_model(tiny_llama_lm(), "calibrate", calibration_batches=enough)


def test_one_calibration_batch_still_measures_what_it_kept():
    """A single batch is split by rows (its last eighth held out): the result says what the conversion kept."""
    batch = lm_batches(1)[0]
    with pytest.warns(ThinCalibrationWarning):
        result = conversion.convert_model(tiny_llama_lm(), "calibrate", calibration_batches=[batch])
    assert result.quality is not None and result.quality.batches == 1
    assert result.quality.tokens == int(batch["attention_mask"][7:].sum())  # the last of the 8 rows
    assert result.calibration.layers[0].tokens == int(batch["attention_mask"][:7].sum())


def test_held_out_texts_of_one_token_say_the_loss_was_not_measured():
    fit = lm_batches(16)[:14]
    one_token = {"input_ids": torch.tensor([[3], [5], [7]]), "attention_mask": torch.ones(3, 1, dtype=torch.long)}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = conversion.convert_model(
            tiny_llama_lm(), "calibrate", calibration_batches=[*fit, one_token], holdout=1
        )
    quality = result.quality
    assert quality.loss_original is None and quality.loss_converted is None and quality.kept is None
    assert "no next token" in str(quality) and "nan" not in str(quality).lower()
    messages = [str(w.message) for w in caught]
    assert not any("did not keep" in m for m in messages)
    assert any("could not be measured" in m for m in messages)
    assert result.to_dict()["quality"]["measured"] is False


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_convert_in_float32_and_keep_their_dtype(dtype):
    """The fit runs in float32: the result is the float32 conversion of the same weights, rounded once."""
    batches = lm_batches(16)
    model = tiny_llama_lm().to(dtype)
    reference = copy.deepcopy(model).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = conversion.convert_model(model, "auto", calibration_batches=batches)
        conversion.convert_model(reference, "auto", calibration_batches=batches)
    assert result.choice.target == "model" and result.quality is not None
    assert {p.dtype for p in model.parameters()} == {dtype}
    for (name, got), want in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        if got.is_floating_point():
            assert torch.equal(got, want.to(dtype)), name


def failing_batches(batches, after: int):
    for number, batch in enumerate(batches):
        if number == after:
            raise RuntimeError("the data source broke")
        yield batch


def explode(*args, **kwargs):
    raise RuntimeError("injected failure")


def second_call_explodes(function):
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected failure")
        return function(*args, **kwargs)

    return wrapper


STAGES = ["data source", "patching", "calibration of layer 2", "quality measurement", "annealer"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stage", STAGES)
def test_a_failure_at_any_stage_leaves_the_model_as_it_was(stage, dtype, monkeypatch):
    model = tiny_llama_lm().to(dtype)
    before = state(model)
    batches = lm_batches(16)
    method = "calibrate+anneal" if stage == "annealer" else "calibrate"
    if stage == "data source":
        batches = failing_batches(batches, after=5)
    elif stage == "patching":
        monkeypatch.setattr("hf_helu.patching._write_config", explode)  # after the modules were replaced
    elif stage == "calibration of layer 2":
        monkeypatch.setattr(calibrate_module, "_solve_site", second_call_explodes(calibrate_module._solve_site))
    elif stage == "quality measurement":
        monkeypatch.setattr(convert_module, "measure_quality", explode)
    else:
        monkeypatch.setattr(convert_module, "ActivationAnnealer", explode)
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match=r"broke|injected"):
        warnings.simplefilter("ignore")
        conversion.convert_model(model, method, calibration_batches=batches, total_steps=10)
    assert_unchanged(model, before)


def test_patch_model_failing_half_way_leaves_the_model_as_it_was(monkeypatch):
    model = tiny_bert()
    before = state(model)
    monkeypatch.setattr("hf_helu.patching._write_config", explode)
    with warnings.catch_warnings(), pytest.raises(RuntimeError, match="injected"):
        warnings.simplefilter("ignore")
        patch_model(model)
    assert_unchanged(model, before)


def test_calibration_progress_bar_names_layers_and_tokens_per_second(capsys):
    model = tiny_llama_lm()
    originals = conversion.original_activations(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch_model(model)
    conversion.calibrate_ffn(model, lm_batches(2), originals, progress=True)
    err = capsys.readouterr().err
    assert "calibrating" in err and "2/2" in err and "tokens/s" in err
    conversion.calibrate_ffn(model, lm_batches(2), originals)  # off by default
    assert "calibrating" not in capsys.readouterr().err
