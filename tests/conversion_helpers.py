"""Tiny models and batches shared by the test_conversion_* modules.

The models use ``initializer_range=0.2``: pre-activations of order 1, where GELU and ReLU differ.
"""

from __future__ import annotations

import copy

import torch
from helpers import tiny_bert as _tiny_bert
from torch import nn
from transformers import BertModel, GPT2Config, GPT2Model, LlamaConfig, LlamaModel


def tiny_bert(layers: int = 2, act: str = "gelu") -> BertModel:
    """A ``layers``-layer BERT (vocab 100, 32 wide, FFN 64) with activation ``act``, seed 0."""
    return _tiny_bert(0, num_hidden_layers=layers, hidden_act=act, initializer_range=0.2)


def tiny_gpt2() -> GPT2Model:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, n_positions=64, initializer_range=0.2)
    return GPT2Model(config).eval()


def tiny_llama() -> LlamaModel:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        hidden_act="silu",
        initializer_range=0.2,
    )
    return LlamaModel(config).eval()


def tiny_classifier() -> nn.Module:
    """:func:`tiny_bert`'s config with 3 labels and no dropout, as a sequence classifier."""
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    config = tiny_bert().config
    config.num_labels = 3
    config.hidden_dropout_prob = config.attention_probs_dropout_prob = 0.0
    return BertForSequenceClassification(config)


def random_batches(count: int = 4, size: int = 8, length: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Random token batches, right-padded: every row has its own length, so the mask matters."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        input_ids = torch.randint(1, 100, (size, length), generator=generator)
        lengths = torch.randint(3, length + 1, (size,), generator=generator)
        mask = (torch.arange(length)[None] < lengths[:, None]).long()
        batches.append({"input_ids": input_ids * mask, "attention_mask": mask})
    return batches


def relu_twin(model: BertModel) -> BertModel:
    """The same weights in a stock transformers model built with hidden_act="relu"."""
    config = copy.deepcopy(model.config)
    config.hidden_act = "relu"
    twin = BertModel(config).eval()
    twin.load_state_dict(model.state_dict())
    return twin
