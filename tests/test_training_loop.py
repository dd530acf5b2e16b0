"""The Accelerate loop (recipe_support.loop) on a tiny BERT classifier and random tokens: the step hook's calls,
a run stopped by its hook and resumed to the uninterrupted run's weights, the step count, and bad calls."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_bert
from recipe_support.args import FitConfig
from recipe_support.checkpoints import checkpoint_names
from recipe_support.loop import FitHooks, fit, make_accelerator, total_training_steps
from torch.utils.data import DataLoader
from transformers import BertForSequenceClassification

from hf_helu import patch_model
from hf_helu.errors import UsageError

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def rows(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (n, 12), generator=generator)
    labels = torch.randint(0, 2, (n,), generator=generator)
    return [
        {"input_ids": ids[i], "attention_mask": torch.ones(12, dtype=torch.long), "labels": labels[i]} for i in range(n)
    ]


def accuracy(outputs: dict) -> dict[str, float]:
    return {"accuracy": float((np.argmax(outputs["predictions"], axis=-1) == outputs["labels"]).mean())}


def run(out: Path, hooks: FitHooks = FitHooks(), helu: bool = False, **overrides) -> dict:  # noqa: B008
    torch.manual_seed(0)
    model = tiny_bert(0, BertForSequenceClassification).train()
    if helu:
        patch_model(model)
    settings = {"epochs": 2, "lr": 1e-3, "progress": False, "checkpointing_steps": 2, **overrides}
    config = FitConfig(output_dir=out, **settings)
    train = DataLoader(rows(24, 1), batch_size=4, shuffle=True)  # 6 steps per epoch
    dev = DataLoader(rows(10, 2), batch_size=4)
    accelerator = make_accelerator(seed=config.seed)
    return fit(accelerator, model, train, {"dev": dev}, accuracy, config, hooks=hooks)


class Stop(Exception):
    pass


def test_step_hook_sees_every_step_and_a_stopped_run_resumes_to_the_same_weights(tmp_path):
    calls = []
    full = run(tmp_path / "full", FitHooks(on_step=lambda done, total: calls.append((done, total))))
    assert calls == [(step, 12) for step in range(13)]  # before the first step, then after each of the 12
    assert full["completed_steps"] == 12 and full["status"] == "complete" and full["final"]["dev"]["num_samples"] == 10

    def stop_after_7(done: int, total: int) -> None:
        if done == 7:
            raise Stop

    out = tmp_path / "stopped"
    with pytest.raises(Stop):
        run(out, FitHooks(on_step=stop_after_7))
    assert checkpoint_names(out) == ["step_2", "step_4", "step_6", "epoch_1"]  # epoch 1 ends at step 6, saved last
    killed_save = out / ".model.k3j4h5.tmp"  # what a kill -9 during a final save leaves (an older version's name)
    killed_save.mkdir()
    (killed_save / "model.safetensors").write_bytes(b"\0" * 4096)
    resumed = []
    again = run(out, FitHooks(on_step=lambda done, total: resumed.append(done)), resume_from_checkpoint="latest")
    assert again["resumed_from"].endswith(("step_6", "epoch_1")) and resumed == [6, 7, 8, 9, 10, 11, 12]
    assert again["final"]["dev"] == pytest.approx(full["final"]["dev"])
    assert not killed_save.exists() and not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    from safetensors.torch import load_file

    a, b = (load_file(path / "model" / "model.safetensors") for path in (tmp_path / "full", out))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)


def test_eval_only_and_bad_calls(tmp_path):
    results = run(tmp_path / "eval", eval_only=True)
    assert results["status"] == "complete" and results["epochs"] == [] and results["final"]["dev"]["num_samples"] == 10
    assert results["config"]["eval_only"] is True  # the FitConfig, recorded when no run_config is given
    accelerator = make_accelerator()
    config = FitConfig(output_dir=tmp_path / "bad")
    with pytest.raises(ValueError, match="at least one eval dataloader"):
        fit(accelerator, torch.nn.Linear(1, 1), None, {}, accuracy, config)
    with pytest.raises(ValueError, match="needs a train dataloader"):
        fit(accelerator, torch.nn.Linear(1, 1), None, {"dev": []}, accuracy, dataclasses.replace(config, epochs=1))


def test_the_output_folder_keeps_what_is_not_this_runs(tmp_path):
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "mine.txt").write_text("mine")
    with pytest.raises(UsageError, match="not empty and no hf_helu run made it"):
        run(out, epochs=1)
    assert (out / "model" / "mine.txt").read_text() == "mine"
    helu = run(out, epochs=1, helu=True, overwrite_output_dir=True)
    assert helu["relu_export_dir"] and (out / "model_relu" / "config.json").is_file()
    assert not (out / "model" / "mine.txt").exists()
    with pytest.raises(UsageError, match="already holds a run"):
        run(out, epochs=1)
    relu = run(out, epochs=1, overwrite_output_dir=True)  # no stale model_relu/ of the HeLU run beside its model/
    assert relu["relu_export_dir"] is None and not (out / "model_relu").exists()
    trained = (out / "results.json").read_bytes()
    evaluated = run(out, eval_only=True)  # into the finished run's folder: its results.json stays
    assert (out / "results.json").read_bytes() == trained
    assert json.loads((out / "eval_results.json").read_text())["final"] == evaluated["final"]


@pytest.mark.parametrize(
    ("batches", "accumulation", "processes", "epochs", "max_steps", "expected"),
    [
        (10, 1, 1, 3, None, 30),
        (10, 4, 1, 2, None, 6),
        (10, 1, 2, 1, None, 5),
        (9, 2, 2, 2, None, 6),
        (10, 1, 1, 3, 7, 7),
    ],
)
def test_total_training_steps(batches, accumulation, processes, epochs, max_steps, expected):
    config = FitConfig(
        output_dir=Path("x"), epochs=epochs, gradient_accumulation_steps=accumulation, max_steps=max_steps
    )
    assert total_training_steps(config, batches, processes) == expected
