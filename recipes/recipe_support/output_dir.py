"""The output folder of a run: checked writable, claimed, locked, and cleared of an earlier run before any work.

:func:`claim_output_dir` is called by each recipe before it loads data. It

- checks the folder is writable (creates and removes a probe file), so a read-only folder fails at once;
- holds an exclusive lock for the run (``filelock.FileLock`` on OUTPUT_DIR/.hf_helu_run.lock, which records the
  holder's pid): a second run into the same folder fails at once, naming the folder and that pid;
- refuses a non-empty folder no hf_helu run made (no OUTPUT_DIR/.hf_helu_run.json marker, written first), and a
  fresh start over an earlier run's artifacts, unless ``overwrite`` (then those artifacts, and only those, are
  removed: a stale model_relu/ never sits beside a new model/);
- removes the temp copies killed writers left (a hidden 87 MB model after a kill -9 during the final save).

An evaluation-only run never removes anything: it writes its own eval_results.json.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from hf_helu.atomic import atomic_write_json, remove_stale_temps
from hf_helu.errors import UsageError
from recipe_support.results import (
    EVAL_PREDICTIONS_FILE,
    EVAL_RESULTS_FILE,
    MODEL_DIR,
    PREDICTIONS_FILE,
    RELU_SUFFIX,
    RESULTS_FILE,
)
from recipe_support.training import CHECKPOINTS_DIR, LOGS_DIR, has_checkpoints

MARKER_FILE = ".hf_helu_run.json"
LOCK_FILE = ".hf_helu_run.lock"
# What a run writes into OUTPUT_DIR: all that --overwrite_output_dir removes.
RUN_ARTIFACTS = (
    CHECKPOINTS_DIR,
    LOGS_DIR,
    MODEL_DIR,
    MODEL_DIR + RELU_SUFFIX,
    RESULTS_FILE,
    EVAL_RESULTS_FILE,
    PREDICTIONS_FILE,
    EVAL_PREDICTIONS_FILE,
)
_BOOKKEEPING = (MARKER_FILE, LOCK_FILE)


# The lock of each folder this process has claimed (main process only): FileLock counts nested acquisitions.
_LOCKS: dict[Path, FileLock] = {}


def check_writable(folder: Path) -> None:
    """Create ``folder`` (and its parents) if needed, then create and remove a probe file in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".hf_helu_probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"--output_dir {folder} is not a writable folder: {error.strerror or error}") from None


def _lock(folder: Path) -> FileLock:
    """This process's lock on ``folder`` (acquired once more if held already); the lock file records the holder."""
    lock = _LOCKS.setdefault(folder, FileLock(folder / LOCK_FILE))
    if lock.is_locked:
        lock.acquire()
        return lock
    try:
        lock.acquire(blocking=False)
    except Timeout:
        holder = (folder / LOCK_FILE).read_text().strip() or "unknown"
        raise UsageError(
            f"--output_dir {folder} is in use by another run (pid {holder}); wait for it to end or choose another "
            "--output_dir"
        ) from None
    (folder / LOCK_FILE).write_text(f"{os.getpid()}\n")
    return lock


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name not in _BOOKKEEPING)


def _refuse_foreign(folder: Path, config: Any) -> None:
    """A non-empty folder no hf_helu run made is the user's: refused unless ``overwrite``."""
    entries = _entries(folder)
    ours = (folder / MARKER_FILE).is_file() or (has_checkpoints(folder) and config.resume_from_checkpoint)
    if entries and not ours and not config.overwrite_output_dir:
        raise UsageError(
            f"--output_dir {folder} is not empty and no hf_helu run made it (no {MARKER_FILE}; it holds "
            f"{', '.join(p.name for p in entries[:5])}{', ...' if len(entries) > 5 else ''}): choose another "
            f"--output_dir, or pass --overwrite_output_dir to replace the run files in it ({', '.join(RUN_ARTIFACTS)})"
        )


def _check_contents(folder: Path, config: Any, inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The run artifacts to remove (``overwrite``), or an error saying why the folder cannot be used as it is."""
    _refuse_foreign(folder, config)
    artifacts = [p for p in _entries(folder) if p.name in RUN_ARTIFACTS]
    if config.eval_only or (config.resume_from_checkpoint and not config.overwrite_output_dir):
        return []  # eval-only writes its own file; a resume continues the run that is there
    if artifacts and not config.overwrite_output_dir:
        held = ", ".join(p.name for p in artifacts)
        raise UsageError(
            f"--output_dir {folder} already holds a run ({held}): pass --resume_from_checkpoint latest to continue "
            "it, or --overwrite_output_dir to start afresh"
        )
    wanted = [Path(p).resolve() for p in (*inputs, config.resume_from_checkpoint or "") if str(p)]
    for artifact in artifacts:
        for path in wanted:
            if path == artifact.resolve() or artifact.resolve() in path.parents:
                raise UsageError(
                    f"--overwrite_output_dir would delete {artifact}, which this run reads ({path}): copy it "
                    "elsewhere or choose another --output_dir"
                )
    return artifacts


def _claim_main(folder: Path, config: Any, inputs: Sequence[str | os.PathLike]) -> Any:
    """The main process's part: writable, locked, contents checked, old artifacts and stale temps removed."""
    check_writable(folder)
    if not (folder / LOCK_FILE).exists():
        _refuse_foreign(folder, config)  # before the lock file: a refused folder is left as it was
    lock = _lock(folder)
    if lock.lock_counter > 1:
        return lock  # this process's own claim again (a recipe, then fit): nothing more to check
    try:
        for artifact in _check_contents(folder, config, inputs):
            shutil.rmtree(artifact) if artifact.is_dir() and not artifact.is_symlink() else artifact.unlink()
        if not (folder / MARKER_FILE).is_file():
            created = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            atomic_write_json(folder / MARKER_FILE, {"made_by": "hf_helu", "created": created, "pid": os.getpid()})
        remove_stale_temps(folder, [*RUN_ARTIFACTS, MARKER_FILE], any_pid=True)
        remove_stale_temps(folder / CHECKPOINTS_DIR, any_pid=True)
    except BaseException:
        lock.release()
        raise
    return lock


def claim_output_dir(
    accelerator: Any, config: Any, inputs: Sequence[str | os.PathLike] = ()
) -> contextlib.AbstractContextManager:
    """Check, lock and prepare ``config.output_dir`` for a run (see the module doc); call before loading data.

    ``config``: the parsed flags (``output_dir``, ``overwrite_output_dir``, ``resume_from_checkpoint``, ``eval_only``).

    ``inputs``: paths the run reads (``--model``): ``overwrite`` refuses to delete them. Claiming a folder this
    process already holds only counts the claim. Every process calls it; the main process does the work and holds
    the lock (released on leaving the returned context), and its error is raised on every process.
    """
    folder = Path(config.output_dir).resolve()
    error, lock = None, None
    if accelerator.is_main_process:
        try:
            lock = _claim_main(folder, config, inputs)
        except UsageError as raised:
            error = str(raised)
    if getattr(accelerator, "num_processes", 1) > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    if error is not None:
        raise UsageError(error)
    return _released(lock)


@contextlib.contextmanager
def _released(lock: FileLock | None):
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


__all__ = ["LOCK_FILE", "MARKER_FILE", "RUN_ARTIFACTS", "check_writable", "claim_output_dir"]
