"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models run faster on one thread, and far faster when the CPU is shared."""
    from training.models import torch_threads

    with torch_threads(1):
        yield
