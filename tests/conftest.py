"""Fixtures shared by the test modules."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one torch thread: tiny models are fastest so, and a stock-load subprocess started with
    ``torch.set_num_threads(1)`` then reproduces the parent's outputs bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
