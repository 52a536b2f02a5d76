"""These tests run tiny tensor ops: on one thread (intra-op threads only contend for ops
this small, badly so on a loaded machine), as in tests/core."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
