"""Model loading and preparation (recipe_support.models): the float32 loader, the trained-head check (GLUE's and
speech's), and the activation patch (keep / relu / helu, by scope)."""

from __future__ import annotations

import pytest
import torch
from recipe_support import glue, models, speech


def test_head_that_does_not_fit(tmp_path, tiny_bert_dir):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    config = AutoConfig.from_pretrained(tiny_bert_dir, num_labels=3)
    three_way = tmp_path / "three_way"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(three_way)
    with pytest.raises(ValueError, match=r"3-output classification head but task rte needs 2"):
        glue.load_glue_model(str(three_way), glue.get_task("rte"))
    with pytest.raises(ValueError, match=r"3-output classification head but task stsb needs 1"):
        glue.load_glue_model(str(three_way), glue.get_task("stsb"))
    rte_names = {0: "entailment", 1: "not_entailment"}
    config = AutoConfig.from_pretrained(tiny_bert_dir, num_labels=2, id2label=rte_names)
    rte_head = tmp_path / "rte_head"
    AutoModelForSequenceClassification.from_config(config).save_pretrained(rte_head)
    with pytest.raises(ValueError, match=r"head labels .* do not match task wnli"):
        glue.load_glue_model(str(rte_head), glue.get_task("wnli"))
    assert glue.load_glue_model(str(rte_head), glue.get_task("rte")).config.num_labels == 2
    with pytest.raises(ValueError, match="no trained sequence-classification head"):
        glue.load_glue_model(str(tiny_bert_dir), glue.get_task("rte"), eval_only=True)


def test_apply_activation_relu_and_helu(tiny_bert_dir):
    from torch import nn

    from hf_helu.activation import HeLU

    task = glue.get_task("rte")
    model = glue.load_glue_model(str(tiny_bert_dir), task)
    info = models.apply_activation(model, "relu", alpha=0.3, scope="ffn")
    ffn = [m.intermediate.intermediate_act_fn for m in model.bert.encoder.layer]
    assert all(isinstance(m, nn.ReLU) for m in ffn) and model.config.hidden_act == "relu"
    assert info["activation"] == "relu" and info["alpha"] is None
    model = glue.load_glue_model(str(tiny_bert_dir), task)
    info = models.apply_activation(model, "helu", alpha=0.3, scope="1")  # only layer 1
    acts = [m.intermediate.intermediate_act_fn for m in model.bert.encoder.layer]
    assert not isinstance(acts[0], HeLU) and isinstance(acts[1], HeLU) and acts[1].alpha == 0.3
    assert models.apply_activation(model, "keep") == {"activation": "keep"}
    with pytest.raises(ValueError, match="--scope must be"):
        models.parse_scope("first")


def test_speech_heads_are_checked_by_the_same_function(tmp_path):
    from transformers import Wav2Vec2ForCTC, Wav2Vec2ForSequenceClassification

    config = speech.scratch_config("tiny")
    config.num_labels = 3
    classifier = tmp_path / "three_labels"
    Wav2Vec2ForSequenceClassification(config).save_pretrained(classifier)
    with pytest.raises(ValueError, match=r"3-output classification head but the dataset needs 2"):
        speech.build_model("classify", model_name_or_path=str(classifier), labels=["no", "yes"])
    config = speech.scratch_config("tiny")
    config.vocab_size, config.pad_token_id = 5, 0
    ctc = tmp_path / "ctc"
    Wav2Vec2ForCTC(config).save_pretrained(ctc)
    vocabulary = speech.build_vocabulary(["ab cd"])  # <pad> <unk> a b c d |: 7 tokens
    with pytest.raises(ValueError, match=r"5-output CTC head but the vocabulary needs 7"):
        speech.build_model("asr", model_name_or_path=str(ctc), vocabulary=vocabulary)
    model = speech.build_model("asr", config=speech.scratch_config("tiny"), vocabulary=vocabulary)
    assert model.config.vocab_size == 7 and next(model.parameters()).dtype == torch.float32


def test_load_model_in_float32_from_a_checkpoint_its_config_or_a_config(tiny_bert_dir):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    pretrained = models.load_model(AutoModelForSequenceClassification, str(tiny_bert_dir), num_labels=3)
    scratch = models.load_model(AutoModelForSequenceClassification, str(tiny_bert_dir), "scratch", num_labels=3)
    config = AutoConfig.from_pretrained(tiny_bert_dir)
    fresh = models.load_model(AutoModelForSequenceClassification, config, num_labels=3)
    assert config.num_labels == 2  # copied, not changed
    name = "bert.encoder.layer.0.intermediate.dense.weight"
    for model in (pretrained, scratch, fresh):
        assert model.config.num_labels == 3 and all(p.dtype == torch.float32 for p in model.parameters())
    assert not torch.equal(pretrained.state_dict()[name], scratch.state_dict()[name])
