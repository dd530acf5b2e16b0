"""``hf_helu.cli``: the parser and ``main``, and the installed ``hf-helu`` script."""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import save_bert_checkpoint

from hf_helu.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("argv", [["patch", "a", "b", "--alpha", "-1"], ["patch", "a", "b", "--scope", "x"], []])
def test_bad_arguments_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert "usage: hf-helu" in capsys.readouterr().err


def test_version_is_the_installed_distributions(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"hf-helu {importlib.metadata.version('hf-helu')}"


def test_installed_script_runs(tmp_path):
    bert_folder = save_bert_checkpoint(tmp_path / "src")
    script = shutil.which("hf-helu") or shutil.which("hf-helu", path=str(Path(sys.executable).parent))
    assert script, "the hf-helu console script is not installed (pip install -e .)"
    result = subprocess.run(
        [script, "inspect", str(bert_folder), "--json"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["num_ffn"] == 2
