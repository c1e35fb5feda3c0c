"""Suite-wide settings.

Tests run torch on one intra-op thread: their tensors are small, where OpenMP
synchronisation costs more than it saves, and one thread makes timings of a busy
CI machine predictable. Tests that exercise threaded code paths set the thread
count themselves and restore it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
