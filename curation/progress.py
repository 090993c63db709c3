"""Progress bars for long work, one style everywhere (tqdm, as TRL and datasets use)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from tqdm.auto import tqdm


def progress_enabled(requested: bool = True) -> bool:
    return requested and not os.environ.get("WINNOW_NO_PROGRESS") and not os.environ.get("TQDM_DISABLE")


@contextmanager
def progress_bar(desc: str, total: int | None = None, unit: str = "it", enabled: bool = True) -> Iterator[tqdm]:
    bar = tqdm(total=total, desc=desc, unit=unit, disable=not progress_enabled(enabled), dynamic_ncols=True, leave=False)
    try:
        yield bar
    finally:
        bar.close()
