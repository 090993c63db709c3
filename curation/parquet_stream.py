"""Open Parquet files for streaming, so memory stays flat in the file's size."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyarrow.parquet as pq

__all__ = ["open_parquet_stream"]


def open_parquet_stream(path: Path | str) -> pq.ParquetFile:
    """A ParquetFile whose ``iter_batches`` holds one row group at a time.

    pyarrow pre-buffers by default, and ``iter_batches`` then keeps every row group it has
    read cached until the file is closed: scoring 1M pairs held 1.5 GB of texts it had
    finished with. Ingest and scoring both stream through here.
    """
    import pyarrow.parquet as pq

    return pq.ParquetFile(path, pre_buffer=False)
