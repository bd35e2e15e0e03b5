"""Decomposition tests run many tiny tensor operations: one thread each, so a busy machine (other suites
running beside) does not turn microseconds of work into milliseconds of thread hand-offs."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
