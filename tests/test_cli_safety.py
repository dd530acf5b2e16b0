"""What ``hf-helu`` guarantees about SRC and DST: DST never aliases SRC, no link is followed out of SRC, a DST that
cannot be written is refused before the load, and of two writers of one DST one wins and the other is refused."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import filelock
import pytest
import transformers
from cli_helpers import leftovers, save_bert_checkpoint

import hf_helu.cli.common as common
from hf_helu.cli import main
from hf_helu.cli.destination import lock_path
from hf_helu.cli.extras import copy_extras

pytestmark = pytest.mark.usefixtures("one_thread")


def _snapshot(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (links not followed) with a digest of its bytes, or what a link says."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = Path(root) / name
            relative = str(path.relative_to(folder))
            if path.is_symlink():
                found[relative] = "-> " + os.readlink(path)
            elif path.is_file():
                found[relative] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[relative] = "folder"
    return found


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if a command gets as far as loading the weights."""

    def refuse(folder):
        raise AssertionError(f"the checkpoint in {folder} was loaded before the request was refused")

    monkeypatch.setattr(common, "load_checkpoint", refuse)


@pytest.fixture
def user_src(tmp_path) -> Path:
    """A checkpoint folder that also holds the user's own files, which no command may ever delete."""
    src = save_bert_checkpoint(tmp_path / "src")
    (src / "onnx").mkdir()
    (src / "onnx" / "model.onnx").write_bytes(b"the user's onnx export")
    (src / "notes.pt").write_bytes(b"the user's tensors")
    return src


def _aliases(src: Path, tmp_path: Path) -> dict[str, str]:
    """DST arguments that all lead to SRC or into it, or hold it, through paths and links either way."""
    (tmp_path / "link_to_src").symlink_to(src)
    (tmp_path / "link_to_parent").symlink_to(tmp_path)
    return {
        "the same path": str(src),
        "the same folder spelled otherwise": str(src / ".." / src.name) + "/",
        "a link to SRC": str(tmp_path / "link_to_src"),
        "inside SRC through a link": str(tmp_path / "link_to_src" / "sub"),
        "a link holding SRC": str(tmp_path / "link_to_parent"),
    }


@pytest.mark.parametrize(
    "command",
    [["patch"], ["export"], ["export", "--onnx"], ["convert", "--data", "/nonexistent/texts.txt"]],
    ids=["patch", "export", "export-onnx", "convert"],
)
def test_dst_aliasing_src_is_refused_whatever_the_flags(command, user_src, tmp_path, capsys, no_load):
    before = _snapshot(user_src)
    for case, dst in _aliases(user_src, tmp_path).items():
        assert main([command[0], str(user_src), dst, *command[1:], "--overwrite"]) == 2, case
        err = capsys.readouterr().err
        assert "error: DST" in err and ("is SRC" in err or "inside SRC" in err or "holds SRC" in err), (case, err)
        assert _snapshot(user_src) == before, case
    # SRC given through a link to DST's folder: the same folder again
    (tmp_path / "src_link").symlink_to(user_src)
    assert main([command[0], str(tmp_path / "src_link"), str(user_src), *command[1:], "--overwrite"]) == 2
    assert "is SRC" in capsys.readouterr().err
    assert _snapshot(user_src) == before


def test_links_out_of_src_are_refused_before_loading(tmp_path, capsys, no_load):
    secret = tmp_path / "secret.txt"
    secret.write_text("not part of any model")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "big.bin").write_bytes(b"x" * 1000)
    cases = {"notes.txt": secret, "data": tmp_path / "data", "dangling.txt": tmp_path / "missing"}
    for name, target in cases.items():
        src = save_bert_checkpoint(tmp_path / f"src_{name}")
        (src / name).symlink_to(target)
        dst = tmp_path / f"dst_{name}"
        assert main(["patch", str(src), str(dst)]) == 2
        err = capsys.readouterr().err
        assert f"SRC holds the link {name!r} -> {str(target)!r}" in err and "never follows links out of SRC" in err
        assert not dst.exists() and not leftovers(tmp_path, dst.name)


def test_links_inside_src_are_copied_without_leaving_it(tmp_path, capsys):
    src = save_bert_checkpoint(tmp_path / "src")
    (src / "loop").symlink_to(".")  # walking it would copy SRC into itself until the disk is full
    (src / "1_Pooling" / "up").symlink_to("..")
    (src / "pooling").symlink_to(src / "1_Pooling")  # absolute, to a folder inside SRC
    (src / "vocab_alias.txt").symlink_to("vocab.txt")
    dst = tmp_path / "dst"
    assert main(["patch", str(src), str(dst)]) == 0, capsys.readouterr().err
    assert os.readlink(dst / "loop") == "." and os.readlink(dst / "1_Pooling" / "up") == ".."
    assert os.readlink(dst / "pooling") == "1_Pooling"  # relative: it points inside DST, not back into SRC
    assert (dst / "pooling").resolve() == (dst / "1_Pooling").resolve()
    assert not (dst / "vocab_alias.txt").is_symlink() and (dst / "vocab_alias.txt").read_text() == "[PAD]\n[UNK]\n"
    assert sum(1 for _ in dst.rglob("*.safetensors")) == 1  # the weights once, not once per loop level


def test_hub_snapshot_links_to_its_blobs_are_followed(tmp_path):
    repo = tmp_path / "hub" / "models--org--name"
    (repo / "blobs").mkdir(parents=True)
    (repo / "blobs" / "0a1b").write_text("[PAD]\n")
    snapshot = repo / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    (snapshot / "vocab.txt").symlink_to("../../blobs/0a1b")
    (snapshot / "config.json").symlink_to("../../blobs/missing")  # never copied: save_pretrained writes it
    dst = tmp_path / "dst"
    dst.mkdir()
    assert copy_extras(snapshot, dst) == ["vocab.txt"]
    assert not (dst / "vocab.txt").is_symlink() and (dst / "vocab.txt").read_text() == "[PAD]\n"
    (tmp_path / "outside").write_text("elsewhere")
    (snapshot / "extra.txt").symlink_to(tmp_path / "outside")  # outside the repository: still refused
    with pytest.raises(ValueError, match=r"'extra\.txt'"):
        copy_extras(snapshot, tmp_path / "dst")


def test_a_fifo_in_src_is_refused(tmp_path):
    src = save_bert_checkpoint(tmp_path / "src")
    os.mkfifo(src / "pipe")  # shutil.copy2 raised SpecialFileError (a traceback) on it
    with pytest.raises(ValueError, match="'pipe', which is no file, folder or link"):
        copy_extras(src, tmp_path)


def test_unknown_architecture_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    src = save_bert_checkpoint(tmp_path / "src")
    config = transformers.BertConfig.from_pretrained(src)
    config.architectures = ["FrobnicateForSequenceClassification"]
    config.save_pretrained(src)
    loads = []
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", lambda *a, **k: loads.append(a))
    for argv in (["patch", str(src), str(tmp_path / "dst")], ["inspect", str(src)]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "'FrobnicateForSequenceClassification'" in err and "drop its task head" in err
    assert loads == [] and not (tmp_path / "dst").exists() and not lock_path(str(tmp_path / "dst")).exists()


@pytest.mark.parametrize("command", ["convert", "inspect-activations"])
def test_a_model_that_takes_no_text_is_refused_before_loading(command, tmp_path, capsys, monkeypatch):
    import hf_helu.cli.inspect_activations as inspect_activations

    monkeypatch.setattr(inspect_activations, "load_checkpoint", lambda folder: pytest.fail("loaded"))
    texts = tmp_path / "texts.txt"
    texts.write_text("one text\n")
    configs = {
        "whisper": (transformers.WhisperConfig(architectures=["WhisperForConditionalGeneration"]), "input_features"),
        "wav2vec2": (transformers.Wav2Vec2Config(), "input_values"),  # no architectures: AutoModel's class
    }
    for name, (config, takes) in configs.items():
        config.save_pretrained(tmp_path / name)
        dst = [str(tmp_path / f"{name}_out")] if command == "convert" else []
        assert main([command, str(tmp_path / name), *dst, "--data", str(texts)]) == 2
        err = capsys.readouterr().err
        assert f"error: {tmp_path / name} holds a" in err and f"whose input is {takes!r}, not text" in err, err


@pytest.fixture
def unwritable_folder(tmp_path) -> Path:
    """A folder this process cannot create entries in (root ignores permission bits: then sysfs's root)."""
    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        for candidate in (folder, Path("/sys")):
            probe = candidate / ".hf_helu_test_probe"
            try:
                probe.mkdir()
            except OSError:
                yield candidate
                return
            probe.rmdir()
        pytest.skip("no unwritable folder available")
    finally:
        folder.chmod(0o755)


def test_unwritable_dst_is_refused_before_loading(unwritable_folder, tmp_path, capsys, no_load):
    src = save_bert_checkpoint(tmp_path / "src")
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    cases = {
        str(unwritable_folder / "hf_helu_dst"): "is not writable",
        str(unwritable_folder / "hf_helu_dst" / "deeper"): "is not writable",
        str(blocker / "dst"): "is a file, not a folder",
    }
    for dst, message in cases.items():
        for command in (["patch"], ["export", "--onnx"]):
            assert main([command[0], str(src), dst, *command[1:]]) == 2
            err = capsys.readouterr().err
            assert f"cannot write DST {dst!r}" in err and message in err, err


def test_a_dst_being_written_refuses_a_second_writer(tmp_path, capsys, no_load):
    src = save_bert_checkpoint(tmp_path / "src")
    dst = tmp_path / "dst"
    with filelock.FileLock(lock_path(str(dst))):  # what a running hf-helu holds
        assert main(["patch", str(src), str(dst), "--overwrite"]) == 2
    assert "is being written by another process" in capsys.readouterr().err
    assert not dst.exists()


@pytest.mark.slow
def test_two_writers_of_one_absent_dst_one_wins(tmp_path):
    src = save_bert_checkpoint(tmp_path / "src")
    dst = tmp_path / "dst"
    argv = [sys.executable, "-m", "hf_helu.cli", "patch", str(src), str(dst)]
    writers = [
        subprocess.Popen([*argv, "--alpha", alpha], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for alpha in ("0.1", "0.2")
    ]
    done = [(w.wait(timeout=300), *w.communicate()) for w in writers]
    assert sorted(code for code, _, _ in done) == [0, 2], done
    winner = next(out for code, out, _ in done if code == 0)
    loser = next(err for code, _, err in done if code == 2)
    assert "being written by another process" in loser or "not empty" in loser or "appeared while" in loser
    alpha = transformers.BertConfig.from_pretrained(dst).hidden_act
    assert f"'gelu' -> '{alpha}'" in winner  # DST holds the winner's model, untouched by the loser
    assert not leftovers(tmp_path, "dst")
