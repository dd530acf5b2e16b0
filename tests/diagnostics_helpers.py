"""Builders shared by the test_diagnostics_* modules (and imported by the 2-process worker script)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import tiny_bert as _tiny_bert
from torch import nn
from transformers import BertModel, Wav2Vec2Config, Wav2Vec2Model


def tiny_bert(hidden_act: str = "relu", seed: int = 0) -> BertModel:
    """A 2-layer BERT (vocab 50, 32 wide, FFN 64, BertConfig's 512 positions) without dropout."""
    return _tiny_bert(
        seed,
        vocab_size=50,
        max_position_embeddings=512,
        hidden_act=hidden_act,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def ffn_sites(model: BertModel) -> dict[str, nn.Module]:
    return {
        f"encoder.layer.{i}.intermediate.intermediate_act_fn": layer.intermediate.intermediate_act_fn
        for i, layer in enumerate(model.encoder.layer)
    }


def token_batches(seed: int = 1, shapes=((4, 12), (3, 7), (5, 9), (2, 16), (4, 5))) -> list[dict[str, torch.Tensor]]:
    """Random token batches with right padding (every row keeps at least one real token)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for rows, length in shapes:
        lengths = torch.randint(1, length + 1, (rows,), generator=gen)
        mask = (torch.arange(length)[None, :] < lengths[:, None]).long()
        ids = torch.randint(1, 50, (rows, length), generator=gen) * mask
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def capture_outputs(modules: dict[str, nn.Module]):
    """Plain forward hooks recording (input, output) of each module, independent of the monitor."""
    records = {name: [] for name in modules}
    handles = [
        module.register_forward_hook(
            lambda _m, args, out, name=name: records[name].append((args[0].detach().clone(), out.detach().clone()))
        )
        for name, module in modules.items()
    ]
    return records, handles


def reference_stats(records, masks, alpha=None) -> dict[str, dict]:
    """Dead units, zeros and band counted directly with NumPy over the unmasked positions."""
    result = {}
    for name, calls in records.items():
        rows_in = np.concatenate([z.numpy()[m.numpy().astype(bool)] for (z, _), m in zip(calls, masks, strict=True)])
        rows_out = np.concatenate([y.numpy()[m.numpy().astype(bool)] for (_, y), m in zip(calls, masks, strict=True)])
        entry = {
            "tokens": rows_out.shape[0],
            "zeros": int(np.count_nonzero(rows_out == 0)),
            "dead": sorted(np.flatnonzero(~np.any(rows_out > 0, axis=0)).tolist()),
        }
        if alpha is not None:
            entry["band"] = int(np.count_nonzero((rows_in <= 0) & (rows_in > np.float32(-alpha))))
        result[name] = entry
    return result


def assert_matches_reference(stats, reference):
    assert [layer.name for layer in stats.layers] == list(reference)
    for layer in stats.layers:
        expected = reference[layer.name]
        assert layer.tokens == expected["tokens"]
        assert layer.zero_elements == expected["zeros"]
        assert list(layer.dead_indices) == expected["dead"]
        assert layer.dead_units == len(expected["dead"])
        assert layer.zero_fraction == pytest.approx(expected["zeros"] / (expected["tokens"] * layer.units), abs=0)
        if "band" in expected:
            assert layer.band_elements == expected["band"]


PLANTED = {0: [3, 17, 40], 1: [0, 63]}


def plant_dead_units(model: BertModel, boost_others: bool) -> None:
    """Units in PLANTED get weight 0, bias -1e4 (never fire); with ``boost_others`` every other unit always fires."""
    with torch.no_grad():
        for index, layer in enumerate(model.encoder.layer):
            dense = layer.intermediate.dense
            if boost_others:
                dense.bias += 50.0
            dense.weight[PLANTED[index]] = 0.0
            dense.bias[PLANTED[index]] = -1e4


def tiny_wav2vec2(**overrides) -> Wav2Vec2Model:
    """A 2-conv-layer Wav2Vec2 whose convs see only valid samples (layer-norm feature encoder)."""
    torch.manual_seed(0)
    config = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "hidden_act": "relu",
        "conv_dim": (16, 16),
        "conv_stride": (5, 2),
        "conv_kernel": (10, 3),
        "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 2,
        "feat_extract_norm": "layer",
        "apply_spec_augment": False,
        "layerdrop": 0.0,
    }
    return Wav2Vec2Model(Wav2Vec2Config(**{**config, **overrides})).eval()


def sparse_helu_bert() -> BertModel:
    """A HeLU BERT whose units fire rarely, so each process sees a different set of dead units."""
    model = tiny_bert("helu", seed=5)
    with torch.no_grad():
        for layer in model.encoder.layer:
            layer.intermediate.dense.weight.mul_(10)
            layer.intermediate.dense.bias.fill_(-2.0)
    return model
