"""patch_model / unpatch_model / export_for_inference on tiny random models of every supported family.

References are independent of hf_helu's own bookkeeping: the stock transformers model built with the
``relu`` config and the same weights, HeLU's gradient rule written out (pass where z > -alpha), FFN
counts from the config's layer counts, and a subprocess that never imports hf_helu.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import numpy
import pytest
import torch
import transformers
from family_cases import CASES, FAMILY_IDS, build, first_output, helu_alphas, make_inputs
from helpers import MINILM, needs_minilm, tiny_bert
from torch import nn

import hf_helu
from hf_helu import (
    HeLU,
    UsageError,
    export_for_inference,
    find_activation_sites,
    patch_model,
    reapply_patch,
    unpatch_model,
)

transformers.logging.set_verbosity_error()

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_report_lists_exactly_the_ffn_activations(family):
    case = CASES[family]
    model = build(case)
    report = patch_model(model)
    expected = case.num_ffn(model.config)
    ffn = [c for c in report.changed if c.kind == "ffn"]
    assert len(ffn) == expected
    assert all(c.name.endswith(case.ffn_suffix) and c.after == "helu" for c in ffn)
    others = sorted(c.name for c in report.changed if c.kind == "other")
    assert others == sorted(case.companions)
    # The modules now in the model are what the report says, and nothing else is HeLU.
    assert sorted(helu_alphas(model)) == sorted(c.name for c in report.changed)
    assert set(helu_alphas(model).values()) == {0.05}
    sites = find_activation_sites(model)
    assert [s.name for s in sites] == [c.name for c in ffn]
    assert all(s.gated == case.gated for s in sites)
    assert all(isinstance(model.get_submodule(s.output_projection), (nn.Linear, transformers.Conv1D)) for s in sites)
    assert not report.needs_reapply


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_patched_forward_equals_stock_relu_model(family):
    case = CASES[family]
    model = build(case)
    patch_model(model, alpha=0.1)
    reference = build(case, seed=1, **case.relu)  # other seed: the weights must come from the state dict
    reference.load_state_dict(model.state_dict())
    assert not helu_alphas(reference)
    inputs = make_inputs(case)
    with torch.no_grad():
        assert torch.equal(first_output(model, inputs), first_output(reference, inputs))
    # Also in training with autograd (HeLU's custom node runs), same seeds for dropout and SpecAugment.
    outputs = []
    for m in (model.train(), reference.train()):
        torch.manual_seed(3)
        numpy.random.seed(3)
        outputs.append(first_output(m, inputs))
    assert outputs[0].requires_grad and torch.equal(*outputs)


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_backward_differs_from_relu_exactly_in_the_band(family):
    case = CASES[family]
    alpha = 0.05
    model = build(case)
    patch_model(model, alpha=alpha)
    model.train()
    captured = {}

    def hook(name):
        def capture(module, args, output):
            z = args[0]
            record = captured.setdefault(name, {"z": z.detach()})
            z.register_hook(lambda g: record.__setitem__("dz", g))
            output.register_hook(lambda g: record.__setitem__("dy", g))

        return capture

    for name, module in model.named_modules():
        if isinstance(module, HeLU):
            module.register_forward_hook(hook(name))
    out = first_output(model, make_inputs(case))
    (out.float() ** 2).sum().backward()
    assert sorted(captured) == sorted(helu_alphas(model))
    band_total = 0
    for name, record in captured.items():
        z, dy, dz = record["z"], record["dy"], record["dz"]
        assert torch.equal(dz, torch.where(z > -alpha, dy, torch.zeros_like(dy))), name
        relu_dz = torch.where(z > 0, dy, torch.zeros_like(dy))
        differs = dz != relu_dz
        band = (z > -alpha) & (z <= 0)
        assert torch.equal(differs, band & (dy != 0)), name
        band_total += int(differs.sum())
    assert band_total > 0  # the band is populated: the check above has teeth


@pytest.mark.parametrize("family", FAMILY_IDS)
def test_save_load_round_trip(family, tmp_path):
    case = CASES[family]
    model = build(case)
    patch_model(model, alpha=0.1)
    model.save_pretrained(tmp_path)
    loaded = case.model_cls.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert helu_alphas(loaded) == helu_alphas(model) and set(helu_alphas(model).values()) == {0.1}
    inputs = make_inputs(case)
    with torch.no_grad():
        assert torch.equal(first_output(model, inputs), first_output(loaded, inputs))
    assert patch_model(loaded, alpha=0.1).num_changed == 0


_STOCK_LOADER = textwrap.dedent(
    """
    import json, sys
    import torch, transformers
    torch.set_num_threads(1)  # as in the parent: same reduction order, bit-identical outputs
    jobs = json.load(open(sys.argv[1]))
    for job in jobs:
        model = getattr(transformers, job["class"]).from_pretrained(job["folder"], dtype=torch.float32).eval()
        inputs = torch.load(job["inputs"])
        with torch.no_grad():
            out = model(**inputs)[0]
        assert torch.equal(out, torch.load(job["expected"])), job["folder"]
        assert not any("Helu" in type(m).__name__ or "HeLU" in type(m).__name__ for m in model.modules())
    assert "hf_helu" not in sys.modules, "the stock loader imported hf_helu"
    print("ok", len(jobs))
    """
)


def test_export_loads_with_stock_transformers_in_a_subprocess(tmp_path):
    jobs = []
    for family, case in CASES.items():
        model = build(case)
        patch_model(model)
        inputs = make_inputs(case)
        with torch.no_grad():
            expected = first_output(model, inputs)
        patched = len(helu_alphas(model))
        report = export_for_inference(model)
        assert report.num_changed == patched > 0 and not helu_alphas(model)
        assert "helu" not in json.dumps(model.config.to_dict())
        folder = tmp_path / family
        model.save_pretrained(folder)
        torch.save(inputs, tmp_path / f"{family}.inputs.pt")
        torch.save(expected, tmp_path / f"{family}.expected.pt")
        jobs.append(
            {
                "class": case.model_cls.__name__,
                "folder": str(folder),
                "inputs": str(tmp_path / f"{family}.inputs.pt"),
                "expected": str(tmp_path / f"{family}.expected.pt"),
            }
        )
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    (tmp_path / "loader.py").write_text(_STOCK_LOADER)
    result = subprocess.run(
        [sys.executable, str(tmp_path / "loader.py"), str(tmp_path / "jobs.json")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"ok {len(CASES)}" in result.stdout


# --- behaviour that does not depend on the family ------------------------------------------------


def test_second_patch_changes_nothing_and_a_new_alpha_changes_everything():
    model = build(CASES["bert"])
    first = patch_model(model)
    second = patch_model(model)
    assert first.num_changed == 3 and first.config_changes == (("hidden_act", "gelu", "helu"),)
    assert second.num_changed == 0 and second.config_changes == () and len(second.unchanged) == 3
    assert "0 module(s) changed" in str(second)
    third = patch_model(model, alpha=0.2)
    assert third.num_changed == 3 and model.config.hidden_act == "helu_0.2"
    assert {c.before for c in third.changed} == {"helu"}


def test_report_to_dict_is_json_and_holds_every_field():
    model = build(CASES["bert"])
    report = patch_model(model, alpha=0.1, scope=[1])
    data = report.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data == {
        "model_class": "BertForMaskedLM",
        "action": "patch",
        "activation": "helu_0.1",
        "changed": [
            {
                "name": "bert.encoder.layer.1.intermediate.intermediate_act_fn",
                "kind": "ffn",
                "before": "GELUActivation",
                "after": "helu_0.1",
                "reason": "selected",
            }
        ],
        "unchanged": [],
        "config_changes": [],
        "overrides": [["bert.encoder.layer.1.intermediate.intermediate_act_fn", "helu_0.1"]],
    }
    assert patch_model(model, alpha=0.1).to_dict()["config_changes"] == [["hidden_act", "gelu", "helu_0.1"]]


def test_model_without_ffn_activation_is_a_clear_error():
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], num_channels=3)
    model = transformers.ResNetModel(config)
    for scope in ("ffn", "all"):  # ResNet's config builds conv activations, but there is no FFN
        with pytest.raises(UsageError, match=r"ResNetModel.*Supported families: bert, roberta"):
            patch_model(model, scope=scope)
    assert find_activation_sites(model) == []
    assert not helu_alphas(model) and model.config.hidden_act == "relu"  # nothing was touched
    with pytest.raises(TypeError, match=r"transformers model with a \.config"):
        patch_model(nn.Sequential(nn.Linear(2, 2), nn.GELU()))


@pytest.mark.parametrize(
    ("scope", "error", "message"),
    [
        ("ffnn", ValueError, "scope must be one of"),
        ([5], ValueError, r"layer\(s\) \[5\] but the FFN layers are \[0, 1\]"),
        ([], ValueError, "empty list"),
        ([True], TypeError, "must be ints"),
        (3.5, TypeError, "got float"),
        (lambda name: name.endswith("nothing"), ValueError, "selects no activation"),
    ],
)
def test_bad_scope_is_a_clear_error(scope, error, message):
    model = build(CASES["bert"])
    with pytest.raises(error, match=message):
        patch_model(model, scope=scope)
    assert not helu_alphas(model)


@pytest.mark.parametrize("alpha", [-0.1, float("nan"), "0.1"])
def test_bad_alpha_is_a_clear_error(alpha):
    with pytest.raises((ValueError, TypeError), match="alpha"):
        patch_model(build(CASES["bert"]), alpha=alpha)


def test_scope_all_patches_the_conv_feature_extractor_and_round_trips(tmp_path):
    case = CASES["wav2vec2"]
    model = build(case)
    report = patch_model(model, scope="all")
    names = {c.name for c in report.changed}
    assert {c.kind for c in report.changed} == {"ffn", "other"}
    assert sum(1 for n in names if re.search(r"feature_extractor\.conv_layers\.\d+\.activation$", n)) == 2
    assert "wav2vec2.encoder.pos_conv_embed.activation" in names
    assert model.config.feat_extract_activation == "helu" and model.config.hidden_act == "helu"
    reference = build(case, seed=1, hidden_act="relu", feat_extract_activation="relu")
    reference.load_state_dict(model.state_dict())
    inputs = make_inputs(case)
    with torch.no_grad():
        assert torch.equal(first_output(model, inputs), first_output(reference, inputs))
    model.save_pretrained(tmp_path)
    loaded = case.model_cls.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert helu_alphas(loaded) == helu_alphas(model)


def test_partial_scope_is_recorded_and_reapplied_after_loading(tmp_path):
    case = CASES["bert"]
    model = build(case)
    report = patch_model(model, alpha=0.1, scope=[1])
    assert [c.name for c in report.changed] == ["bert.encoder.layer.1.intermediate.intermediate_act_fn"]
    assert report.needs_reapply and model.config.hidden_act == "gelu"
    assert model.config.hf_helu == {"sites": {"bert.encoder.layer.1.intermediate.intermediate_act_fn": "helu_0.1"}}
    inputs = make_inputs(case)
    with torch.no_grad():
        expected = first_output(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = case.model_cls.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert not helu_alphas(loaded)  # from_pretrained alone rebuilds GELU everywhere ...
    with torch.no_grad():
        assert not torch.equal(first_output(loaded, inputs), expected)
    again = reapply_patch(loaded)  # ... and reapply_patch restores the patch exactly
    assert again.num_changed == 1 and helu_alphas(loaded) == helu_alphas(model)
    with torch.no_grad():
        assert torch.equal(first_output(loaded, inputs), expected)
    assert reapply_patch(loaded).num_changed == 0
    # Stock transformers cannot express it: export refuses and leaves the model as it was.
    with pytest.raises(ValueError, match=r"cannot export BertForMaskedLM.*layer\.1"):
        export_for_inference(loaded)
    assert helu_alphas(loaded) == helu_alphas(model)
    # Completing the scope makes the config alone describe the model again.
    full = patch_model(loaded, alpha=0.1)
    assert full.num_changed == 2 and not full.needs_reapply and not hasattr(loaded.config, "hf_helu")
    assert loaded.config.hidden_act == "helu_0.1"


def test_predicate_scope_selects_by_module_name():
    model = build(CASES["wav2vec2"])
    report = patch_model(model, scope=lambda name: "conv_layers.0" in name or "layers.1.feed" in name)
    assert sorted(c.name for c in report.changed) == [
        "wav2vec2.encoder.layers.1.feed_forward.intermediate_act_fn",
        "wav2vec2.feature_extractor.conv_layers.0.activation",
    ]
    assert model.config.hidden_act == "gelu" and model.config.feat_extract_activation == "gelu"
    assert len(model.config.hf_helu["sites"]) == 2


def test_unpatch_rejects_bad_targets_and_restores_relu():
    model = build(CASES["gpt2"])
    patch_model(model)
    with pytest.raises(ValueError, match="not a HeLU name"):
        unpatch_model(model, to="helu_0.1")
    with pytest.raises(ValueError, match="activation name transformers knows"):
        unpatch_model(model, to="nope")
    report = unpatch_model(model)
    assert report.num_changed == 2 and model.config.activation_function == "relu"
    assert all(type(s.module) is nn.ReLU for s in find_activation_sites(model))
    assert unpatch_model(model).num_changed == 0


# --- real checkpoint, PEFT, torch.compile ------------------------------------------------------------


@needs_minilm
def test_real_minilm_checkpoint_patch_forward_export_reload(tmp_path):
    folder = MINILM
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    batch = tokenizer(
        ["A man is playing a guitar.", "HeLU keeps ReLU at inference."], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        gelu_out = model(**batch).last_hidden_state
    report = patch_model(model)
    assert report.num_changed == model.config.num_hidden_layers == 6
    with torch.no_grad():
        helu_out = model(**batch).last_hidden_state
    assert torch.isfinite(helu_out).all()
    assert not torch.equal(helu_out, gelu_out)  # the activation really changed
    reference = transformers.AutoModel.from_pretrained(folder, dtype=torch.float32, hidden_act="relu").eval()
    with torch.no_grad():
        assert torch.equal(helu_out, reference(**batch).last_hidden_state)
    export_for_inference(model)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModel.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert reloaded.config.hidden_act == "relu"
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).last_hidden_state, helu_out)


def _tiny_classifier(num_layers: int = 2):
    return tiny_bert(
        0,
        transformers.BertForSequenceClassification,
        vocab_size=99,
        intermediate_size=37,
        num_hidden_layers=num_layers,
        max_position_embeddings=512,  # BertConfig's default, as the family cases use
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def test_peft_lora_before_or_after_patch_same_report_and_training_reduces_loss():
    peft = pytest.importorskip("peft")

    def lora(model):
        return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))

    after = lora(_tiny_classifier())
    report_after = patch_model(after)
    before = _tiny_classifier()
    report_before = patch_model(before)
    before = lora(before)
    assert report_after == report_before and report_after.num_changed == 2
    assert [s.name for s in find_activation_sites(after)] == [s.name for s in find_activation_sites(before)]

    model = before
    model.train()
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 99, (8, 6), generator=gen)
    labels = torch.randint(0, 2, (8,), generator=gen)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_torch_compile_of_patched_model_matches_eager():
    model = _tiny_classifier(num_layers=1)  # one layer keeps tracing cheap
    patch_model(model)
    model.train()
    # fullgraph: HeLU's autograd node must trace without a graph break; aot_eager also traces the backward.
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    input_ids = torch.randint(3, 99, (2, 6), generator=torch.Generator().manual_seed(0))
    eager_logits = model(input_ids=input_ids).logits
    eager_logits.sum().backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    compiled_logits = compiled(input_ids=input_ids).logits
    compiled_logits.sum().backward()
    torch.testing.assert_close(compiled_logits, eager_logits, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, eager_grads[name], rtol=1e-5, atol=1e-6, msg=name)
    assert patch_model(compiled).num_changed == 0  # the compile wrapper is seen through


def test_package_exports():
    for name in ("patch_model", "unpatch_model", "export_for_inference", "reapply_patch", "find_activation_sites"):
        assert callable(getattr(hf_helu, name))
