"""recipes/run_clm.py --sparsity_penalty on the tiny LLaMA of test_recipe_clm: a strong penalty raises the FFN zeros
(evaluation and decoding) by at least 10 points over the same steps without it, a zero penalty ends with exactly the
weights of a run without the flag, and a negative or non-finite penalty is refused before anything is loaded."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
from helpers import REPO
from safetensors.torch import load_file
from test_recipe_clm import _run, clm_args, recipe, tiny  # noqa: F401  (tiny: the module fixture)

import hf_helu

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

COMMON = dict(activation="relu", conversion="none", max_train_steps=8)


def test_strong_penalty_raises_ffn_and_decode_zeros(tmp_path, tiny, one_thread):  # noqa: F811
    """8 steps at --sparsity_penalty 20 (warm-up 2 steps) against the same 8 steps at 0: FFN zeros on the validation
    blocks and while decoding both rise by >= 10 points; results.json logs the mean penalty term next to the loss."""
    base = recipe().main(clm_args(tiny, tmp_path / "base", **COMMON))
    sparse = recipe().main(
        clm_args(tiny, tmp_path / "sparse", **COMMON, sparsity_penalty=20.0, sparsity_warmup_steps=2)
    )
    zeros = [r["evaluations"]["final"]["ffn"]["zero_fraction"] for r in (base, sparse)]
    assert zeros[1] - zeros[0] >= 0.10, zeros
    decode = [r["decode_sparsity"]["zero_fraction"] for r in (base, sparse)]
    assert decode[1] - decode[0] >= 0.10, decode
    assert base["decode_sparsity"]["rows"] == [4 * 31] * 2  # 4 prompts x 31 decode steps, in each of 2 layers
    assert base["train"]["sparsity_penalty"] == 0.0 and sparse["train"]["sparsity_penalty"] > 0
    saved = json.loads((tmp_path / "sparse" / "results.json").read_text())
    assert saved["config"]["sparsity_penalty"] == 20.0 and saved["decode_sparsity"] == sparse["decode_sparsity"]


def test_zero_penalty_is_bit_identical_to_no_flag(tmp_path, tiny, one_thread):  # noqa: F811
    """--sparsity_penalty 0 ends with exactly the weights (and perplexity) of the same run without the flag, while
    a penalty of 1e-4 already changes them (the comparison sees a change in the loss)."""
    runs = {
        "none": {},
        "zero": {"sparsity_penalty": 0.0},
        "small": {"sparsity_penalty": 1e-4},
    }
    weights, results = {}, {}
    for name, flags in runs.items():
        results[name] = recipe().main(clm_args(tiny, tmp_path / name, **COMMON, **flags))
        weights[name] = load_file(tmp_path / name / "model" / "model.safetensors")
    assert weights["none"].keys() == weights["zero"].keys()
    assert all(torch.equal(weights["none"][k], weights["zero"][k]) for k in weights["none"])
    assert results["none"]["perplexity"] == results["zero"]["perplexity"]
    assert not all(torch.equal(weights["none"][k], weights["small"][k]) for k in weights["none"])


def test_resumed_run_keeps_the_penalty_schedule(tmp_path, tiny):  # noqa: F811
    """A penalised run (weight ramping up over 4 steps) killed after its step-2 checkpoint and resumed ends with the
    weights of the same run left alone: the schedule resumes at step 2, not at 0."""
    common = dict(**COMMON, sparsity_penalty=20.0, sparsity_warmup_steps=4, checkpointing_steps=2)
    common["max_train_steps"] = 4
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    done = _run(clm_args(tiny, whole, **common))
    assert done.returncode == 0, done.stderr[-3000:]
    crashed = _run(clm_args(tiny, broken, **common), crash_after=2)
    assert crashed.returncode == 3, crashed.stderr[-3000:]
    resumed = _run(clm_args(tiny, broken, **common, resume_from_checkpoint="latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = load_file(whole / "model" / "model.safetensors"), load_file(broken / "model" / "model.safetensors")
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6)
    results = [json.loads((run / "results.json").read_text()) for run in (whole, broken)]
    assert results[1]["train"]["sparsity_penalty"] > results[0]["train"]["sparsity_penalty"] > 0  # steps 3-4 weigh more


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"sparsity_penalty": -0.5}, "--sparsity_penalty must be a finite number >= 0 (0: off), got -0.5"),
        ({"sparsity_penalty": "nan"}, "--sparsity_penalty must be a finite number >= 0 (0: off), got nan"),
        ({"sparsity_penalty": "inf"}, "--sparsity_penalty must be a finite number >= 0 (0: off), got inf"),
        ({"sparsity_warmup_steps": -1}, "--sparsity_warmup_steps must be >= 0, got -1"),
        ({"eval_only": True, "sparsity_penalty": 0.1}, "--eval_only does not train: drop --sparsity_penalty"),
    ],
)
def test_bad_penalty_flags_are_refused_before_loading(tmp_path, tiny, flags, message):  # noqa: F811
    """Each raises a UsageError naming the flag before the model (a broken config.json here) is read and before
    OUTPUT_DIR is made."""
    broken = tmp_path / "broken_model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    out = tmp_path / "out"
    with pytest.raises(hf_helu.UsageError, match="^" + message.replace("(", r"\(").replace(")", r"\)")):
        recipe().main(clm_args(tiny, out, **{**flags, "model_name_or_path": broken}))
    assert not out.exists()


def test_negative_penalty_exits_2_as_a_script(tmp_path, tiny):  # noqa: F811
    proc = _run(clm_args(tiny, tmp_path / "out", sparsity_penalty=-1))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --sparsity_penalty must be a finite number >= 0 (0: off), got -1.0"
    ]
    assert not (tmp_path / "out").exists()


def test_protocol_script_end_to_end(tmp_path, tiny):  # noqa: F811
    """recipes/sparsity_protocol.sh with the tiny LLaMA as MODEL, 2 steps and penalties 0 and 20: ReLU and HeLU at
    each penalty (seed 0), then both at the one non-zero penalty with seed 1, then the table and plots."""
    data = tmp_path / "data" / "wikitext-2"
    data.mkdir(parents=True)
    (data / "train.txt").write_text(tiny["train"].read_text() * 4)
    (data / "valid.txt").write_text(tiny["valid"].read_text() * 4)
    out = tmp_path / "protocol"
    env = {
        **os.environ,
        "MODEL": str(tiny["model"]),
        "STEPS": "2",
        "PENALTIES": "0 20",
        "HF_HELU_DATA_DIR": str(tmp_path / "data"),
        "OMP_NUM_THREADS": "1",
    }
    script = REPO / "recipes" / "sparsity_protocol.sh"
    proc = subprocess.run(["bash", str(script), str(out)], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "second seed at penalty 20" in proc.stdout
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert runs == ["helu_p0_s0", "helu_p20_s0", "helu_p20_s1", "relu_p0_s0", "relu_p20_s0", "relu_p20_s1"]
    table = (out / "table.md").read_text().splitlines()
    assert len(table) == 2 + 6 and (out / "pareto.png").is_file() and (out / "dead_units.png").is_file()
    result = json.loads((out / "helu_p20_s1" / "results.json").read_text())
    assert result["config"]["seed"] == 1 and result["config"]["sparsity_warmup_steps"] == 1
    assert result["train"]["train_tokens"] == 2 * 4 * 256
