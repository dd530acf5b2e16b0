"""``hf_helu.cli.common``: what every command does with SRC (find it, read its config) and DST (atomic save)."""

from __future__ import annotations

import pytest
from cli_helpers import leftovers, save_bert_checkpoint

from hf_helu.cli import main
from hf_helu.cli.common import copy_extras

pytestmark = pytest.mark.usefixtures("one_thread")


def test_missing_folder_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nope"
    assert main(["patch", str(missing), str(tmp_path / "dst")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["inspect", str(missing)]) == 2
    assert not (tmp_path / "dst").exists()


def test_folder_that_is_not_a_model_is_a_clear_error(tmp_path, capsys):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("hello")
    assert main(["export", str(folder), str(tmp_path / "dst")]) == 2
    assert "not a transformers model folder (no config.json" in capsys.readouterr().err
    (folder / "config.json").write_text("{}")
    assert main(["inspect", str(folder)]) == 2
    assert "config.json transformers cannot read" in capsys.readouterr().err
    assert not (tmp_path / "dst").exists() and not leftovers(tmp_path, "dst")


def test_hub_id_offline_is_a_clear_error(tmp_path, capsys):
    assert main(["inspect", "hf-helu-tests/does-not-exist-anywhere"]) == 2
    assert "Hugging Face Hub" in capsys.readouterr().err


def test_copy_extras_copies_what_save_pretrained_does_not_write(tmp_path):
    src = save_bert_checkpoint(tmp_path / "src")
    (src / ".git").mkdir()
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "vocab.txt").write_text("already there")
    assert copy_extras(src, dst) == ["1_Pooling"]
    assert (dst / "vocab.txt").read_text() == "already there"
    assert sorted(p.name for p in dst.iterdir()) == ["1_Pooling", "vocab.txt"]
