"""The distributions built from this tree: LICENSE and py.typed in the wheel and the sdist, the version written once
(``hf_helu.__version__``), and an sdist that leaves the test suite out on purpose (it needs the repository)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

import hf_helu

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent


def test_one_version_source():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "hf_helu.__version__"}
    written = [path for path in (ROOT / "hf_helu").rglob("*.py") if "__version__ =" in path.read_text()]
    assert written == [ROOT / "hf_helu" / "__init__.py"]


def test_license_is_apache_2():
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n") and "Version 2.0, January 2004" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == "Apache-2.0"


@pytest.fixture(scope="module")
def distributions(tmp_path_factory) -> tuple[Path, Path]:
    """The sdist and the wheel, built by setuptools (without build isolation) from a copy of this tree."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed")
    tree, out = tmp_path_factory.mktemp("tree"), tmp_path_factory.mktemp("dist")
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"):
        shutil.copy(ROOT / name, tree / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", ".pytest_cache")
    for name in ("hf_helu", "tests"):
        shutil.copytree(ROOT / name, tree / name, ignore=ignore)
    build = (
        "import sys; from setuptools import build_meta as b; out = sys.argv[1]; "  # build_meta rewrites sys.argv
        "print('BUILT', b.build_sdist(out), b.build_wheel(out))"
    )
    done = subprocess.run([sys.executable, "-c", build, str(out)], cwd=tree, capture_output=True, text=True)
    if done.returncode != 0 and re.search(r"setuptools>=\d+|license-files|SetuptoolsDeprecation", done.stderr):
        pytest.skip(f"this setuptools cannot build the project: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    sdist_name, wheel_name = re.search(r"^BUILT (\S+) (\S+)$", done.stdout, re.MULTILINE).groups()
    return out / sdist_name, out / wheel_name


@pytest.mark.slow
def test_wheel_and_sdist_ship_license_and_py_typed(distributions):
    sdist, wheel = distributions
    version = hf_helu.__version__
    assert sdist.name == f"hf_helu-{version}.tar.gz" and wheel.name.startswith(f"hf_helu-{version}-")
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    c_sources = {"hf_helu/ops/helu_cpu.c", "hf_helu/sparse/sparse_ffn.c"}
    assert {"LICENSE", "hf_helu/py.typed", "pyproject.toml", "README.md", *c_sources} <= names
    assert not [name for name in names if name.startswith("tests/")]  # left out on purpose (README, Tests)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = archive.read(f"hf_helu-{version}.dist-info/METADATA").decode()
    assert {f"hf_helu-{version}.dist-info/licenses/LICENSE", "hf_helu/py.typed", *c_sources} <= names
    assert f"Version: {version}\n" in metadata and "License-Expression: Apache-2.0" in metadata
