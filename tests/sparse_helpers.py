"""Tiny transformers models with ReLU/HeLU FFNs for the sparse inference tests, and greedy decoding on them."""

from __future__ import annotations

import torch
import transformers

TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=101)


def llama(act: str = "relu"):
    config = transformers.LlamaConfig(**TEXT, intermediate_size=176, num_key_value_heads=2, hidden_act=act)
    return transformers.LlamaForCausalLM(config)


def gpt2(act: str = "relu"):
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=101, activation_function=act)
    return transformers.GPT2LMHeadModel(config)


def bert(act: str = "helu"):
    return transformers.BertModel(transformers.BertConfig(**TEXT, intermediate_size=150, hidden_act=act))


def whisper(act: str = "helu"):
    config = transformers.WhisperConfig(
        vocab_size=101,
        num_mel_bins=16,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=144,
        decoder_ffn_dim=144,
        max_source_positions=20,
        max_target_positions=40,
        activation_function=act,
        decoder_start_token_id=1,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=1,
        begin_suppress_tokens=None,
        suppress_tokens=None,
    )
    return transformers.WhisperForConditionalGeneration(config)


def build(factory, seed: int = 0):
    torch.manual_seed(seed)
    model = factory().eval()
    for name, p in model.named_parameters():  # stock init zeroes the biases: make them count
        if name.endswith("bias"):
            p.data.normal_(0.0, 0.1)
    return model


PROMPTS = [torch.tensor([[5, 17, 42, 8, 99, 3]]), torch.tensor([[60, 7, 7, 31]]), torch.tensor([[11]])]


def greedy(model, ids, n=12, **extra):
    options = {"do_sample": False, "pad_token_id": 0, **extra}
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, **options)
