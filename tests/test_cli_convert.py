"""``hf-helu convert SRC DST --data PATH``: patch + calibration, saved atomically; on held-out text its FFN outputs are
closer to the original checkpoint's than a plain ``hf-helu patch``'s (measured with hf_helu.conversion)."""

from __future__ import annotations

import random

import pytest
import torch

import hf_helu
from hf_helu.cli import main as cli
from hf_helu.conversion import ffn_output_errors

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS_TEXT = """the a film movie story plot actor scene music great bad boring funny sad long short good best worst new
old dark bright slow fast love hate watch again never always very quite rather truly simply it is was and but"""
WORDS = WORDS_TEXT.split()


def write_sentences(path, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))) for _ in range(n)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return lines


def test_convert_beats_a_plain_patch_on_held_out_text(tmp_path, tiny_bert_dir, capsys):
    from transformers import AutoModel, AutoTokenizer

    write_sentences(tmp_path / "fit.txt", 240, seed=0)
    held_out = write_sentences(tmp_path / "held_out.txt", 60, seed=1)
    converted, patched = tmp_path / "converted", tmp_path / "patched"
    argv = ["convert", str(tiny_bert_dir), str(converted), "--data", str(tmp_path / "fit.txt"), "--samples", "200"]
    assert cli(argv) == 0
    out = capsys.readouterr().out
    assert (
        "calibrated 2 FFN output projection(s)" in out and "on 200 texts" in out and "annealing needs training" in out
    )
    assert cli(["patch", str(tiny_bert_dir), str(patched)]) == 0
    assert (converted / "tokenizer.json").is_file() or (converted / "vocab.txt").is_file()  # the extras came along

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    batches = [dict(tokenizer(held_out[i : i + 20], padding=True, return_tensors="pt")) for i in range(0, 60, 20)]
    original = AutoModel.from_pretrained(tiny_bert_dir, dtype=torch.float32)
    models = {
        name: AutoModel.from_pretrained(path, dtype=torch.float32) for name, path in (("c", converted), ("p", patched))
    }
    for model in models.values():  # `import hf_helu` is what loads them: "helu" in the config
        assert model.config.hidden_act == "helu"
        assert all(isinstance(layer.intermediate.intermediate_act_fn, hf_helu.HeLU) for layer in model.encoder.layer)
    errors = {name: ffn_output_errors(model, original, batches) for name, model in models.items()}
    assert set(errors["c"]) == {f"encoder.layer.{i}.output.dense" for i in range(2)}
    for name, plain in errors["p"].items():
        assert errors["c"][name] < plain, (name, errors["c"][name], plain)


def test_bad_data_is_refused_before_anything_is_written(tmp_path, tiny_bert_dir, capsys):
    dst = tmp_path / "dst"
    assert cli(["convert", str(tiny_bert_dir), str(dst), "--data", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err and not dst.exists()
    (tmp_path / "empty.txt").write_text("\n\n", encoding="utf-8")
    assert cli(["convert", str(tiny_bert_dir), str(dst), "--data", str(tmp_path / "empty.txt")]) == 2
    assert "no non-empty lines" in capsys.readouterr().err and not dst.exists()
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    write_sentences(tmp_path / "fit.txt", 10, seed=0)
    assert cli(["convert", str(tiny_bert_dir), str(dst), "--data", str(tmp_path / "fit.txt")]) == 2
    assert "--overwrite" in capsys.readouterr().err and sorted(p.name for p in dst.iterdir()) == ["keep.txt"]
    with pytest.raises(SystemExit):
        cli(["convert", str(tiny_bert_dir), str(dst), "--data", str(tmp_path / "fit.txt"), "--ridge", "-1"])
