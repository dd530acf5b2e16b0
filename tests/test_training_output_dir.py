"""The output folder guard (recipe_support.output_dir): a folder no run made is refused, an earlier run's files are
removed only when told (all of them, and only them), one run at a time holds the lock, the folder is checked writable,
and temp copies left by killed writers are removed."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO
from recipe_support.output_dir import LOCK_FILE, MARKER_FILE, claim_output_dir

from hf_helu.errors import UsageError

RECIPES = REPO / "recipes"  # recipe_support lives there


class OneProcess:
    """The few Accelerator members the guard uses, for one process."""

    is_main_process = True
    num_processes = 1


def claim(out: Path, inputs=(), **flags):
    settings = {"overwrite_output_dir": False, "resume_from_checkpoint": None, "eval_only": False, **flags}
    return claim_output_dir(OneProcess(), argparse.Namespace(output_dir=out, **settings), inputs)


def earlier_helu_run(out: Path) -> None:
    """What a finished HeLU run leaves: marker, results, checkpoints, model and its ReLU export."""
    with claim(out):
        pass
    for folder in ("model", "model_relu", "checkpoints/epoch_1"):
        (out / folder).mkdir(parents=True)
        (out / folder / "config.json").write_text("{}")
    (out / "checkpoints" / "epoch_1" / "trainer_state.json").write_text('{"completed_steps": 3}')
    (out / "results.json").write_text('{"status": "complete"}')


def names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_a_folder_no_run_made_is_refused_and_overwrite_removes_only_run_files(tmp_path):
    out = tmp_path / "out"
    (out / "model").mkdir(parents=True)
    (out / "model" / "mine.txt").write_text("mine")
    (out / "notes.txt").write_text("notes")
    for flags in ({}, {"eval_only": True}, {"resume_from_checkpoint": "latest"}):
        with pytest.raises(UsageError, match=rf"{out} is not empty and no hf_helu run made it .* notes.txt"):
            claim(out, **flags)
    assert names(out) == ["model", "notes.txt"] and (out / "model" / "mine.txt").read_text() == "mine"
    with claim(out, overwrite_output_dir=True):
        pass
    assert names(out) == sorted([LOCK_FILE, MARKER_FILE, "notes.txt"])  # model/ is a run's; notes.txt is not
    assert json.loads((out / MARKER_FILE).read_text())["made_by"] == "hf_helu"


def test_an_earlier_run_needs_resume_or_overwrite_and_overwrite_removes_all_of_it(tmp_path):
    out = tmp_path / "run"
    earlier_helu_run(out)
    with pytest.raises(UsageError, match=r"already holds a run .* --resume_from_checkpoint latest .* --overwrite"):
        claim(out)
    with claim(out, resume_from_checkpoint="latest"):  # continues it: nothing removed
        pass
    with claim(out, eval_only=True):  # writes eval_results.json: nothing removed
        pass
    assert names(out) == sorted([LOCK_FILE, MARKER_FILE, "checkpoints", "model", "model_relu", "results.json"])
    with claim(out, overwrite_output_dir=True):  # e.g. a ReLU run now: no stale model_relu/ beside its model/
        pass
    assert names(out) == sorted([LOCK_FILE, MARKER_FILE])


def test_checkpoints_of_an_older_version_can_be_resumed(tmp_path):
    (tmp_path / "checkpoints" / "step_2").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_2" / "trainer_state.json").write_text('{"completed_steps": 2}')
    with pytest.raises(UsageError, match="no hf_helu run made it"):
        claim(tmp_path)
    with claim(tmp_path, resume_from_checkpoint="latest"):
        pass
    assert (tmp_path / MARKER_FILE).is_file() and (tmp_path / "checkpoints" / "step_2").is_dir()


def test_overwrite_never_deletes_what_the_run_reads(tmp_path):
    earlier_helu_run(tmp_path)
    with pytest.raises(UsageError, match=r"would delete .*model, which this run reads"):
        claim(tmp_path, inputs=[tmp_path / "model"], overwrite_output_dir=True)
    assert (tmp_path / "model" / "config.json").is_file()


HOLD = """
import sys, time
from argparse import Namespace
from pathlib import Path
sys.path.insert(0, sys.argv[2])
from recipe_support.output_dir import claim_output_dir

class OneProcess:
    is_main_process, num_processes = True, 1

flags = Namespace(output_dir=Path(sys.argv[1]), overwrite_output_dir=False, resume_from_checkpoint=None,
                  eval_only=False)
with claim_output_dir(OneProcess(), flags):
    print("holding", flush=True)
    time.sleep(120)
"""


def test_a_second_run_into_a_held_folder_fails_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "busy"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out), str(RECIPES)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(UsageError, match=rf"{out} is in use by another run \(pid {holder.pid}\)"):
            claim(out)
        with pytest.raises(UsageError, match="in use by another run"):
            claim(out, eval_only=True)
    finally:
        holder.kill()  # a killed holder's lock goes with it
        holder.wait()
    with claim(out):
        with claim(out):  # this process's own claim again (a recipe, then fit): counted, not refused
            pass
        assert (out / LOCK_FILE).read_text().strip() == str(os.getpid())


def test_an_unwritable_folder_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UsageError, match=rf"--output_dir {blocker / 'out'} is not a writable folder"):
        claim(blocker / "out")
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    try:
        if writable(read_only):  # root ignores modes: use a folder of a read-only mount, if there is one
            read_only = Path("/sys/fs")
            if not read_only.is_dir() or writable(read_only):
                pytest.skip("no read-only folder to test with")
        with pytest.raises(UsageError, match=rf"--output_dir {read_only} is not a writable folder"):
            claim(read_only)
    finally:
        (tmp_path / "ro").chmod(0o755)


def writable(folder: Path) -> bool:
    try:
        (folder / ".probe").write_bytes(b"")
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


def test_temp_copies_of_a_killed_save_are_removed_at_the_next_start(tmp_path):
    earlier_helu_run(tmp_path)
    killed = [".model.k3j4h5.tmp", f".model_relu.{os.getpid()}.a1b2.tmp", ".results.json.zz9.tmp"]
    for name in killed:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"\0" * 4096)
    (tmp_path / "checkpoints" / ".step_8.tmp").mkdir()
    (tmp_path / ".mine.tmp").write_text("a user's file, no run's temp")
    with claim(tmp_path, resume_from_checkpoint="latest"):
        pass
    assert names(tmp_path) == [".hf_helu_run.json", ".hf_helu_run.lock", ".mine.tmp", "checkpoints", "model",
                               "model_relu", "results.json"]  # fmt: skip
    assert names(tmp_path / "checkpoints") == ["epoch_1"]
