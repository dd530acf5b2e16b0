"""``hf-helu`` on ordinary mistakes: only a UsageError is an ``error:`` line (a bug keeps its traceback); thin data,
positions beyond the model's, missing or unexpected weights, a GGUF model with no FFN and a DST that cannot be
replaced are refused before anything is written; the saved model has its own model card; conversion says what it
plans and shows its progress."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import transformers
from cli_helpers import leftovers, save_bert_checkpoint
from gguf_helpers import tiny_llama_lm, write_tiny_gguf
from safetensors.torch import load_file, save_file
from test_cli_convert import write_sentences

import hf_helu.atomic as atomic
import hf_helu.cli.common as common
from hf_helu.cli import main
from hf_helu.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def no_load(monkeypatch):
    def refuse(folder):
        raise AssertionError(f"the checkpoint in {folder} was loaded before the request was refused")

    monkeypatch.setattr(common, "load_checkpoint", refuse)


def t5_dir(tmp_path: Path, tokenizer_dir: Path) -> Path:
    """A tiny gated T5 (encoder-decoder: its forward needs decoder inputs) with a text tokenizer."""
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=30522, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu"
    )
    folder = tmp_path / "t5"
    transformers.T5ForConditionalGeneration(config).save_pretrained(folder)
    transformers.AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    return folder


def test_a_bug_keeps_its_traceback_and_only_usage_errors_are_error_lines(tmp_path, tiny_bert_dir, capsys):
    """transformers' ValueError from a forward without decoder inputs is no user error: it propagates (exit 1)."""
    write_sentences(tmp_path / "fit.txt", 200, seed=0)
    dst = tmp_path / "dst"
    with pytest.raises(ValueError, match="input_ids or inputs_embeds") as raised:
        main(["convert", str(t5_dir(tmp_path, tiny_bert_dir)), str(dst), "--data", str(tmp_path / "fit.txt")])
    assert not isinstance(raised.value, UsageError)
    assert not dst.exists() and leftovers(tmp_path, "dst") == []


def test_thin_data_is_refused_with_its_figures(tmp_path, tiny_bert_dir, capsys):
    write_sentences(tmp_path / "few.txt", 12, seed=0)
    dst = tmp_path / "dst"
    assert main(["convert", str(tiny_bert_dir), str(dst), "--data", str(tmp_path / "few.txt")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "fewer than the 650" in err and "fit tokens" in err
    assert not dst.exists()


def test_max_length_beyond_the_models_positions_is_refused_before_loading(tmp_path, tiny_bert_dir, capsys, no_load):
    write_sentences(tmp_path / "fit.txt", 20, seed=0)
    argv = ["convert", str(tiny_bert_dir), str(tmp_path / "dst"), "--data", str(tmp_path / "fit.txt")]
    assert main([*argv, "--max-length", "129"]) == 2
    assert "--max-length 129 exceeds the 128 positions" in capsys.readouterr().err


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_a_folder_with_missing_or_unexpected_weights_is_refused_naming_them(change, tmp_path, capsys):
    src = save_bert_checkpoint(tmp_path / "src")
    weights = load_file(src / "model.safetensors")
    name = "bert.encoder.layer.1.output.dense.weight"
    if change == "missing":
        del weights[name]
    else:
        weights[name := "bert.encoder.layer.1.extra.weight"] = torch.zeros(2)
    save_file(weights, src / "model.safetensors", metadata={"format": "pt"})
    dst = tmp_path / "dst"
    assert main(["patch", str(src), str(dst)]) == 2
    err = capsys.readouterr().err
    assert f"1 weight(s) {change}" in err and name.removeprefix("bert.") in err
    assert not dst.exists() and leftovers(tmp_path, "dst") == []


def test_a_gguf_file_missing_a_weight_is_refused_naming_it(tmp_path, capsys):
    pytest.importorskip("gguf")
    folder = tmp_path / "gguf"
    folder.mkdir()
    write_tiny_gguf(tiny_llama_lm(), folder / "tiny.gguf", leave_out=("model.layers.1.mlp.down_proj.weight",))
    dst = tmp_path / "dst"
    assert main(["patch", str(folder / "tiny.gguf"), str(dst)]) == 2
    err = capsys.readouterr().err
    assert "missing" in err and "model.layers.1.mlp.down_proj.weight" in err
    assert not dst.exists()


def write_mamba_gguf(path: Path) -> Path:
    """A GGUF file whose header says architecture "mamba" (a state-space model: no FFN activation)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_context_length(64)
    writer.add_embedding_length(16)
    writer.add_block_count(1)
    writer.add_feed_forward_length(0)
    writer.add_head_count(0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(4)
    writer.add_ssm_conv_kernel(4)
    writer.add_ssm_inner_size(32)
    writer.add_ssm_state_size(8)
    writer.add_ssm_time_step_rank(2)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(["a", "b", "<s>", "</s>"])
    writer.add_token_types([1, 1, 3, 3])
    writer.add_token_scores([0.0] * 4)
    writer.add_token_merges([])
    writer.add_tensor("token_embd.weight", np.zeros((4, 16), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_a_gguf_model_without_ffn_is_refused_from_its_header_before_the_weights_load(tmp_path, capsys, monkeypatch):
    pytest.importorskip("gguf")
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    write_mamba_gguf(tmp_path / "mamba.gguf")
    loaded = []
    real = gguf_utils.load_gguf_checkpoint

    def spy(path, return_tensors=False, **kwargs):
        loaded.append(return_tensors)
        return real(path, return_tensors=return_tensors, **kwargs)

    monkeypatch.setattr(gguf_utils, "load_gguf_checkpoint", spy)
    assert main(["patch", str(tmp_path / "mamba.gguf"), str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err
    assert "MambaForCausalLM" in err and "'mamba'" in err and "no FFN activation module" in err
    assert True not in loaded  # the metadata only: no tensor was read


def test_an_unsupported_gguf_architecture_is_refused_from_the_header(tmp_path, capsys, no_load):
    pytest.importorskip("gguf")
    import gguf

    writer = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "rwkv9")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert main(["patch", str(tmp_path / "odd.gguf"), str(tmp_path / "dst")]) == 2
    assert "architecture 'rwkv9'" in capsys.readouterr().err


@pytest.mark.parametrize("order", ["first", "after a vocabulary", "big-endian"])
def test_the_header_reader_finds_the_architecture_the_gguf_package_reads(order, tmp_path):
    gguf = pytest.importorskip("gguf")
    from hf_helu.sources import gguf_architecture

    path = tmp_path / "m.gguf"
    endianess = gguf.GGUFEndian.BIG if order == "big-endian" else gguf.GGUFEndian.LITTLE
    writer = gguf.GGUFWriter(str(path), "qwen2", endianess=endianess)
    writer.add_uint32("test.number", 7)
    writer.add_token_list(["a", "bc", "<s>"])
    writer.add_token_scores([0.0, 1.0, 2.0])
    writer.add_array("test.nested", [[1, 2], [3]])
    if order == "after a vocabulary":  # writers put it first; a reader must not depend on that
        writer.kv_data[0]["general.architecture"] = writer.kv_data[0].pop("general.architecture")
        assert list(writer.kv_data[0])[-1] == "general.architecture"
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert gguf_architecture(path) == gguf.GGUFReader(path).fields["general.architecture"].contents() == "qwen2"


def test_the_header_reader_refuses_what_is_no_gguf_file(tmp_path):
    from hf_helu.sources import gguf_architecture

    (tmp_path / "x.gguf").write_bytes(b"GGML\x03\x00\x00\x00" + bytes(16))
    with pytest.raises(UsageError, match="is not a GGUF file"):
        gguf_architecture(tmp_path / "x.gguf")
    header = b"GGUF" + (3).to_bytes(4, "little") + bytes(8)  # version 3, no tensor
    (tmp_path / "cut.gguf").write_bytes(header + (1).to_bytes(8, "little") + b"\x05")  # 1 entry, cut short
    with pytest.raises(UsageError, match="is not a GGUF file"):
        gguf_architecture(tmp_path / "cut.gguf")
    (tmp_path / "none.gguf").write_bytes(header + bytes(8))  # no entry
    with pytest.raises(UsageError, match=r"has no general\.architecture"):
        gguf_architecture(tmp_path / "none.gguf")


def test_an_existing_dst_that_cannot_be_replaced_is_refused_before_loading(tmp_path, capsys, monkeypatch, no_load):
    """Root ignores permission bits: the refusal is checked with os.access answering as for another user."""
    src = save_bert_checkpoint(tmp_path / "src")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("x")
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == dst else real(p, mode, **kw))
    assert main(["patch", str(src), str(dst), "--overwrite"]) == 2
    assert "the existing folder is not writable" in capsys.readouterr().err
    assert (dst / "old.txt").read_text() == "x"


def test_a_dst_swap_that_fails_leaves_dst_and_no_temp_copy(tmp_path, capsys, monkeypatch):
    src = save_bert_checkpoint(tmp_path / "src")
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "old.txt").write_text("x")
    real = os.replace

    def refuse_into_dst(a, b):  # the new folder cannot take DST's place; putting the old one back works
        if Path(b) == dst and str(a).endswith(".tmp"):
            raise PermissionError(13, "Permission denied", str(b))
        return real(a, b)

    monkeypatch.setattr(atomic.os, "replace", refuse_into_dst)
    assert main(["patch", str(src), str(dst), "--overwrite"]) == 2
    assert "cannot write DST" in capsys.readouterr().err
    assert sorted(p.name for p in dst.iterdir()) == ["old.txt"] and leftovers(tmp_path, "dst") == []


def test_convert_plans_shows_progress_and_writes_its_own_model_card(tmp_path, tiny_bert_dir, capsys, monkeypatch):
    kept = []  # the command keeps freed heap pages for its process (tests/test_conversion_heap.py checks the effect)
    monkeypatch.setattr("hf_helu.cli.convert.keep_freed_memory", lambda: kept.append(True) or True)
    src = tmp_path / "src"
    transformers.BertModel.from_pretrained(tiny_bert_dir).save_pretrained(src)
    transformers.AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(src)
    (src / "README.md").write_text("# The source's card: GLUE 99.9\n")
    write_sentences(tmp_path / "fit.txt", 240, seed=0)
    dst = tmp_path / "dst"
    assert main(["convert", str(src), str(dst), "--data", str(tmp_path / "fit.txt"), "--alpha", "0.1"]) == 0
    assert kept == [True]
    captured = capsys.readouterr()
    assert "calibrating on" in captured.err and "minutes (estimate)" in captured.err
    assert "tokens/s" in captured.err and "2/2" in captured.err  # the progress bar, one step per layer
    card = (dst / "README.md").read_text()
    assert "GLUE 99.9" not in card
    assert str(src) in card and "alpha 0.1" in card and "calibrate" in card
    fit_tokens = captured.err.split("calibrating on ")[1].split(" tokens")[0]
    assert f"calibration tokens (fit): {fit_tokens}" in card
    assert "ffn_relative_error" in card and "kept: True" in card
    assert main(["patch", str(src), str(tmp_path / "patched")]) == 0
    assert "hf-helu patch" in (tmp_path / "patched" / "README.md").read_text()


@pytest.fixture(params=["bind mount", "resolve blind to the alias"])
def second_path_to_src(request, tmp_path, monkeypatch):
    """(SRC, another path to the same folder that path resolution does not reveal): a bind mount where this process
    may mount (root), else the same situation made with a link and a resolve() that does not follow it."""
    src = save_bert_checkpoint(tmp_path / "src")
    alias = tmp_path / "alias"
    if request.param == "bind mount":
        import subprocess

        alias.mkdir()
        if subprocess.run(["mount", "--bind", str(src), str(alias)], capture_output=True).returncode != 0:
            pytest.skip("bind mounts need root")
        try:
            yield src, alias
        finally:
            subprocess.run(["umount", str(alias)], check=True)
    else:
        alias.symlink_to(src)
        monkeypatch.setattr(Path, "resolve", lambda self, strict=False: self.absolute())
        yield src, alias


def test_dst_reaching_src_by_a_path_resolution_cannot_see_is_refused(second_path_to_src, capsys, no_load):
    """The (device, inode) comparison: resolved paths differ, the folder is the same."""
    src, alias = second_path_to_src
    assert src.resolve() != alias.resolve()
    assert main(["patch", str(src), str(alias), "--overwrite"]) == 2
    assert "is SRC" in capsys.readouterr().err
    assert (src / "model.safetensors").is_file()


def test_convert_batches_by_length_and_holds_out_the_last_eighth_of_the_texts(tiny_bert_dir):
    """Sorting by length changes the padding only: the fitted texts are those of the file's first 22 batches of 32,
    the held-out ones those of its last 3 (what split_holdout would keep out of the batches in file order)."""
    from hf_helu.cli.convert import fit_and_held_out

    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_bert_dir)
    texts = [(" ".join(["word"] * (1 + (i * 7) % 40)), None) for i in range(800)]
    fit, held_out = fit_and_held_out(tokenizer, texts, 32, 128)
    assert (len(fit), len(held_out)) == (22, 3)

    def lengths(batches):
        return sorted(int(n) for b in batches for n in b["attention_mask"].sum(1))

    def plain(part):
        return sorted(len(tokenizer(a)["input_ids"]) for a, _ in part)

    assert lengths(fit) == plain(texts[:704]) and lengths(held_out) == plain(texts[704:])
    padded = sum(b["input_ids"].numel() for b in fit)
    assert padded < 1.1 * sum(lengths(fit))  # in file order the batches would pad to 1.86x
