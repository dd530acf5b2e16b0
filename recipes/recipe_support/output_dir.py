"""The output folder of a run, claimed before any data is loaded: checked writable, locked for the run
(``filelock.FileLock``, the holder's pid recorded), a non-empty folder no run made (no marker file) refused, an
earlier run's files removed only with ``--overwrite_output_dir`` (never what the run reads), and the temp copies a
killed save left removed. An evaluation-only run removes nothing."""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from hf_helu.atomic import atomic_write_json, remove_stale_temps
from hf_helu.errors import UsageError
from recipe_support import results
from recipe_support.results import MODEL_DIR, OUTPUT_FILES, RELU_SUFFIX
from recipe_support.training import CHECKPOINTS_DIR, LOGS_DIR, check_checkpoint, make_accelerator, start_tracking

MARKER_FILE = ".hf_helu_run.json"
LOCK_FILE = ".hf_helu_run.lock"
# What a run writes into OUTPUT_DIR: all that --overwrite_output_dir removes.
RUN_ARTIFACTS = (CHECKPOINTS_DIR, LOGS_DIR, MODEL_DIR, MODEL_DIR + RELU_SUFFIX, *OUTPUT_FILES)
_LOCKS: dict[Path, FileLock] = {}  # the lock of each folder this process claimed: FileLock counts nested claims


def check_writable(folder: Path) -> None:  # created if needed, then a probe file written and removed
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".hf_helu_probe.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise UsageError(f"--output_dir {folder} is not a writable folder: {error.strerror or error}") from None


def _lock(folder: Path) -> FileLock:
    lock = _LOCKS.setdefault(folder, FileLock(folder / LOCK_FILE))
    try:
        lock.acquire(blocking=lock.is_locked)  # held by this process already: counted once more
    except Timeout:
        holder = (folder / LOCK_FILE).read_text().strip() or "unknown"
        raise UsageError(
            f"--output_dir {folder} is in use by another run (pid {holder}); wait for it to end or choose another "
            "--output_dir"
        ) from None
    (folder / LOCK_FILE).write_text(f"{os.getpid()}\n")
    return lock


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.name not in (MARKER_FILE, LOCK_FILE))


def _refuse_foreign(folder: Path, config: Any) -> None:
    entries = _entries(folder)
    has_checkpoints = (folder / CHECKPOINTS_DIR).is_dir() and any((folder / CHECKPOINTS_DIR).iterdir())
    ours = (folder / MARKER_FILE).is_file() or (has_checkpoints and config.resume_from_checkpoint)
    if entries and not ours and not config.overwrite_output_dir:
        raise UsageError(
            f"--output_dir {folder} is not empty and no hf_helu run made it (no {MARKER_FILE}; it holds "
            f"{', '.join(p.name for p in entries[:5])}{', ...' if len(entries) > 5 else ''}): choose another "
            f"--output_dir, or pass --overwrite_output_dir to replace the run files in it ({', '.join(RUN_ARTIFACTS)})"
        )


def _artifacts_to_remove(folder: Path, config: Any, inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The run artifacts to remove (``overwrite``), or an error saying why the folder cannot be used as it is."""
    _refuse_foreign(folder, config)
    artifacts = [p for p in _entries(folder) if p.name in RUN_ARTIFACTS]
    if config.eval_only or (config.resume_from_checkpoint and not config.overwrite_output_dir):
        return []  # eval-only writes its own file; a resume continues the run that is there
    if artifacts and not config.overwrite_output_dir:
        raise UsageError(
            f"--output_dir {folder} already holds a run ({', '.join(p.name for p in artifacts)}): pass "
            "--resume_from_checkpoint latest to continue it, or --overwrite_output_dir to start afresh"
        )
    for path in [Path(p).resolve() for p in (*inputs, config.resume_from_checkpoint or "") if str(p)]:
        for artifact in artifacts:
            if path == artifact.resolve() or artifact.resolve() in path.parents:
                raise UsageError(
                    f"--overwrite_output_dir would delete {artifact}, which this run reads ({path}): copy it "
                    "elsewhere or choose another --output_dir"
                )
    return artifacts


def _claim_main(folder: Path, config: Any, inputs: Sequence[str | os.PathLike]) -> FileLock:
    check_writable(folder)
    if not (folder / LOCK_FILE).exists():
        _refuse_foreign(folder, config)  # before the lock file: a refused folder is left as it was
    lock = _lock(folder)
    if lock.lock_counter > 1:
        return lock  # this process's own claim again (a recipe, then fit): nothing more to check
    try:
        for artifact in _artifacts_to_remove(folder, config, inputs):
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


def claim_output_dir(accelerator: Any, config: Any, inputs: Sequence[str | os.PathLike] = ()):
    """Check, lock and prepare ``config.output_dir`` (the parsed flags) for a run; ``inputs``: paths the run reads,
    which overwriting never deletes. The main process does the work and holds the lock until the returned context
    ends; its error is raised on every process."""
    folder, error, stack = Path(config.output_dir).resolve(), None, contextlib.ExitStack()
    if accelerator.is_main_process:
        try:
            stack.callback(_claim_main(folder, config, inputs).release)
        except UsageError as raised:
            error = str(raised)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        error = broadcast_object_list([error])[0]
    if error is not None:
        raise UsageError(error)
    return stack


@contextlib.contextmanager
def start_run(args: Any, script: str, argv: list[str] | None, inputs: Sequence[str | os.PathLike] = ()):
    """A training recipe's start, before it loads anything: its command line recorded, quieter logs, the accelerator,
    OUTPUT_DIR claimed, the checkpoint and hub repository checked, the trackers started (ended with the run)."""
    import datasets
    import transformers

    args.command = results.command_line(script, argv)  # results.json and the model card say how the run was made
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    datasets.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    accelerator = make_accelerator(args)
    with claim_output_dir(accelerator, args, inputs):
        if args.resume_from_checkpoint:
            check_checkpoint(args.output_dir, args.resume_from_checkpoint)
        results.check_hub(args)  # --push_to_hub: the hub repository exists before any training
        start_tracking(accelerator, args, Path(script).stem)
        yield accelerator
        accelerator.end_training()
