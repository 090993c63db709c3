"""Stream the elements of a top-level JSON array, one bounded buffer at a time.

Each element is parsed by `json`'s C decoder straight from the buffer. When that fails, a
small scanner (C regexes over strings and brackets) finds where the element ends, so one
bad element is one quarantine row and the elements after it are still read: a malformed
element, one nested too deep for the parser, or one larger than `max_bytes`, which is
streamed past without ever being held (the buffer keeps a preview of it and a byte count).
Text after the closing bracket, a missing comma or a missing bracket are rows too: nothing
the file holds is skipped without a count.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from typing import BinaryIO

from curation.errors import WinnowError
from curation.ingest.compression import READ_ERRORS, describe_read_error
from curation.ingest.values import DECODER, BadValue, check_text, parse_json
from curation.schema import RAW_PREVIEW_CHARS, Reason

_CHUNK = 1 << 20
_OUTSIDE = re.compile(r'["\[\]{},]')  # what changes the scanner's state outside a string
_INSIDE = re.compile(r'["\\]')  # ... and inside one
_NOT_WS = re.compile(r"[^ \t\r\n]")
_NUMBER_GOES_ON = frozenset(".eE+-0123456789")  # after a parsed value: a number cut at a chunk boundary


class _Extent:
    """Where the scanner stands in the current element (offsets from the element's start)."""

    __slots__ = ("depth", "in_string", "offset")

    def __init__(self) -> None:
        self.depth, self.in_string, self.offset = 0, False, 0


class _Unreadable(Exception):
    """The file cannot be read past this point (damaged compressed data, an I/O error)."""


class ArrayStream:
    """The state of one pass over a JSON array file: a decoded buffer and a position in it."""

    def __init__(self, handle: BinaryIO, label: str, max_bytes: int) -> None:
        self.handle, self.label, self.max_bytes = handle, label, max_bytes
        # utf-8-sig drops a byte order mark; surrogateescape keeps invalid bytes visible to check_text
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")(errors="surrogateescape")
        self.buffer, self.pos, self.eof = "", 0, False
        self.broken = False  # set when the rest of the file cannot be parsed

    # -- buffer --------------------------------------------------------------------------

    def fill(self) -> bool:
        """Append the next chunk (dropping what was consumed); False at the end of the file."""
        if self.eof:
            return False
        try:
            chunk = self.handle.read(_CHUNK)
        except READ_ERRORS as exc:
            raise _Unreadable(describe_read_error(exc)) from None
        self.buffer = self.buffer[self.pos :] + self.decoder.decode(chunk, final=not chunk)
        self.pos = 0
        self.eof = not chunk
        return bool(chunk)

    def skip_ws(self) -> bool:
        """Move to the next non-whitespace character; False when the file ends first."""
        while True:
            hit = _NOT_WS.search(self.buffer, self.pos)
            if hit:
                self.pos = hit.start()
                return True
            self.pos = len(self.buffer)
            if not self.fill():
                return False

    def peek(self) -> str:
        return self.buffer[self.pos]

    # -- elements ------------------------------------------------------------------------

    def element(self) -> tuple[object | None, BadValue | None, str]:
        """Parse the element at pos; returns (value, None, raw) or (None, why, preview) and moves past it."""
        start = self.pos
        try:
            value, end = DECODER.raw_decode(self.buffer, start)
        except (json.JSONDecodeError, RecursionError, BadValue):
            pass
        else:
            # a number at the buffer's end may go on in the next chunk, and so may one cut before its
            # fraction or exponent ("-0" of "-0.0": json stops where its number pattern does)
            if self.eof or (end < len(self.buffer) and self.buffer[end] not in _NUMBER_GOES_ON):
                raw = self.buffer[start:end]
                self.pos = end
                if end - start > self.max_bytes // 4 and len(raw.encode("utf-8", "surrogateescape")) > self.max_bytes:
                    return None, BadValue(Reason.TOO_LARGE, f"element exceeds max_bytes={self.max_bytes}"), raw
                try:
                    check_text(raw, value)
                except BadValue as bad:
                    return None, bad, raw
                return value, None, raw
        return self._slow_element()

    def _slow_element(self) -> tuple[None, BadValue, str] | tuple[object, None, str]:
        """Find the element's end with the scanner, then parse exactly that text (or count it as too large)."""
        extent, preview, skipped = _Extent(), "", 0
        while not self._scan(extent):
            if extent.offset > self.max_bytes:  # too large: keep a preview and a byte count, drop the rest
                preview = preview or self.buffer[self.pos : self.pos + RAW_PREVIEW_CHARS]
                scanned = self.buffer[self.pos : self.pos + extent.offset]
                skipped += len(scanned.encode("utf-8", "surrogateescape"))
                self.pos += extent.offset
                extent.offset = 0
            if not self.fill():
                if extent.depth == 0 and not extent.in_string:
                    break  # the element is whole and the file ends right after it (no closing bracket)
                text = preview or self.buffer[self.pos : self.pos + RAW_PREVIEW_CHARS]
                self.pos, self.broken = len(self.buffer), True
                return None, BadValue(Reason.MALFORMED_JSON, "the element never ends; the rest of the file "
                                                             "cannot be parsed"), text
        raw = self.buffer[self.pos : self.pos + extent.offset]
        self.pos += extent.offset
        if skipped or len(raw.encode("utf-8", "surrogateescape")) > self.max_bytes:
            size = skipped + len(raw.encode("utf-8", "surrogateescape"))
            return None, BadValue(Reason.TOO_LARGE, f"element of {size} bytes exceeds max_bytes={self.max_bytes}"), \
                preview or raw
        if not raw.strip(" \t\r\n"):
            return None, BadValue(Reason.MALFORMED_JSON, "empty element (a comma too many)"), raw
        try:
            return parse_json(raw), None, raw
        except BadValue as bad:
            return None, bad, raw

    def _scan(self, extent: _Extent) -> bool:
        """Advance the scanner through the buffer; True when the element ends (at a `,` or `]` outside it)."""
        buffer, base = self.buffer, self.pos
        i = base + extent.offset
        while True:
            if extent.in_string:
                hit = _INSIDE.search(buffer, i)
                if hit is None:
                    extent.offset = len(buffer) - base
                    return False
                if hit.group() == "\\":
                    if hit.end() >= len(buffer):  # the escaped character is in the next chunk
                        extent.offset = hit.start() - base
                        return False
                    i = hit.end() + 1
                    continue
                extent.in_string, i = False, hit.end()
                continue
            hit = _OUTSIDE.search(buffer, i)
            if hit is None:
                extent.offset = len(buffer) - base
                return False
            char, i = hit.group(), hit.end()
            if char == '"':
                extent.in_string = True
            elif char in "[{":
                extent.depth += 1
            elif extent.depth > 0 and char in "]}":
                extent.depth -= 1
            elif extent.depth == 0 and char in ",]":
                extent.offset = hit.start() - base
                return True

    def trailing(self) -> tuple[int, str] | None:
        """After the closing bracket: (bytes, preview) of any text before the end of the file, else None."""
        if not self.skip_ws():
            return None
        preview = self.buffer[self.pos : self.pos + RAW_PREVIEW_CHARS]
        size = len(self.buffer[self.pos :].encode("utf-8", "surrogateescape"))
        self.pos = len(self.buffer)
        while self.fill():
            size += len(self.buffer.encode("utf-8", "surrogateescape"))
            self.pos = len(self.buffer)
        return size, preview


Element = tuple[int, object | None, BadValue | None, str]


def iter_elements(stream: ArrayStream) -> Iterator[Element]:
    """(index, value, problem, raw) for each element, 1-based; extra rows for what breaks the array's syntax.

    A read error (damaged compressed data) ends the stream with a row saying so, or, before
    the first element, with a one-line error.
    """
    index = 0
    try:
        for item in _elements(stream):
            index = item[0]
            yield item
    except _Unreadable as exc:
        if index == 0:
            raise WinnowError(f"{stream.label}: cannot read ({exc})") from None
        yield index + 1, None, BadValue(Reason.UNDECODABLE_BYTES, f"the file cannot be read past this point "
                                                                  f"({exc})"), ""


def _elements(stream: ArrayStream) -> Iterator[Element]:
    if not stream.skip_ws() or stream.peek() != "[":
        raise WinnowError(f"{stream.label}: expected a JSON array of objects (or JSON Lines)")
    stream.pos += 1
    index, expect_comma = 0, False
    while True:
        if not stream.skip_ws():
            yield index + 1, None, BadValue(Reason.MALFORMED_JSON, "the file ends before the array's closing "
                                                                    "']' (truncated?)"), ""
            return
        char = stream.peek()
        if char == "]":
            stream.pos += 1
            extra = stream.trailing()
            if extra:
                size, preview = extra
                yield index + 1, None, BadValue(Reason.MALFORMED_JSON, f"{size} bytes of text after the array's "
                                                                        "closing ']'"), preview
            return
        missing_comma = False
        if char == ",":
            stream.pos += 1
            if expect_comma:
                expect_comma = False
                continue
            index += 1  # a comma where an element should be: `[,` or `,,`
            yield index, None, BadValue(Reason.MALFORMED_JSON, "empty element (a comma too many)"), ","
            continue
        if expect_comma:
            missing_comma = True
        index += 1
        value, problem, raw = stream.element()
        if missing_comma and problem is None:
            problem = BadValue(Reason.MALFORMED_JSON, f"no ',' between elements {index - 1} and {index}")
        expect_comma = True
        yield index, value, problem, raw
        if stream.broken:
            return
