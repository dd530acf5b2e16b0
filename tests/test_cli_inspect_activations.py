"""``hf-helu inspect-activations``: exact token counts on the packaged MiniLM and a GLUE dev set; bad input."""

import json

import pytest
from helpers import GLUE_DIR, MINILM, needs_glue, needs_minilm
from transformers import AutoTokenizer

from hf_helu.cli import main
from hf_helu.cli.texts import read_texts


@needs_minilm
@needs_glue
def test_inspect_activations_cli_on_the_real_checkpoint(tmp_path, capsys):
    checkpoint = str(MINILM)
    out = tmp_path / "stats.json"
    argv = ["inspect-activations", checkpoint, "--data", str(GLUE_DIR / "STS-B"), "--max-samples", "12"]
    argv += ["--batch-size", "5", "--alpha", "0.05", "--json", str(out), "--device", "cpu"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("intermediate_act_fn") == 6
    data = json.loads(out.read_text())
    pairs = read_texts(GLUE_DIR / "STS-B")[:12]
    encoded = AutoTokenizer.from_pretrained(checkpoint)(
        [a for a, _ in pairs], [b for _, b in pairs], truncation=True, max_length=128
    )
    tokens = sum(len(ids) for ids in encoded["input_ids"])  # padding excluded
    assert [layer["tokens"] for layer in data["layers"]] == [tokens] * 6
    assert all(layer["units"] == 1536 and layer["band_fraction"] > 0 for layer in data["layers"])
    assert data["zero_fraction"] < 0.01  # GELU outputs are (almost) never exactly 0

    assert main(["inspect-activations", checkpoint, "--data", str(tmp_path / "missing.tsv")]) == 2
    assert "missing.tsv" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--alpha", "-1", "argument --alpha: HeLU alpha must be >= 0"),
        ("--max-samples", "0", "argument --max-samples: expected an integer > 0, got '0'"),
        ("--batch-size", "x", "argument --batch-size: expected an integer > 0, got 'x'"),
    ],
)
def test_bad_options_exit_with_usage_before_loading_anything(option, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect-activations", str(tmp_path / "no-model"), "--data", str(tmp_path), option, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage: hf-helu inspect-activations" in err and message in err


def test_unwritable_json_path_is_refused_before_any_work(tmp_path, capsys, monkeypatch):
    import hf_helu.cli.inspect_activations as command

    loads = []
    monkeypatch.setattr(command, "load_checkpoint", lambda folder: loads.append(folder))
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    data = tmp_path / "texts.txt"
    data.write_text("one text\n")
    for json_path, message in ((blocker / "stats.json", "is a file, not a folder"), (tmp_path, "is a folder")):
        argv = ["inspect-activations", str(MINILM), "--data", str(data), "--json", str(json_path), "--device", "cpu"]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("hf-helu inspect-activations: error: ") and message in err and str(json_path) in err
    assert loads == []  # refused before the checkpoint was loaded
