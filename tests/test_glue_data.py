"""GLUE data (recipe_support.glue): the real TSVs give the documented counts and the hub's columns; bad input gives
clear errors naming the file and line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import GLUE_DIR
from recipe_support import glue

from hf_helu.errors import UsageError

DATA = GLUE_DIR
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason=f"GLUE data not found at {DATA}")


@needs_data
@pytest.mark.parametrize(
    ("task", "split", "rows", "label0"),
    [
        ("cola", "train", 8551, 2528),
        ("cola", "dev", 1043, 322),
        ("mrpc", "train", 3668, 1194),
        ("mrpc", "dev", 408, 129),
        ("rte", "train", 2490, 1249),  # entailment = 0
        ("rte", "dev", 277, 146),
        ("wnli", "dev", 71, 40),
        ("sst2", "dev", 872, 428),
    ],
)
def test_tsv_rows_and_labels(task, split, rows, label0):
    """Row counts and label counts of shared/data's README (they would differ if quotes were parsed)."""
    spec = glue.get_task(task)
    data = glue.read_tsv(spec, DATA / spec.folder / f"{split}.tsv")
    assert len(data["label"]) == rows == len(data["idx"])
    assert sum(label == 0 for label in data["label"]) == label0
    for column in spec.text_columns:
        assert len(data[column]) == rows and all(isinstance(t, str) and t for t in data[column])


@needs_data
def test_load_glue_matches_hub_features():
    stsb = glue.load_glue("stsb", DATA)
    assert set(stsb) == {"train", "dev"}
    assert len(stsb["train"]) == 5749 and len(stsb["dev"]) == 1500
    assert stsb["train"].features == glue.features(glue.get_task("stsb"))
    assert stsb["dev"].column_names == ["sentence1", "sentence2", "label", "idx"]
    assert np.mean(stsb["train"]["label"]) == pytest.approx(2.701, abs=1e-3)
    mrpc = glue.load_glue("mrpc", DATA)
    assert mrpc["train"].features["label"].names == ["not_equivalent", "equivalent"]
    first = mrpc["train"][0]  # the BOM is gone from the header, so the columns were found by name
    assert first["sentence1"].startswith("Amrozi accused his brother")
    assert first["label"] == 1


# ----------------------------------------------------------------------------------------------------------------
# Bad input: clear errors
# ----------------------------------------------------------------------------------------------------------------


def test_unknown_task():
    with pytest.raises(ValueError, match=r"unknown GLUE task 'sts'.*stsb"):
        glue.get_task("sts")
    assert glue.get_task("STS-B").name == "stsb"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_missing_tsv(tmp_path):
    _write(tmp_path / "RTE" / "train.tsv", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n")
    with pytest.raises(UsageError, match=r"missing GLUE file .*RTE/dev\.tsv"):
        glue.load_glue("rte", tmp_path)
    with pytest.raises(UsageError, match=r"missing GLUE folder .*CoLA"):
        glue.load_glue("cola", tmp_path)


def test_malformed_rows_name_file_and_line(tmp_path):
    header = "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n"
    path = _write(tmp_path / "RTE" / "train.tsv", header + "1\tc\tnot_entailment\n")  # a field short
    with pytest.raises(UsageError, match=rf"{path}:3: label '' is not in the rte label set"):
        glue.read_tsv(glue.get_task("rte"), path)
    path.write_text(header + "1\tc\td\tnot_entailment\textra\n", encoding="utf-8")  # a field too many
    with pytest.raises(UsageError, match=rf"{path}: .*Expected 4 fields in line 3, saw 5"):
        glue.read_tsv(glue.get_task("rte"), path)


def test_non_utf8_file_names_file_and_line(tmp_path):
    path = tmp_path / "RTE" / "train.tsv"
    path.parent.mkdir()
    rows = ["index\tsentence1\tsentence2\tlabel", "0\ta\tb\tentailment", "1\tcaf\xe9\td\tentailment"]
    path.write_bytes("\n".join(rows).encode("latin-1"))  # é as the single byte 0xe9
    with pytest.raises(UsageError, match=rf"^{path}: .*not UTF-8 text \(byte 0xe9\)"):
        glue.read_tsv(glue.get_task("rte"), path)
    path.write_bytes("\n".join(rows).encode("utf-8"))
    assert glue.read_tsv(glue.get_task("rte"), path)["sentence1"] == ["a", "café"]


@pytest.mark.parametrize(
    ("task", "text", "match"),
    [
        ("rte", "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\tc\td\tmaybe\n", r":3: label 'maybe'"),
        ("cola", "src\t1\t\tok\nsrc\t2\t*\tbad\n", r":2: label '2' is not in the cola label set"),
        ("cola", "src\t1\t\tok\nsrc\t-1\t*\tbad\n", r":2: label '-1' is not in the cola label set"),
        ("stsb", "sentence1\tsentence2\tscore\nx\ty\tnan-ish\n", r":2: label 'nan-ish' is not a finite number"),
    ],
)
def test_label_outside_label_set(tmp_path, task, text, match):
    spec = glue.get_task(task)
    path = _write(tmp_path / spec.folder / "train.tsv", text)
    with pytest.raises(UsageError, match=match):
        glue.read_tsv(spec, path)


def test_header_without_task_columns(tmp_path):
    path = _write(tmp_path / "MRPC" / "dev.tsv", "a\tb\n1\t2\n")
    with pytest.raises(UsageError, match=r":1: header \['a', 'b'\] lacks column"):
        glue.read_tsv(glue.get_task("mrpc"), path)


def test_shuffled_subset_is_fixed_by_its_seed():
    from datasets import Dataset

    rows = Dataset.from_dict({"idx": list(range(50))})
    first, again = glue.shuffled_subset(rows, 10, seed=3), glue.shuffled_subset(rows, 10, seed=3)
    assert first["idx"] == again["idx"] and len(set(first["idx"])) == 10
    assert first["idx"] != sorted(first["idx"])  # shuffled, not the first rows in order
    assert glue.shuffled_subset(rows, None)["idx"] == list(range(50))
    assert glue.shuffled_subset(rows, 80)["idx"] == list(range(50))
