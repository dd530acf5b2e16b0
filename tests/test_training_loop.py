"""The recipes' training loop (recipes/run_glue.py on a tiny BERT): the annealer sees every optimizer step, a run
stopped mid-epoch resumes to the uninterrupted run's weights (a killed final save's temp copy removed), the output
folder keeps what is not the run's, a diverging run stops naming the step and saves nothing non-finite, and the
step count."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from accelerate.optimizer import AcceleratedOptimizer
from helpers import GLUE_DIR, REPO, load_script
from recipe_support.training import checkpoint_names, total_training_steps

from hf_helu.conversion import ActivationAnnealer
from hf_helu.errors import UsageError

pytestmark = [
    pytest.mark.usefixtures("fresh_accelerate_state"),
    pytest.mark.skipif(not GLUE_DIR.is_dir(), reason=f"GLUE data not found at {GLUE_DIR}"),
]


def run(model: Path, out: Path, *extra: str) -> dict:
    recipe = load_script(REPO / "recipes" / "run_glue.py", "run_glue_loop_test")
    argv = [
        "--task",
        "rte",
        "--model_name_or_path",
        model,
        "--data_dir",
        GLUE_DIR,
        "--output_dir",
        out,
        "--max_train_samples",
        48,
    ]
    argv += [
        "--max_eval_samples",
        10,
        "--per_device_train_batch_size",
        4,
        "--max_length",
        32,
        "--num_train_epochs",
        2,
        "--learning_rate",
        1e-3,
        "--seed",
        0,
    ]
    return recipe.main([*map(str, argv), "--checkpointing_steps", "2", "--no_progress", *extra])


class Stop(Exception):
    pass


def stop_before_step(monkeypatch, step: int) -> None:
    """Make the optimizer step ``step`` raise :class:`Stop` before it changes anything."""
    original, done = AcceleratedOptimizer.step, [0]

    def step_or_stop(self, *args, **kwargs):
        if self.gradient_state.sync_gradients:
            if done[0] == step - 1:
                raise Stop
            done[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(AcceleratedOptimizer, "step", step_or_stop)


def test_the_annealer_sees_every_step_and_a_stopped_run_resumes_to_the_same_weights(
    tmp_path, tiny_bert_dir, monkeypatch
):
    calls = []
    on_step = ActivationAnnealer.on_step

    def record(self, done, total):
        calls.append((done, total))
        return on_step(self, done, total)

    monkeypatch.setattr(ActivationAnnealer, "on_step", record)
    anneal = ("--activation", "helu", "--conversion", "anneal")
    full = run(tiny_bert_dir, tmp_path / "full", *anneal)
    assert calls == [(step, 24) for step in range(25)]  # before the first step, then after each of the 24
    assert full["completed_steps"] == 24 and full["status"] == "complete" and full["final"]["dev"]["num_samples"] == 10

    out = tmp_path / "stopped"
    with monkeypatch.context() as patch:
        stop_before_step(patch, 8)
        with pytest.raises(Stop):
            run(tiny_bert_dir, out, *anneal)
    names = ["step_2", "step_4", "step_6"]  # epoch 1 ends at step 12
    assert checkpoint_names(out) == names
    killed_save = out / ".model.k3j4h5.tmp"  # what a kill -9 during a final save leaves (an older version's name)
    killed_save.mkdir()
    (killed_save / "model.safetensors").write_bytes(b"\0" * 4096)
    calls.clear()
    again = run(tiny_bert_dir, out, *anneal, "--resume_from_checkpoint", "latest")
    assert again["resumed_from"]["label"] == "step_6" and calls == [(step, 24) for step in range(6, 25)]
    assert again["final"]["dev"] == pytest.approx(full["final"]["dev"])
    assert not killed_save.exists() and not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    from safetensors.torch import load_file

    a, b = (load_file(path / "model" / "model.safetensors") for path in (tmp_path / "full", out))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)


def test_the_output_folder_keeps_what_is_not_this_runs(tmp_path, tiny_bert_dir):
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    (out / "model" / "mine.txt").write_text("mine")
    one = ("--num_train_epochs", "1")
    with pytest.raises(UsageError, match="not empty and no hf_helu run made it"):
        run(tiny_bert_dir, out, *one)
    assert (out / "model" / "mine.txt").read_text() == "mine"
    helu = run(tiny_bert_dir, out, *one, "--activation", "helu", "--overwrite_output_dir")
    assert helu["relu_export_dir"] and (out / "model_relu" / "config.json").is_file()
    assert not (out / "model" / "mine.txt").exists()
    with pytest.raises(UsageError, match="already holds a run"):
        run(tiny_bert_dir, out, *one)
    relu = run(tiny_bert_dir, out, *one, "--overwrite_output_dir")  # no stale model_relu/ beside the new model/
    assert relu["relu_export_dir"] is None and not (out / "model_relu").exists()
    trained = (out / "results.json").read_bytes()
    evaluated = run(out / "model", out, "--eval_only")  # into the finished run's folder: its results.json stays
    assert (out / "results.json").read_bytes() == trained
    assert evaluated["status"] == "complete" and evaluated["epochs"] == [] and evaluated["config"]["eval_only"]
    assert json.loads((out / "eval_results.json").read_text())["final"] == evaluated["final"]


def test_a_diverging_run_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_bert_dir):
    """A loss that turns NaN at step 5 (a model that divides by zero from then on) stops the run there: the
    step_4 checkpoint is the newest, no model/ is written, and no saved weight is NaN."""
    from transformers import BertForSequenceClassification

    original, calls = BertForSequenceClassification.forward, [0]

    def forward(self, *args, **kwargs):
        outputs = original(self, *args, **kwargs)
        calls[0] += self.training
        if self.training and calls[0] >= 5 and outputs.loss is not None:
            outputs.loss = outputs.loss * math.inf
        return outputs

    out = tmp_path / "diverged"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BertForSequenceClassification, "forward", forward)
        with pytest.raises(
            UsageError, match=r"the training loss became (nan|inf) at optimizer step 5: .*--learning_rate"
        ):
            run(tiny_bert_dir, out)
    assert checkpoint_names(out) == ["step_2", "step_4"] and not (out / "model").exists()
    from safetensors.torch import load_file

    for file in out.glob("checkpoints/*/model.safetensors"):
        assert all(torch.isfinite(t).all() for t in load_file(file).values())


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
    import argparse

    args = argparse.Namespace(
        num_train_epochs=epochs, max_train_steps=max_steps, gradient_accumulation_steps=accumulation
    )
    assert total_training_steps(args, batches, processes) == expected
