"""Speech labels and transcripts (recipe_support.speech.tasks): the CTC vocabulary and tokenizer."""

from __future__ import annotations

from recipe_support import speech


def test_vocabulary_and_ctc_tokenizer_round_trip():
    texts = ["seven", "nine", "one two", "it's ok"]
    vocabulary = speech.build_vocabulary(texts)
    assert vocabulary["<pad>"] == 0 and vocabulary["<unk>"] == 1 and "|" in vocabulary
    assert set(vocabulary) - {"<pad>", "<unk>", "|"} == set("".join(texts)) - {" "}
    tokenizer = speech.ctc_tokenizer(vocabulary)
    assert len(tokenizer) == len(vocabulary)
    for text in texts:
        ids = tokenizer(text).input_ids
        assert ids == [vocabulary["|" if c == " " else c] for c in text]
        assert tokenizer.decode(ids, group_tokens=False, clean_up_tokenization_spaces=False) == text
    # CTC decoding collapses repeats and drops the blank between them.
    s, e, v, n = (vocabulary[c] for c in "sevn")
    assert tokenizer.decode([0, s, s, e, 0, v, e, e, 0, n, 0]) == "seven"
