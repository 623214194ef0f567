"""Suite-wide settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """The tests use tiny tensors; on the shared 2-core machines extra intra-op threads only
    add contention (measured up to 40x slower for a small MLP step)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
