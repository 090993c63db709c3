"""Progress bars for long work, one style everywhere (tqdm, as TRL and datasets use)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm

from curation.env import environment


def progress_enabled(requested: bool = True) -> bool:
    return requested and not environment().progress_disabled


@contextmanager
def progress_bar(desc: str, total: int | None = None, unit: str = "it", enabled: bool = True) -> Iterator[tqdm]:
    bar = tqdm(total=total, desc=desc, unit=unit, disable=not progress_enabled(enabled), dynamic_ncols=True, leave=False)
    try:
        yield bar
    finally:
        bar.close()
