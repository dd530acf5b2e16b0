"""Labels and transcripts: class names and ids, cleaned transcripts, the character vocabulary and CTC tokenizer."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from hf_helu.errors import UsageError
from recipe_support.speech.audio import Clip

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
WORD_DELIMITER = "|"


def label_names(clips: Iterable[Clip]) -> list[str]:
    """Sorted class names of the clips (every clip must have a label)."""
    names = set()
    for clip in clips:
        if clip.label is None or clip.label == "":
            raise UsageError(f"clip {clip.source!r} has no label (classification needs one per clip)")
        names.add(clip.label)
    return sorted(names, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))


def label_ids(clips: Sequence[Clip], label2id: Mapping[str, int]) -> list[int]:
    """Class ids of the clips; a label the model was not built for is an error naming the clip."""
    ids = []
    for clip in clips:
        if clip.label not in label2id:
            raise UsageError(
                f"unknown label {clip.label!r} of {clip.source!r}: the model's labels are {sorted(label2id)}"
            )
        ids.append(label2id[clip.label])
    return ids


def clean_transcript(text: str | None, source: str = "?") -> str:
    """A transcript with runs of whitespace collapsed to one space and the ends stripped."""
    if text is None or not text.strip():
        raise UsageError(f"clip {source!r} has no transcript (speech recognition needs one per clip)")
    return " ".join(text.split())


def build_vocabulary(transcripts: Iterable[str]) -> dict[str, int]:
    """Character vocabulary for CTC: ``<pad>`` (the CTC blank) = 0, ``<unk>`` = 1, then the characters.

    The space between words is the word delimiter ``|`` (always present, as Wav2Vec2CTCTokenizer expects).
    """
    characters = set()
    for text in transcripts:
        if WORD_DELIMITER in text:
            raise UsageError(f"transcript {text!r} contains the word delimiter {WORD_DELIMITER!r}")
        characters.update(text)
    if not characters:
        raise UsageError("no transcripts to build a vocabulary from")
    symbols = sorted({WORD_DELIMITER} | {c for c in characters if c != " "})
    return {PAD_TOKEN: 0, UNK_TOKEN: 1, **{symbol: i + 2 for i, symbol in enumerate(symbols)}}


def check_transcripts(clips: Sequence[Clip], vocabulary: Mapping[str, int]) -> list[str]:
    """Cleaned transcripts; a character missing from the vocabulary is an error naming it and the clip."""
    texts = []
    for clip in clips:
        text = clean_transcript(clip.transcript, clip.source)
        missing = sorted({c for c in text if (WORD_DELIMITER if c == " " else c) not in vocabulary})
        if missing:
            raise UsageError(
                f"transcript {text!r} of {clip.source!r} has characters {missing} missing from the vocabulary"
            )
        texts.append(text)
    return texts


def ctc_tokenizer(vocabulary: Mapping[str, int]):
    """A ``Wav2Vec2CTCTokenizer`` over ``vocabulary`` (no bos/eos, so its length is the vocabulary's)."""
    from transformers import Wav2Vec2CTCTokenizer

    with tempfile.TemporaryDirectory() as folder:
        vocab_file = Path(folder) / "vocab.json"
        vocab_file.write_text(json.dumps(dict(vocabulary), ensure_ascii=False), encoding="utf-8")
        return Wav2Vec2CTCTokenizer(
            str(vocab_file),
            unk_token=UNK_TOKEN,
            pad_token=PAD_TOKEN,
            word_delimiter_token=WORD_DELIMITER,
            bos_token=None,
            eos_token=None,
        )
