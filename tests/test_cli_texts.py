"""``hf_helu.cli.texts``: the texts ``inspect-activations`` (and benchmarks/inference.py) read, and their batches."""

import pytest
from helpers import GLUE_DIR

from hf_helu.cli.texts import iter_text_batches, read_texts
from hf_helu.errors import UsageError


def test_read_texts_knows_the_glue_layouts(tmp_path):
    cola = read_texts(GLUE_DIR / "CoLA")
    assert len(cola) == 1043 and cola[0][1] is None and " " in cola[0][0]
    mrpc = read_texts(GLUE_DIR / "MRPC" / "dev.tsv")
    assert len(mrpc) == 408 and all(b is not None for _, b in mrpc)
    stsb = read_texts(GLUE_DIR / "STS-B")
    assert len(stsb) == 1500 and stsb[0][1] is not None
    text = tmp_path / "texts.txt"
    text.write_text("first line\n\n second \n")
    assert read_texts(text) == [("first line", None), ("second", None)]
    odd = tmp_path / "odd.tsv"
    odd.write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="GLUE task folder"):
        read_texts(odd)
    with pytest.raises(ValueError, match="GLUE task folder"):
        read_texts(tmp_path)
    (tmp_path / "RTE").mkdir()
    with pytest.raises(UsageError, match=r"RTE/dev\.tsv"):
        read_texts(tmp_path / "RTE")


def test_read_texts_errors_name_the_file(tmp_path):
    with pytest.raises(UsageError, match=r"no data file at .*missing\.txt"):
        read_texts(tmp_path / "missing.txt")
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n")
    with pytest.raises(ValueError, match=r"blank\.txt has no non-empty lines"):
        read_texts(blank)


class _RecordingTokenizer:
    """Stands in for a tokenizer: returns what it was called with."""

    def __call__(self, first, second, **options):
        return {"first": first, "second": second, **options}


def test_iter_text_batches_chunks_singles_and_pairs():
    singles = [(f"t{i}", None) for i in range(5)]
    batches = list(iter_text_batches(_RecordingTokenizer(), singles, batch_size=2, max_length=7))
    assert [b["first"] for b in batches] == [["t0", "t1"], ["t2", "t3"], ["t4"]]
    assert all(b["second"] is None for b in batches)
    options = {key: value for key, value in batches[0].items() if key not in ("first", "second")}
    assert options == {"padding": True, "truncation": True, "max_length": 7, "return_tensors": "pt"}
    pairs = [("a", "b"), ("c", "d"), ("e", "f")]
    batches = list(iter_text_batches(_RecordingTokenizer(), pairs, batch_size=3, max_length=4))
    assert len(batches) == 1 and batches[0]["first"] == ["a", "c", "e"] and batches[0]["second"] == ["b", "d", "f"]


def test_a_text_file_that_is_not_utf8_is_named(tmp_path):
    path = tmp_path / "texts.txt"
    path.write_bytes("one\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match=rf"^{path}: not UTF-8 text \(byte 0xe9 at offset 7\)"):
        read_texts(path)
