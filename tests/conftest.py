"""Fixtures shared by the test modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models run faster on one thread, and far faster when the CPU is shared."""
    from curation.lm.loading import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture(autouse=True)
def _fresh_environment(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """curation.env reads the environment once per process; tests change it, so re-read it.

    Before and after every test, and after every ``monkeypatch.setenv``/``delenv`` inside one.
    """
    from curation.env import reset_environment

    for name in ("setenv", "delenv"):
        original = getattr(monkeypatch, name)

        def changed(*args, _original=original, **kwargs):  # noqa: ANN002, ANN003, ANN202
            _original(*args, **kwargs)
            reset_environment()

        setattr(monkeypatch, name, changed)
    reset_environment()
    yield
    reset_environment()


@pytest.fixture
def bars_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Progress bars allowed whatever another module set at import (several set TQDM_DISABLE=1)."""
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("WINNOW_NO_PROGRESS", raising=False)
