"""The causal-LM recipe (recipes/run_clm.py) on a tiny random LLaMA with a tokenizer trained here (no hub):
perplexity equals an independent computation, the stock-ReLU export generates the HeLU model's greedy tokens in a
process that cannot import hf_helu, a resumed run ends with the uninterrupted run's weights, bad flags exit 2 before
anything is loaded, and two torchrun processes run it.
"""

from __future__ import annotations

import functools
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, load_script

import hf_helu

RECIPE = REPO / "recipes" / "run_clm.py"
BLOCK = 16

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

WORDS = [
    "the",
    "a",
    "cat",
    "dog",
    "sat",
    "ran",
    "on",
    "under",
    "mat",
    "log",
    "big",
    "small",
    "red",
    "blue",
    "and",
    "then",
]


@functools.cache
def recipe():
    return load_script(RECIPE, "run_clm")


def _text(rng: random.Random, lines: int) -> str:
    return "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + " ." for _ in range(lines))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny random LlamaForCausalLM (SiLU, gated FFN) with a word-level tokenizer, and train/valid text files."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("clm")
    rng = random.Random(0)
    (root / "train.txt").write_text(_text(rng, 120), encoding="utf-8")
    (root / "valid.txt").write_text(_text(rng, 40), encoding="utf-8")
    vocab = {word: i for i, word in enumerate(["<unk>", ".", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<unk>")
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
        hidden_act="silu",
    )
    torch.manual_seed(0)
    model_dir = root / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return {"model": model_dir, "train": root / "train.txt", "valid": root / "valid.txt"}


def clm_args(tiny: dict[str, Path], out: Path, **extra) -> list[str]:
    args = {
        "model_name_or_path": tiny["model"],
        "train_file": tiny["train"],
        "validation_file": tiny["valid"],
        "block_size": BLOCK,
        "per_device_train_batch_size": 4,
        "max_eval_tokens": 20 * BLOCK,
        "learning_rate": 1e-3,
        "seed": 0,
        "output_dir": out,
        **extra,
    }
    argv = []
    for key, value in args.items():
        argv += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return [*argv, "--no_progress"]


def reference_perplexity(model_dir: Path, text_file: Path, max_tokens: int) -> float:
    """exp of the mean of HF's own per-block loss (equal blocks: the same as the token mean), written apart from
    the recipe: whole-text tokens, cut to ``max_tokens``, in BLOCK-token rows, the remainder dropped."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tokenizer(text_file.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"][:max_tokens]
    rows = [ids[i : i + BLOCK] for i in range(0, len(ids) - BLOCK + 1, BLOCK)]
    with torch.no_grad():
        losses = [model(input_ids=torch.tensor([row]), labels=torch.tensor([row])).loss.item() for row in rows]
    return math.exp(sum(losses) / len(losses))


# Generates greedily with stock transformers in a process where `import hf_helu` fails.
STOCK_GENERATE = """
import sys
sys.modules["hf_helu"] = None
import torch, transformers
torch.set_num_threads(1)
model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
prompts = torch.tensor(eval(sys.argv[2]))
out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=12,
                     min_new_tokens=12, pad_token_id=0)
print(out.tolist())
"""


def test_helu_calibrate_run_perplexity_and_export(tmp_path, tiny, one_thread):
    """--activation helu --conversion calibrate: results.json's perplexities equal the reference computed on the
    checkpoint and on the saved model; the FFN statistics see ReLU zeros; model_relu, loaded where hf_helu cannot
    be imported, generates the HeLU model's greedy tokens (and the recipe's own --check_export agrees)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    results = recipe().main(
        clm_args(tiny, out, activation="helu", conversion="calibrate", max_train_steps=4, check_export=True)
    )
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results)) and saved["status"] == "complete"
    assert saved["model"]["conversion"]["method"] == "calibrate" and saved["train"]["completed_steps"] == 4
    max_tokens = 20 * BLOCK
    perplexity = saved["perplexity"]
    assert perplexity["original"] == pytest.approx(
        reference_perplexity(tiny["model"], tiny["valid"], max_tokens), rel=1e-5
    )
    assert perplexity["final"] == pytest.approx(
        reference_perplexity(out / "model", tiny["valid"], max_tokens), rel=1e-5
    )
    assert perplexity["converted"] != perplexity["original"] and perplexity["final"] != perplexity["converted"]
    evaluations = saved["evaluations"]
    assert evaluations["original"]["ffn"]["zero_fraction"] == 0.0  # SiLU is never exactly 0 on random weights
    assert 0.2 < evaluations["final"]["ffn"]["zero_fraction"] < 0.9  # ReLU forward: about half the units off
    assert evaluations["final"]["tokens"] == 20 * (BLOCK - 1)
    assert saved["export_check"] == {"prompts": 4, "new_tokens": 16, "identical": True}

    helu_model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    assert any(isinstance(m, hf_helu.HeLU) for m in helu_model.modules())
    prompts = torch.tensor([[2, 5, 7, 3], [4, 9, 1, 6], [8, 8, 10, 12]])
    expected = helu_model.generate(
        prompts,
        attention_mask=torch.ones_like(prompts),
        do_sample=False,
        max_new_tokens=12,
        min_new_tokens=12,
        pad_token_id=0,
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-c", STOCK_GENERATE, str(out / "model_relu"), str(prompts.tolist())],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected.tolist()
    config = json.loads((out / "model_relu" / "config.json").read_text())
    assert "helu" not in json.dumps(config)


CRASH = REPO / "tests" / "crash_recipe.py"  # runs a recipe's main, ending the process before optimizer step N + 1


def _run(argv: list[str], crash_after: int | str | None = None) -> subprocess.CompletedProcess:
    crash = [str(CRASH), str(RECIPE), str(crash_after)] if crash_after is not None else [str(RECIPE)]
    command = [sys.executable, *crash, *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False, env=env, cwd=REPO)


def test_resume_after_a_crash_ends_with_the_uninterrupted_weights(tmp_path, tiny):
    """A run killed before step 3 (its last checkpoint: step 2), resumed with --resume_from_checkpoint latest, ends
    with the weights of the same run left alone (4 steps, HeLU, calibrated and annealed: optimizer, schedule, data order
    and annealer all resume). Both run on one thread in fresh processes."""
    from safetensors.torch import load_file

    common = dict(activation="helu", conversion="calibrate+anneal", max_train_steps=4, checkpointing_steps=2)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    done = _run(clm_args(tiny, whole, **common))
    assert done.returncode == 0, done.stderr[-3000:]
    crashed = _run(clm_args(tiny, broken, **common), crash_after=2)
    assert crashed.returncode == 3, crashed.stderr[-3000:]
    assert not (broken / "model").exists()
    resumed = _run(clm_args(tiny, broken, **common, resume_from_checkpoint="latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = json.loads((broken / "results.json").read_text())
    assert results["resumed_from"]["path"].endswith("checkpoint_0") and results["train"]["completed_steps"] == 4
    expected, got = load_file(whole / "model" / "model.safetensors"), load_file(broken / "model" / "model.safetensors")
    assert expected.keys() == got.keys()
    start = load_file(tiny["model"] / "model.safetensors")
    moved = max((expected[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3  # training changed the weights far more than the tolerance below
    for key in expected:
        # Same code, data and thread count: equal but for float rounding (a lost optimizer state or a different
        # batch order would move weights by about lr = 1e-3).
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    assert json.loads((whole / "results.json").read_text())["perplexity"]["final"] == pytest.approx(
        results["perplexity"]["final"], rel=1e-5
    )


def test_eval_only_reads_a_dataset_through_datasets(tmp_path, tiny, one_thread):
    """--dataset_name goes through datasets.load_dataset (here a local folder of train.txt/validation.txt, which
    it reads as the "text" builder, as it would a hub repository): the original checkpoint's perplexity is the
    reference on the same text, written to eval_results.json."""
    folder = tmp_path / "dataset"
    folder.mkdir()
    (folder / "train.txt").write_text(tiny["train"].read_text())
    (folder / "validation.txt").write_text(tiny["valid"].read_text())
    out = tmp_path / "eval"
    argv = clm_args(tiny, out, eval_only=True, dataset_name=folder)
    argv = [a for i, a in enumerate(argv) if not (a.endswith("_file") or argv[i - 1].endswith("_file"))]
    results = recipe().main(argv)
    assert json.loads((out / "eval_results.json").read_text())["perplexity"] == results["perplexity"]
    assert list(results["perplexity"]) == ["original"] and not (out / "results.json").exists()
    reference = reference_perplexity(tiny["model"], tiny["valid"], 20 * BLOCK)
    assert results["perplexity"]["original"] == pytest.approx(reference, rel=1e-5)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"block_size": 1}, "--block_size 1: a block needs at least 2 tokens"),
        ({"conversion": "calibrate"}, "--conversion calibrate needs --activation relu or helu"),
        ({"learning_rate": "inf"}, "--learning_rate must be a finite number > 0, got inf"),
        ({"learning_rate": "nan"}, "--learning_rate must be a finite number > 0, got nan"),
        ({"learning_rate": "-1"}, "--learning_rate must be a finite number > 0, got -1.0"),
        ({"weight_decay": "-5"}, "--weight_decay must be a finite number >= 0, got -5.0"),
        ({"activation": "relu", "check_export": True}, "--check_export checks the stock-ReLU export"),
        ({"train_file": "/no/such.txt"}, "--train_file: /no/such.txt is not a text file"),
        ({"eval_only": True, "resume_from_checkpoint": "latest"}, "--eval_only does not train"),
    ],
)
def test_bad_flags_are_refused_before_loading(tmp_path, tiny, flags, message):
    """Each bad flag raises a UsageError naming it before the model is read (the --model folder here has a broken
    config.json, which loading would fail on with another error) and before OUTPUT_DIR is made."""
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    out = tmp_path / "out"
    with pytest.raises(hf_helu.UsageError, match="^" + message.replace("(", r"\(")):
        recipe().main(clm_args(tiny, out, **{**flags, "model_name_or_path": broken}))
    assert not out.exists()


def test_usage_error_exits_2_and_a_missing_model_is_named(tmp_path, tiny):
    """As a script: a UsageError prints one `error: ...` line and exits 2 (here a --model that does not exist)."""
    proc = _run(clm_args(tiny, tmp_path / "out", model_name_or_path=tmp_path / "nothing"))
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: --model_name_or_path {tmp_path / 'nothing'}: ") and "does not exist" in line
    assert not (tmp_path / "out").exists()


def test_two_processes_with_torchrun(tmp_path, tiny):
    """torchrun --nproc_per_node 2 (CPU): the run sees 2 processes, and its perplexity, gathered over both, is the
    reference perplexity of the checkpoint and of the saved model (each block counted once)."""
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(RECIPE)]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    argv = clm_args(tiny, out, activation="helu", conversion="none", max_train_steps=2, max_eval_tokens=19 * BLOCK)
    proc = subprocess.run([*command, *argv], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["num_processes"] == 2 and results["train"]["completed_steps"] == 2
    assert results["evaluations"]["final"]["tokens"] == 19 * (BLOCK - 1)  # 19 blocks: odd, one process gets fewer
    reference = reference_perplexity(tiny["model"], tiny["valid"], 19 * BLOCK)
    assert results["perplexity"]["original"] == pytest.approx(reference, rel=1e-5)
    final = reference_perplexity(out / "model", tiny["valid"], 19 * BLOCK)
    assert results["perplexity"]["final"] == pytest.approx(final, rel=1e-5)


def _all_finite(folder: Path) -> list[str]:
    """The files under ``folder`` holding a tensor that is not finite (safetensors and torch pickles alike)."""
    from safetensors.torch import load_file

    bad = []
    for file in sorted(folder.rglob("*")):
        if file.suffix == ".safetensors":
            tensors = list(load_file(file).values())
        elif file.suffix in (".bin", ".pt"):
            loaded = torch.load(file, weights_only=False)
            tensors = [t for t in _tensors(loaded) if t.is_floating_point()]
        else:
            continue
        if not all(torch.isfinite(t).all() for t in tensors):
            bad.append(str(file.relative_to(folder)))
    return bad


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in _tensors(v)]
    return []


def test_learning_rate_inf_exits_2_before_loading(tmp_path, tiny):
    """As a script: `--learning_rate inf` prints one `error:` line and exits 2; OUTPUT_DIR is never made."""
    proc = _run(clm_args(tiny, tmp_path / "out", learning_rate="inf"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == ["error: --learning_rate must be a finite number > 0, got inf"]
    assert not (tmp_path / "out").exists()


def test_a_diverging_run_exits_2_naming_the_step_and_saves_nothing_non_finite(tmp_path, tiny):
    """--learning_rate 1e12 without clipping: the loss turns non-finite; the run exits 2 naming the optimizer step,
    writes no model/ or model_relu/, and no file it left (checkpoints, optimizer state) holds a non-finite value."""
    out = tmp_path / "diverged"
    argv = clm_args(tiny, out, activation="helu", conversion="none", learning_rate="1e12", max_grad_norm=0)
    proc = _run([*argv, "--max_train_steps", "8", "--checkpointing_steps", "1"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = proc.stderr.strip().splitlines()[-1:]
    # Step 1 moves every weight by about 1e12 (finite); the loss of step 2 is no longer finite: stopped there.
    expected = r"error: the training loss became (nan|inf) at optimizer step 2: .*--learning_rate 1e\+12"
    assert re.match(expected, line), line
    assert not (out / "model").exists() and not (out / "model_relu").exists()
    assert list(out.glob("checkpoints/checkpoint_*")), "the steps before the divergence were checkpointed"
    assert _all_finite(out) == []
    results = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else {}
    assert results.get("status") != "complete"


def test_a_corpus_that_is_not_utf8_is_named_before_the_model_loads(tmp_path, tiny, monkeypatch):
    """A training file with a Latin-1 byte on its third line: a UsageError naming FILE:3, and no model was loaded."""
    import transformers

    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("the cat sat .\nthe dog ran .\ncaf\u00e9 .\n".encode("latin-1"))

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", no_loading)
    with pytest.raises(hf_helu.UsageError, match=rf"^{re.escape(str(latin1))}:3: not UTF-8 text"):
        recipe().main(clm_args(tiny, tmp_path / "out", train_file=latin1))


@pytest.mark.parametrize("case", ["malformed_config", "truncated_gguf", "bert_classifier"])
def test_a_model_that_cannot_be_a_causal_lm_is_refused_with_exit_2(tmp_path, tiny, case):
    """A config.json that is not JSON, a .gguf file cut in half, and a BERT sequence classifier (which transformers
    would load as a BertLMHeadModel): each is one `error:` line, exit 2, before OUTPUT_DIR is made."""
    from gguf_helpers import tiny_llama_lm, write_tiny_gguf
    from helpers import tiny_bert_config
    from transformers import BertForSequenceClassification

    model = tmp_path / case
    if case == "malformed_config":
        shutil.copytree(tiny["model"], model)
        (model / "config.json").write_text('{"model_type": "llama", ')
        expected = "config.json"
    elif case == "truncated_gguf":
        model.mkdir()
        whole = write_tiny_gguf(tiny_llama_lm(), tmp_path / "whole.gguf").read_bytes()
        (model / "tiny.gguf").write_bytes(whole[: len(whole) // 2])
        expected = "GGUF"
    else:
        BertForSequenceClassification(tiny_bert_config(vocab_size=20)).save_pretrained(model)
        expected = "holds a BertForSequenceClassification (config.architectures), not a causal language model"
    proc = _run(clm_args(tiny, tmp_path / "out", model_name_or_path=model, max_train_steps=1))
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = proc.stderr.strip().splitlines()[-1:]
    assert line.startswith(f"error: --model_name_or_path {model}") and expected in line, line
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_save_total_limit_1_and_a_kill_inside_the_second_save_leave_a_checkpoint_to_resume(tmp_path, tiny):
    """--save_total_limit 1 --checkpointing_steps 1: the process dies inside its second checkpoint save (weights
    written, run state not). The first checkpoint is still complete; --resume_from_checkpoint latest continues from
    it to the end, with the weights of the run left alone."""
    from safetensors.torch import load_file

    common = dict(activation="helu", conversion="none", max_train_steps=3, checkpointing_steps=1, save_total_limit=1)
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    assert _run(clm_args(tiny, whole, **common)).returncode == 0
    crashed = _run(clm_args(tiny, broken, **common), crash_after="save:2")
    assert crashed.returncode == 3 and "inside checkpoint save 2" in crashed.stdout, crashed.stderr[-3000:]
    assert (broken / "checkpoints" / "checkpoint_0" / "custom_checkpoint_0.pkl").is_file()
    resumed = _run(clm_args(tiny, broken, **common, resume_from_checkpoint="latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = json.loads((broken / "results.json").read_text())
    assert results["resumed_from"]["path"].endswith("checkpoint_0") and results["train"]["completed_steps"] == 3
    assert [p.name for p in (broken / "checkpoints").iterdir()] == ["checkpoint_2"]  # the limit holds again
    expected, got = load_file(whole / "model" / "model.safetensors"), load_file(broken / "model" / "model.safetensors")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)


def test_model_card_tracker_and_progress(tmp_path, tiny):
    """--with_tracking (tensorboard): the loss of every optimizer step is in OUTPUT_DIR/logs, equal to the per-step
    losses the bar shows; model/ and model_relu/ carry a model card naming the conversion and the measured
    perplexities."""
    pytest.importorskip("tensorboard", reason="the default tracker; installed with hf-helu[recipes]")
    from huggingface_hub import ModelCard
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tracked"
    argv = clm_args(tiny, out, activation="helu", conversion="calibrate", max_train_steps=3, with_tracking=True)
    proc = _run([a for a in argv if a != "--no_progress"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    [events] = list((out / "logs" / "run_clm").glob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    losses = accumulator.Scalars("train_loss")
    assert [e.step for e in losses] == [1, 2, 3]
    shown = [float(x) for x in re.findall(r"loss=([0-9.e+-]+)", proc.stderr)]
    assert shown and shown[-1] == pytest.approx(losses[-1].value, rel=1e-3)  # the bar's postfix: 4 digits
    final = accumulator.Scalars("perplexity/final")[0].value
    assert final == pytest.approx(results["perplexity"]["final"], rel=1e-6)
    assert "eval final" in proc.stderr  # the evaluation's own bar
    for folder in ("model", "model_relu"):
        card = ModelCard.load(out / folder / "README.md")
        assert "hf_helu" in card.data.tags and "activation-helu" in card.data.tags
        assert "method `calibrate`" in card.text and f"{results['perplexity']['final']:.6g}" in card.text
        assert f"{results['perplexity']['original']:.6g}" in card.text
    assert "stock-ReLU export" in ModelCard.load(out / "model_relu" / "README.md").text


def test_push_to_hub_with_the_hub_offline_exits_2_before_training(tmp_path, tiny):
    """HF_HUB_OFFLINE=1 --push_to_hub: one `error:` line naming --push_to_hub and the repository, exit 2, before
    any checkpoint or model is written."""
    out = tmp_path / "push"
    argv = clm_args(tiny, out, max_train_steps=1, push_to_hub=True, hub_model_id="someone/tiny-helu")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(RECIPE), *argv], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 2, proc.stderr[-3000:]
    [line] = proc.stderr.strip().splitlines()[-1:]
    assert line.startswith("error: --push_to_hub: cannot create the hub repository 'someone/tiny-helu'"), line
    assert "offline" in line
    assert not (out / "checkpoints").exists() and not (out / "model").exists()


def test_push_to_hub_creates_the_repo_first_and_uploads_the_stock_relu_export(tmp_path, tiny, monkeypatch, one_thread):
    """--push_to_hub --hub_model_id: huggingface_hub's create_repo is called before the model loads, upload_folder at
    the end with the stock-ReLU export (it loads without hf_helu) and its model card; the token never reaches
    results.json. (The hub client is replaced by a recorder: no network here.)"""
    import huggingface_hub
    import transformers

    calls = []
    loaded = transformers.PreTrainedModel.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        calls.append(("load",))
        return loaded(cls, *args, **kwargs)

    def create_repo(name, token=None, exist_ok=False):
        calls.append(("create_repo", name, token, exist_ok))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{name}")

    def upload_folder(repo_id, folder_path, token=None, commit_message=None):
        calls.append(
            ("upload_folder", repo_id, str(folder_path), token, sorted(p.name for p in Path(folder_path).iterdir()))
        )

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    out = tmp_path / "push"
    flags = dict(activation="helu", conversion="none", max_train_steps=1, push_to_hub=True, hub_model_id="me/tiny")
    results = recipe().main([*clm_args(tiny, out, **flags), "--hub_token", "hf_secret"])
    assert calls[0] == ("create_repo", "me/tiny", "hf_secret", True) and calls[1] == ("load",)
    upload = calls[-1]
    assert upload[:4] == ("upload_folder", "me/tiny", str(out / "model_relu"), "hf_secret")
    assert "README.md" in upload[4] and "model.safetensors" in upload[4]
    assert "hf_secret" not in (out / "results.json").read_text() and results["status"] == "complete"
    card = (out / "model_relu" / "README.md").read_text()
    assert "hf_secret" not in card and "--hub_token '***'" in card and "python recipes/run_clm.py" in card


def test_a_gguf_file_is_read_by_hf_helus_loader(tmp_path, tiny, one_thread):
    """--model_name_or_path FILE.gguf (hf_helu's own loader, dequantized to float32): the perplexity equals the
    reference computed on the stock model the file was written from, with the tokenizer stored in the file."""
    from gguf_helpers import tiny_llama_lm, write_tiny_gguf
    from transformers import AutoTokenizer

    model = tiny_llama_lm()
    gguf = write_tiny_gguf(model, tmp_path / "tiny.gguf")
    stock = tmp_path / "stock"
    model.save_pretrained(stock)
    AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf").save_pretrained(stock)
    results = recipe().main(clm_args(tiny, tmp_path / "eval", model_name_or_path=gguf, eval_only=True))
    assert results["model"]["gguf_file"] == "tiny.gguf"
    reference = reference_perplexity(stock, tiny["valid"], 20 * BLOCK)
    assert results["perplexity"]["original"] == pytest.approx(reference, rel=1e-5)
