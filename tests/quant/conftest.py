"""Quantizer tests run on one thread: the data is tiny, and extra threads only add OpenMP barrier waits, which
explode on a shared 2-core machine."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
