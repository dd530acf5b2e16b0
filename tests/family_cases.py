"""Tiny random models of every family in hf_helu.families' table, shared by test_families and test_patching.

Each case says what to expect independently of hf_helu's own bookkeeping: the stock transformers config that
builds the same model with ReLU, how each FFN activation's name ends, and how many FFN activations the config makes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import transformers
from torch import nn

from hf_helu import HeLU

TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37, vocab_size=99)
AUDIO = dict(
    TEXT,
    conv_dim=(16, 16),
    conv_stride=(5, 2),
    conv_kernel=(10, 3),
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
    layerdrop=0.0,
)
IDS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)


@dataclass
class Case:
    """A tiny model of one family, the relu config of stock transformers, and what to expect."""

    config_cls: type
    model_cls: type
    kwargs: dict
    relu: dict  # config kwargs that build the same model with ReLU where the patch puts HeLU
    ffn_suffix: str  # how each FFN activation's name ends (written here, not taken from hf_helu)
    num_ffn: object  # config -> expected number of FFN activation modules
    inputs: str
    companions: tuple[str, ...] = ()  # non-FFN modules built from the same config attribute
    gated: bool = False
    extra: dict = field(default_factory=dict)


def layers(config):
    return config.num_hidden_layers


CASES = {
    "bert": Case(
        transformers.BertConfig,
        transformers.BertForMaskedLM,
        TEXT,
        {"hidden_act": "relu"},
        "intermediate.intermediate_act_fn",
        layers,
        "text",
        companions=("cls.predictions.transform.transform_act_fn",),
    ),
    "roberta": Case(
        transformers.RobertaConfig,
        transformers.RobertaForSequenceClassification,
        TEXT,
        {"hidden_act": "relu"},
        "intermediate.intermediate_act_fn",
        layers,
        "text",
    ),
    "xlm-roberta": Case(
        transformers.XLMRobertaConfig,
        transformers.XLMRobertaModel,
        TEXT,
        {"hidden_act": "relu"},
        "intermediate.intermediate_act_fn",
        layers,
        "text",
    ),
    "distilbert": Case(
        transformers.DistilBertConfig,
        transformers.DistilBertForMaskedLM,
        dict(dim=32, n_layers=2, n_heads=2, hidden_dim=37, vocab_size=99),
        {"activation": "relu"},
        "ffn.activation",
        layers,
        "text",
        companions=("activation",),
    ),
    "albert": Case(
        transformers.AlbertConfig,
        transformers.AlbertForMaskedLM,
        dict(TEXT, embedding_size=16),
        {"hidden_act": "relu"},
        "albert_layers.0.activation",
        lambda c: c.num_hidden_groups * c.inner_group_num,  # ALBERT shares its layer across the stack
        "text",
        companions=("predictions.activation",),
    ),
    "electra": Case(
        transformers.ElectraConfig,
        transformers.ElectraForPreTraining,
        dict(TEXT, embedding_size=16),
        {"hidden_act": "relu"},
        "intermediate.intermediate_act_fn",
        layers,
        "text",
        companions=("discriminator_predictions.activation",),
    ),
    "deberta-v2": Case(
        transformers.DebertaV2Config,
        transformers.DebertaV2ForSequenceClassification,
        TEXT,
        {"hidden_act": "relu"},
        "intermediate.intermediate_act_fn",
        layers,
        "text",
    ),
    "modernbert": Case(
        transformers.ModernBertConfig,
        transformers.ModernBertForMaskedLM,
        dict(TEXT, **IDS, cls_token_id=1, sep_token_id=2),
        {"hidden_activation": "relu"},
        "mlp.act",
        layers,
        "text",
        gated=True,
    ),
    "wav2vec2": Case(
        transformers.Wav2Vec2Config,
        transformers.Wav2Vec2ForCTC,
        AUDIO,
        {"hidden_act": "relu"},
        "feed_forward.intermediate_act_fn",
        layers,
        "audio",
    ),
    "hubert": Case(
        transformers.HubertConfig,
        transformers.HubertForCTC,
        AUDIO,
        {"hidden_act": "relu"},
        "feed_forward.intermediate_act_fn",
        layers,
        "audio",
    ),
    "wavlm": Case(
        transformers.WavLMConfig,
        transformers.WavLMForCTC,
        AUDIO,
        {"hidden_act": "relu"},
        "feed_forward.intermediate_act_fn",
        layers,
        "audio",
    ),
    "whisper": Case(
        transformers.WhisperConfig,
        transformers.WhisperForConditionalGeneration,
        dict(
            d_model=32,
            encoder_layers=2,
            decoder_layers=2,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            encoder_ffn_dim=37,
            decoder_ffn_dim=37,
            num_mel_bins=8,
            max_source_positions=16,
            max_target_positions=16,
            vocab_size=99,
            decoder_start_token_id=1,
            **IDS,
        ),
        {"activation_function": "relu"},
        "activation_fn",
        lambda c: c.encoder_layers + c.decoder_layers,
        "whisper",
    ),
    "gpt2": Case(
        transformers.GPT2Config,
        transformers.GPT2LMHeadModel,
        dict(n_embd=32, n_layer=2, n_head=2, n_inner=37, vocab_size=99, n_positions=32, **IDS),
        {"activation_function": "relu"},
        "mlp.act",
        layers,
        "text",
    ),
    "t5": Case(
        transformers.T5Config,
        transformers.T5ForConditionalGeneration,
        dict(d_model=32, d_ff=37, num_layers=2, num_heads=2, d_kv=16, vocab_size=99, feed_forward_proj="gelu"),
        {"feed_forward_proj": "relu"},
        "DenseReluDense.act",
        lambda c: c.num_layers + c.num_decoder_layers,
        "seq2seq",
    ),
    "t5-gated": Case(
        transformers.T5Config,
        transformers.T5ForConditionalGeneration,
        dict(d_model=32, d_ff=37, num_layers=2, num_heads=2, d_kv=16, vocab_size=99, feed_forward_proj="gated-gelu"),
        {"feed_forward_proj": "gated-relu"},
        "DenseReluDense.act",
        lambda c: c.num_layers + c.num_decoder_layers,
        "seq2seq",
        gated=True,
    ),
    "vit": Case(
        transformers.ViTConfig,
        transformers.ViTForImageClassification,
        dict(TEXT, image_size=16, patch_size=8, num_channels=3),
        {"hidden_act": "relu"},
        "mlp.activation_fn",
        layers,
        "image",
    ),
    "llama": Case(
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        dict(TEXT, num_key_value_heads=2, **IDS),
        {"hidden_act": "relu"},
        "mlp.act_fn",
        layers,
        "text",
        gated=True,
    ),
}


def build(case: Case, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    model = case.model_cls(case.config_cls(**{**case.kwargs, **overrides}))
    return model.float().eval()


def make_inputs(case: Case, seed: int = 1) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    if case.inputs == "text":
        return {"input_ids": torch.randint(3, 99, (2, 7), generator=gen)}
    if case.inputs == "seq2seq":
        return {
            "input_ids": torch.randint(3, 99, (2, 7), generator=gen),
            "decoder_input_ids": torch.randint(3, 99, (2, 5), generator=gen),
        }
    if case.inputs == "audio":
        return {"input_values": torch.randn(2, 400, generator=gen)}
    if case.inputs == "whisper":
        return {
            "input_features": torch.randn(2, 8, 32, generator=gen),
            "decoder_input_ids": torch.tensor([[1, 5, 6]] * 2),
        }
    if case.inputs == "image":
        return {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}
    raise AssertionError(case.inputs)


def first_output(model: nn.Module, inputs: dict) -> torch.Tensor:
    return model(**inputs)[0]


def helu_alphas(model: nn.Module) -> dict[str, float]:
    return {name: m.alpha for name, m in model.named_modules() if isinstance(m, HeLU)}


FAMILY_IDS = list(CASES)
