"""hf_helu.model_card: the card of a converted model says what was converted, how, and what was measured."""

from huggingface_hub import ModelCard

from hf_helu.model_card import conversion_card


def test_the_card_names_source_method_tokens_and_measured_figures(tmp_path):
    card = conversion_card(
        "HuggingFaceTB/SmolLM2-135M",
        activation="helu",
        alpha=0.05,
        method="calibrate (target model)",
        calibration_tokens=47984,
        results={"perplexity_ratio": 1.3812345, "kept": True, "ffn_errors": {"a": 0.1}},
        details="calibrated 30 FFN output projection(s)",
    )
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.base_model == "HuggingFaceTB/SmolLM2-135M" and "hf_helu" in loaded.data.tags
    text = loaded.text
    assert "alpha 0.05" in text and "`calibrate (target model)`" in text and "(fit): 47984" in text
    assert "perplexity_ratio: 1.381" in text and "kept: True" in text and "ffn_errors" not in text
    assert "calibrated 30 FFN output projection(s)" in text


def test_a_local_source_is_no_base_model_and_an_unmeasured_card_says_so():
    card = conversion_card("/data/model.gguf", activation="relu", alpha=None, method="hf-helu export")
    assert card.data.base_model is None
    assert "Nothing was measured" in card.text and "alpha" not in card.text.split("## Measured")[0].lower()
