"""Atomic writes leave either the old content or the new one, never a partial file or folder."""

import json

import pytest

from hf_helu.atomic import atomic_directory, atomic_write_json, atomic_write_text


def test_write_json_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "results.json"
    atomic_write_json(target, {"a": 1})
    atomic_write_json(target, {"a": 2, "b": [1.5]})
    assert json.loads(target.read_text()) == {"a": 2, "b": [1.5]}
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.json"]


def test_failed_write_keeps_old_content(tmp_path):
    target = tmp_path / "results.json"
    atomic_write_text(target, "old")
    with pytest.raises(TypeError):
        atomic_write_text(target, object())  # not a str: fails while writing
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_directory_is_all_or_nothing(tmp_path):
    dst = tmp_path / "model"
    with pytest.raises(RuntimeError), atomic_directory(dst) as tmp:
        (tmp / "weights.bin").write_text("half")
        raise RuntimeError("killed mid-save")
    assert not dst.exists() and list(tmp_path.iterdir()) == []

    with atomic_directory(dst) as tmp:
        (tmp / "weights.bin").write_text("full")
    assert (dst / "weights.bin").read_text() == "full"

    with pytest.raises(FileExistsError, match="not empty"), atomic_directory(dst):
        pass
    with atomic_directory(dst, overwrite=True) as tmp:
        (tmp / "other.bin").write_text("new")
    assert [p.name for p in dst.iterdir()] == ["other.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
