"""recipes/run_clm.py --sparsity_penalty on the tiny LLaMA of test_recipe_clm: a strong penalty raises the FFN zeros
(evaluation and decoding) by at least 10 points over the same steps without it, a zero penalty ends with exactly the
weights of a run without the flag, and a negative or non-finite penalty is refused before anything is loaded."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_recipe_clm import _run, clm_args, recipe, tiny  # noqa: F401  (tiny: the module-scoped fixture)

import hf_helu

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

COMMON = dict(activation="relu", conversion="none", max_steps=8)


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
        recipe().main(clm_args(tiny, out, **{**flags, "model": broken}))
    assert not out.exists()


def test_negative_penalty_exits_2_as_a_script(tmp_path, tiny):  # noqa: F811
    proc = _run(clm_args(tiny, tmp_path / "out", sparsity_penalty=-1))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --sparsity_penalty must be a finite number >= 0 (0: off), got -1.0"
    ]
    assert not (tmp_path / "out").exists()
