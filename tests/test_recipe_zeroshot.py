"""The zero-shot conversion probe (recipes/run_conversion_zeroshot.py): bad --ridges and an unwritable --output are
refused before any data or model is read."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO

RECIPE = REPO / "recipes" / "run_conversion_zeroshot.py"


def run(*argv) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(RECIPE), *map(str, argv)], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("ridge", ["-1", "nan", "inf"])
def test_a_bad_ridge_is_refused_before_any_work(tmp_path, ridge):
    """--model_name_or_path and --data_dir do not exist: had they been read first, the error would name them."""
    proc = run(
        "--ridges",
        "0.01",
        ridge,
        "--model_name_or_path",
        tmp_path / "none",
        "--data_dir",
        tmp_path / "none",
        "--output",
        tmp_path / "out.json",
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == f"error: --ridges must be finite numbers >= 0, got {float(ridge)}"


def test_an_unwritable_output_is_refused_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    for output, message in (
        (blocker / "out.json", f"error: --output {blocker / 'out.json'}: its folder is not writable"),
        (tmp_path, f"error: --output {tmp_path} is a folder"),
    ):
        proc = run("--model_name_or_path", tmp_path / "none", "--data_dir", tmp_path / "none", "--output", output)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert proc.stderr.strip().splitlines()[-1].startswith(message)
