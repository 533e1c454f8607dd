"""Shared test setup: one torch thread (tiny tensors run far faster without thread hand-offs on 2 shared cores)."""
import pytest
import torch

torch.set_num_threads(1)  # also for module-scoped fixtures, which run before the autouse fixture below


@pytest.fixture(autouse=True)
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
