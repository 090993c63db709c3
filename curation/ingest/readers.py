"""Streaming readers: each yields batches of parsed records and of rows it could not read.

Memory stays bounded by the batch: files are read line by line (JSONL, CSV), by chunks
(JSON arrays, curation.ingest.json_array) or by row groups (Parquet), compressed or not
(curation.ingest.compression). Parsing untrusted JSON is per record by nature
(curation.ingest.values says what a record may hold); everything after parsing is vectorised.
Every fault in a file is a reject row with a reason, or, when nothing of the file can be
read, one WinnowError.
"""

from __future__ import annotations

import codecs
import csv
import io
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from curation.errors import SourceUnavailableError, WinnowError
from curation.ingest.compression import READ_ERRORS, describe_read_error, open_bytes
from curation.ingest.json_array import ArrayStream, iter_elements
from curation.ingest.sources import Source
from curation.ingest.values import SURROGATE, BadValue, encodes, is_nonfinite_text, parse_json
from curation.parquet_stream import iter_row_groups, open_parquet_stream
from curation.schema import RAW_PREVIEW_CHARS, Reason

_CHUNK = 1 << 20
# CSV holds every value as text, so a rating of "1e400" or "nan" is only a number once the
# format reads it; columns named like ratings are checked here so such a row is quarantined.
_RATING_COLUMN = re.compile("score|rating", re.IGNORECASE)


@dataclass
class RawBatch:
    records: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)

    def reject(self, row: int, reason: Reason, detail: str, raw: str | bytes | None = None) -> None:
        if isinstance(raw, bytes):
            raw = raw[: RAW_PREVIEW_CHARS * 4].decode("utf-8", errors="replace")
        raw = (raw or "")[:RAW_PREVIEW_CHARS]
        self.rejects.append(
            {"source_row": row, "reason": reason.value, "detail": _printable(detail), "raw": _printable(raw)}
        )

    def __len__(self) -> int:
        return len(self.records) + len(self.rejects)


def _printable(text: str) -> str:
    """Surrogates (escaped bytes, lone escapes) as U+FFFD: no UTF-8 encoder downstream accepts them."""
    return SURROGATE.sub("\ufffd", text) if SURROGATE.search(text) else text


def read_source(source: Source, batch_size: int, max_bytes: int) -> Iterator[RawBatch]:
    readers = {"jsonl": read_jsonl, "json": read_json_array, "csv": read_csv, "parquet": read_parquet, "hub": read_hub}
    return readers[source.kind](source, batch_size, max_bytes)


def _object_or_reject(batch: RawBatch, row: int, value: Any, raw: str) -> None:
    if isinstance(value, dict):
        batch.records.append((row, value))
    else:
        batch.reject(row, Reason.WRONG_TYPE, f"expected a JSON object, got {type(value).__name__}", raw)


def _unreadable(source: Source, exc: BaseException) -> WinnowError:
    return WinnowError(f"{source.location}: cannot read ({describe_read_error(exc)})")


# What JSON itself counts as whitespace; str.strip() would also eat \x1c-\x1f and NEL.
JSON_WHITESPACE = b" \t\r\n"


def read_jsonl(source: Source, batch_size: int, max_bytes: int) -> Iterator[RawBatch]:
    with open_bytes(source.location) as handle:
        yield from _jsonl_batches(handle, source, batch_size, max_bytes)


def _read_line(handle: BinaryIO, max_bytes: int) -> tuple[bytes, int]:
    """The next line (at most max_bytes + 1 bytes of it) and its full length; a longer line is read
    past in chunks, never held whole."""
    line = handle.readline(max_bytes + 1)
    size = len(line)
    if size > max_bytes and not line.endswith(b"\n"):
        while piece := handle.readline(_CHUNK):
            size += len(piece)
            if piece.endswith(b"\n"):
                break
    return line, size


def _jsonl_batches(handle: BinaryIO, source: Source, batch_size: int, max_bytes: int) -> Iterator[RawBatch]:
    batch, lineno = RawBatch(), 0
    while True:
        try:
            raw, size = _read_line(handle, max_bytes)
        except READ_ERRORS as exc:
            if lineno == 0:
                raise _unreadable(source, exc) from None
            batch.reject(lineno + 1, Reason.UNDECODABLE_BYTES,
                         f"the file cannot be read past line {lineno} ({describe_read_error(exc)})")
            break
        if not raw:
            break
        lineno += 1
        if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
            raw, size = raw[len(codecs.BOM_UTF8) :], size - len(codecs.BOM_UTF8)
        if not raw.strip(JSON_WHITESPACE):
            continue  # blank lines carry no row; any other byte makes a row (maybe a malformed one)
        if size > max_bytes:
            batch.reject(lineno, Reason.TOO_LARGE, f"line of {size} bytes exceeds max_bytes={max_bytes}", raw)
        else:
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                batch.reject(lineno, Reason.UNDECODABLE_BYTES, f"invalid UTF-8 at byte {exc.start}", raw)
            else:
                try:
                    value = parse_json(text)
                except BadValue as bad:
                    batch.reject(lineno, bad.reason, bad.detail, text)
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
    with open_bytes(source.location) as probe:
        try:
            head = probe.read(4096)
        except READ_ERRORS as exc:
            raise _unreadable(source, exc) from None
    if head.removeprefix(codecs.BOM_UTF8).lstrip(JSON_WHITESPACE).startswith(b"{"):
        yield from read_jsonl(source, batch_size, max_bytes)
        return
    batch = RawBatch()
    with open_bytes(source.location) as handle:
        for index, value, problem, raw in iter_elements(ArrayStream(handle, source.location, max_bytes)):
            if problem is not None:
                batch.reject(index, problem.reason, f"element {index}: {problem.detail}", raw)
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
    with open_bytes(source.location) as binary:
        # utf-8-sig drops a byte order mark (Excel writes one); invalid bytes stay visible as surrogates
        handle = io.TextIOWrapper(binary, encoding="utf-8-sig", errors="surrogateescape", newline="")
        try:
            yield from _csv_batches(csv.reader(handle), source, batch_size, max_bytes)
        finally:
            handle.detach()  # the binary stream is closed by open_bytes


def _csv_header(reader: Iterator[list[str]], source: Source) -> list[str] | None:
    try:
        header = next(reader)
    except StopIteration:
        return None
    except csv.Error as exc:
        raise WinnowError(f"{source.location}: unreadable CSV header: {exc}") from None
    except READ_ERRORS as exc:
        raise _unreadable(source, exc) from None
    if not all(encodes(name) for name in header):  # surrogateescape's stand-ins for invalid bytes
        raise WinnowError(f"{source.location}: invalid UTF-8 in the CSV header: save the file as UTF-8")
    seen: set[str] = set()
    repeated = sorted({name for name in header if name and (name in seen or seen.add(name))})
    if repeated:
        raise WinnowError(f"{source.location}: the CSV header repeats column(s) {', '.join(map(repr, repeated))}; "
                          "each column needs its own name")
    return header


def _csv_batches(reader: Any, source: Source, batch_size: int, max_bytes: int) -> Iterator[RawBatch]:
    header = _csv_header(reader, source)
    if header is None:
        return
    ratings = [i for i, name in enumerate(header) if _RATING_COLUMN.search(name)]
    batch = RawBatch()
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
        except READ_ERRORS as exc:
            batch.reject(start, Reason.UNDECODABLE_BYTES,
                         f"the file cannot be read past line {start - 1} ({describe_read_error(exc)})")
            break
        row, start = start, reader.line_num + 1
        raw = ",".join(fields)
        valid = raw.isascii() or encodes(raw)  # invalid bytes are surrogates here, which UTF-8 refuses
        if len(raw.encode("utf-8", errors="surrogateescape")) > max_bytes:
            batch.reject(row, Reason.TOO_LARGE, f"row exceeds max_bytes={max_bytes}", raw)
        elif not valid:
            batch.reject(row, Reason.UNDECODABLE_BYTES, "invalid UTF-8 in the row", raw)
        elif len(fields) != len(header):
            batch.reject(row, Reason.MALFORMED_ROW, f"{len(fields)} fields, header has {len(header)}", raw)
        elif (bad := next((i for i in ratings if fields[i] and is_nonfinite_text(fields[i])), None)) is not None:
            batch.reject(row, Reason.WRONG_TYPE, f"expected a finite number: {header[bad]} is {fields[bad][:40]!r}",
                         raw)
        else:
            try:
                batch.records.append((row, {k: _csv_value(v) for k, v in zip(header, fields, strict=True)}))
            except BadValue as bad_value:
                batch.reject(row, bad_value.reason, bad_value.detail, raw)
        if len(batch) >= batch_size:
            yield batch
            batch = RawBatch()
    if len(batch):
        yield batch


def _csv_value(value: str) -> Any:
    """CSV exports of conversational data hold message lists as JSON text; empty means absent.

    Text that is not valid JSON stays text (the format then says what it expected); JSON that
    decodes to something no catalog can hold (a lone surrogate, a non-finite number) rejects the row.
    """
    if value == "":
        return None
    if value.startswith("[{"):
        try:
            return parse_json(value)
        except BadValue as bad:
            if bad.reason == Reason.MALFORMED_JSON:
                return value
            raise
    return value


def read_parquet(source: Source, batch_size: int, max_bytes: int) -> Iterator[RawBatch]:
    """Row group by row group; the rows of a damaged row group are quarantined, the others still read."""
    try:
        parquet = open_parquet_stream(source.location)
    except Exception as exc:  # pyarrow raises several types for a bad file
        raise WinnowError(f"{source.location}: not a readable Parquet file ({exc})") from None
    row = 0
    for record_batch, rows, problem in iter_row_groups(parquet, batch_size):
        values: list[dict[str, Any]] | None = None
        if record_batch is not None:
            try:
                values = record_batch.to_pylist()
            except Exception as exc:  # e.g. invalid UTF-8 in a string column
                problem = describe_read_error(exc)
        if values is None:
            for start in range(0, rows, batch_size):
                batch = RawBatch()
                for offset in range(start, min(start + batch_size, rows)):
                    batch.reject(row + offset + 1, Reason.UNDECODABLE_BYTES, f"unreadable Parquet data ({problem})")
                yield batch
            row += rows
            continue
        nonfinite = _nonfinite_rows(record_batch)
        batch = RawBatch()
        for index, value in enumerate(values):
            row += 1
            if index in nonfinite:
                batch.reject(row, Reason.WRONG_TYPE, nonfinite[index], repr(value))
            else:
                batch.records.append((row, value))
        yield batch


def _nonfinite_rows(record_batch: Any) -> dict[int, str]:
    """Rows whose float columns hold NaN or an infinity (a pandas export's NaN included), with why."""
    import pyarrow as pa
    import pyarrow.compute as pc

    found: dict[int, str] = {}
    for name, column in zip(record_batch.schema.names, record_batch.columns, strict=True):
        if not pa.types.is_floating(column.type):
            continue
        bad = pc.invert(pc.fill_null(pc.is_finite(column), True))
        if not pc.any(bad).as_py():
            continue
        for index in pc.indices_nonzero(bad).to_pylist():
            found.setdefault(index, f"expected a finite number: {name} is {column[index].as_py()}")
    return found


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
