"""Streaming readers: each yields batches of parsed records and of rows it could not read.

Memory stays bounded by the batch: files are read line by line (JSONL, CSV), by chunks
(JSON arrays, with an incremental decoder) or by row groups (Parquet). Parsing untrusted
JSON is per record by nature; everything after parsing is vectorised.
"""

from __future__ import annotations

import codecs
import csv
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from curation.errors import SourceUnavailableError, WinnowError
from curation.ingest.sources import Source
from curation.parquet_stream import open_parquet_stream
from curation.schema import RAW_PREVIEW_CHARS, Reason

_SURROGATE = re.compile("[\udc80-\udcff]")
_CHUNK = 1 << 20


@dataclass
class RawBatch:
    records: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)

    def reject(self, row: int, reason: Reason, detail: str, raw: str | bytes | None = None) -> None:
        if isinstance(raw, bytes):
            raw = raw[: RAW_PREVIEW_CHARS * 4].decode("utf-8", errors="replace")
        self.rejects.append(
            {"source_row": row, "reason": reason.value, "detail": detail, "raw": (raw or "")[:RAW_PREVIEW_CHARS]}
        )

    def __len__(self) -> int:
        return len(self.records) + len(self.rejects)


def read_source(source: Source, batch_size: int, max_bytes: int) -> Iterator[RawBatch]:
    readers = {"jsonl": read_jsonl, "json": read_json_array, "csv": read_csv, "parquet": read_parquet, "hub": read_hub}
    return readers[source.kind](source, batch_size, max_bytes)


def _object_or_reject(batch: RawBatch, row: int, value: Any, raw: str) -> None:
    if isinstance(value, dict):
        batch.records.append((row, value))
    else:
        batch.reject(row, Reason.WRONG_TYPE, f"expected a JSON object, got {type(value).__name__}", raw)


# What JSON itself counts as whitespace; str.strip() would also eat \x1c-\x1f and NEL.
JSON_WHITESPACE = b" \t\r\n"


def read_jsonl(source: Source, batch_size: int, max_bytes: int) -> Iterator[RawBatch]:
    batch = RawBatch()
    with open(source.location, "rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            if not raw.strip(JSON_WHITESPACE):
                continue  # blank lines carry no row; any other byte makes a row (maybe a malformed one)
            if len(raw) > max_bytes:
                batch.reject(lineno, Reason.TOO_LARGE, f"line of {len(raw)} bytes exceeds max_bytes={max_bytes}", raw)
            else:
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    batch.reject(lineno, Reason.UNDECODABLE_BYTES, f"invalid UTF-8 at byte {exc.start}", raw)
                else:
                    try:
                        value = json.loads(text)
                    except json.JSONDecodeError as exc:
                        batch.reject(lineno, Reason.MALFORMED_JSON, f"{exc.msg} at column {exc.colno}", text)
                    else:
                        _object_or_reject(batch, lineno, value, text)
            if len(batch) >= batch_size:
                yield batch
                batch = RawBatch()
    if len(batch):
        yield batch


def read_json_array(source: Source, batch_size: int, max_bytes: int) -> Iterator[RawBatch]:
    """Stream the elements of a top-level JSON array; source_row is the element's 1-based index.

    A file whose first character is `{` is read as JSON Lines: a common misnaming.
    """
    with open(source.location, "rb") as probe:
        head = probe.read(4096).lstrip()
    if head.startswith(b"{"):
        yield from read_jsonl(source, batch_size, max_bytes)
        return
    if not head.startswith(b"["):
        raise WinnowError(f"{source.location}: expected a JSON array of objects (or JSON Lines)")
    decoder = json.JSONDecoder()
    incremental = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    batch, buffer, pos, index, eof = RawBatch(), "", 0, 0, False
    with open(source.location, "rb") as handle:

        def fill() -> bool:
            nonlocal buffer, pos
            chunk = handle.read(_CHUNK)
            buffer = buffer[pos:] + incremental.decode(chunk, final=not chunk)
            pos = 0
            return bool(chunk)

        def skip_ws() -> None:
            nonlocal pos, eof
            while True:
                while pos < len(buffer) and buffer[pos] in " \t\r\n":
                    pos += 1
                if pos < len(buffer) or eof:
                    return
                eof = not fill()

        eof = not fill()
        skip_ws()
        pos += 1  # the opening bracket
        while True:
            skip_ws()
            if pos >= len(buffer) or buffer[pos] == "]":
                break
            if buffer[pos] == ",":
                pos += 1
                skip_ws()
            index += 1
            while True:
                try:
                    value, end = decoder.raw_decode(buffer, pos)
                    break
                except json.JSONDecodeError as exc:
                    if eof or len(buffer) - pos > max_bytes + _CHUNK:
                        detail = f"element {index}: {exc.msg}; the rest of the file cannot be parsed"
                        batch.reject(index, Reason.MALFORMED_JSON, detail, buffer[pos : pos + RAW_PREVIEW_CHARS])
                        yield batch
                        return
                    eof = not fill()
            raw = buffer[pos:end]
            pos = end
            if len(raw.encode("utf-8", errors="surrogateescape")) > max_bytes:
                batch.reject(index, Reason.TOO_LARGE, f"element exceeds max_bytes={max_bytes}", raw)
            elif _SURROGATE.search(raw):
                batch.reject(index, Reason.UNDECODABLE_BYTES, "invalid UTF-8 inside the element", raw)
            else:
                _object_or_reject(batch, index, value, raw)
            if len(batch) >= batch_size:
                yield batch
                batch = RawBatch()
    if len(batch):
        yield batch


def read_csv(source: Source, batch_size: int, max_bytes: int) -> Iterator[RawBatch]:
    """CSV with a header row; source_row is the line where the record starts."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    batch = RawBatch()
    with open(source.location, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        reader = csv.reader(handle)
        try:
            header = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise WinnowError(f"{source.location}: unreadable CSV header: {exc}") from None
        start = reader.line_num + 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                batch.reject(start, Reason.MALFORMED_ROW, f"CSV error: {exc}")
                start = reader.line_num + 1
                continue
            row, start = start, reader.line_num + 1
            raw = ",".join(fields)
            if len(raw.encode("utf-8", errors="surrogateescape")) > max_bytes:
                batch.reject(row, Reason.TOO_LARGE, f"row exceeds max_bytes={max_bytes}", raw)
            elif _SURROGATE.search(raw):
                batch.reject(row, Reason.UNDECODABLE_BYTES, "invalid UTF-8 in the row", raw)
            elif len(fields) != len(header):
                batch.reject(row, Reason.MALFORMED_ROW, f"{len(fields)} fields, header has {len(header)}", raw)
            else:
                batch.records.append((row, {k: _csv_value(v) for k, v in zip(header, fields, strict=True)}))
            if len(batch) >= batch_size:
                yield batch
                batch = RawBatch()
    if len(batch):
        yield batch


def _csv_value(value: str) -> Any:
    """CSV exports of conversational data hold message lists as JSON text; empty means absent."""
    if value == "":
        return None
    if value.startswith("[{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def read_parquet(source: Source, batch_size: int, max_bytes: int) -> Iterator[RawBatch]:
    try:
        parquet = open_parquet_stream(source.location)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise WinnowError(f"{source.location}: not a readable Parquet file ({exc})") from None
    row = 0
    for record_batch in parquet.iter_batches(batch_size=batch_size):
        batch = RawBatch()
        for value in record_batch.to_pylist():
            row += 1
            batch.records.append((row, value))
        yield batch


def read_hub(source: Source, batch_size: int, max_bytes: int) -> Iterator[RawBatch]:
    """Stream from the hub when it answers; else read the local `datasets` cache (memory-mapped)."""
    from curation.lm.hub import load_hub_dataset

    try:
        dataset, _ = load_hub_dataset(source.location, source.split)
        iterator = iter(dataset)
        first = next(iterator, None)
    except Exception as exc:  # offline, unknown name, auth: all become one line
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise SourceUnavailableError(f"cannot load dataset {source.label}: {reason[:200]}") from None
    if first is None:
        return
    batch, row = RawBatch(records=[(1, dict(first))]), 1
    for value in iterator:
        row += 1
        batch.records.append((row, dict(value)))
        if len(batch) >= batch_size:
            yield batch
            batch = RawBatch()
    if len(batch):
        yield batch
