"""Atomic writes leave either the old content or the new one, never a partial file or folder; they honour the umask,
and the temp entries of killed writers are removed (or, for a replaced folder, restored)."""

import json
import os
import stat
import subprocess
import sys

import pytest

from hf_helu.atomic import atomic_directory, atomic_write_json, atomic_write_text, remove_stale_temps


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


def dead_pid() -> int:
    """The pid of a process that has ended (a stand-in for a writer killed mid-save)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_written_modes_honour_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "results.json", "{}")
        with atomic_directory(tmp_path / "model") as tmp:
            (tmp / "config.json").write_text("{}")
        # What open() and mkdir() give under this umask (save_pretrained's 0644 / 0755 under 022).
        (tmp_path / "plain.txt").write_text("")
        (tmp_path / "plain_dir").mkdir()
    finally:
        os.umask(old)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "results.json") == mode(tmp_path / "plain.txt") == 0o666 & ~umask
    assert mode(tmp_path / "model") == mode(tmp_path / "plain_dir") == 0o777 & ~umask


def test_temps_of_killed_writers_are_removed_and_live_ones_kept(tmp_path):
    gone, alive = dead_pid(), os.getppid()  # the pytest process's parent outlives this test
    stale = tmp_path / f".model.{gone}.x1y2.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 1024)
    (tmp_path / f".results.json.{gone}.abcd.tmp").write_text("half")
    live = tmp_path / f".model.{alive}.q9w8.tmp"
    live.mkdir()
    legacy = tmp_path / ".model.k3j4h5.tmp"  # an older version's temp folder: no pid, so not known to be stale
    legacy.mkdir()
    mine = tmp_path / ".notes.tmp"
    mine.write_text("not ours")
    with atomic_directory(tmp_path / "model") as tmp:
        (tmp / "config.json").write_text("{}")
    names = {p.name for p in tmp_path.iterdir()}
    assert stale.name not in names and live.name in names and legacy.name in names and mine.name in names
    atomic_write_json(tmp_path / "results.json", {})
    assert not (tmp_path / f".results.json.{gone}.abcd.tmp").exists()
    # In a folder no other writer uses (a locked run folder): every temp entry of the named targets goes.
    removed = remove_stale_temps(tmp_path, ["model"], any_pid=True)
    assert sorted(p.name for p in removed) == sorted([live.name, legacy.name])
    assert sorted(p.name for p in tmp_path.iterdir()) == [".notes.tmp", "model", "results.json"]


def test_a_folder_killed_between_the_renames_is_restored(tmp_path):
    old = tmp_path / f".model.old-{dead_pid()}"  # the previous model, moved aside; the new one never arrived
    old.mkdir()
    (old / "config.json").write_text('{"old": true}')
    assert remove_stale_temps(tmp_path) == []
    assert json.loads((tmp_path / "model" / "config.json").read_text()) == {"old": True}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_a_folder_made_by_another_writer_meanwhile_is_kept(tmp_path):
    dst = tmp_path / "model"
    with pytest.raises(FileExistsError, match="appeared while"), atomic_directory(dst) as tmp:
        (tmp / "config.json").write_text('{"mine": true}')
        dst.mkdir()  # the other writer finished first
        (dst / "config.json").write_text('{"theirs": true}')
    assert json.loads((dst / "config.json").read_text()) == {"theirs": True}
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temp folder left
    with atomic_directory(dst, overwrite=True) as tmp:  # overwrite: replacing it is what was asked
        (tmp / "config.json").write_text('{"mine": true}')
    assert json.loads((dst / "config.json").read_text()) == {"mine": True}


def test_a_link_at_the_target_is_replaced_never_followed(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not the writer's")
    dst = tmp_path / "model"
    dst.symlink_to(elsewhere)
    with atomic_directory(dst, overwrite=True) as tmp:
        (tmp / "config.json").write_text("{}")
    assert not dst.is_symlink() and [p.name for p in dst.iterdir()] == ["config.json"]
    assert [p.name for p in elsewhere.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "model"]  # no .model.old-<pid> link left
