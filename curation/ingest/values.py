"""Parse untrusted JSON into values the catalog can hold, or say why a record cannot be one.

Python's json module accepts what the catalog cannot store: NaN and Infinity literals (not
JSON), numbers that overflow a double (`1e400` becomes inf), integers of thousands of digits
(a ValueError past 4300), nesting deep enough to exhaust the stack (RecursionError), and
`\\ud800` escapes that decode to lone surrogates (every UTF-8 encoder refuses them later, in
polars or DuckDB, as a traceback). Each of these becomes a `BadValue` with its quarantine reason.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from curation.schema import Reason

# Every integer of up to 308 digits is below 1e308 and converts to a finite double (the format
# layer turns scores into floats); a longer one may not, and is no usable number.
MAX_INT_DIGITS = 308
SURROGATE = re.compile("[\ud800-\udfff]")
# A \uD800-\uDFFF escape in the raw text: only then can the value hold a lone surrogate, so
# only a hit (an emoji written as an escaped pair, say) walks the value.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class BadValue(Exception):
    """A record that parses but cannot be stored; carries its quarantine reason."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadValue(Reason.WRONG_TYPE, f"expected a finite number: {text[:40]} overflows a double")
    return value


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise BadValue(Reason.WRONG_TYPE, f"expected a finite number: an integer of {len(text.lstrip('-'))} digits")
    return int(text)


def _constant(text: str) -> float:
    raise BadValue(Reason.MALFORMED_JSON, f"{text} is not valid JSON (JSON has no NaN or Infinity)")


DECODER = json.JSONDecoder(parse_float=_float, parse_int=_int, parse_constant=_constant)


def parse_json(text: str) -> Any:
    """`json.loads` with the checks above; raises BadValue (syntax errors included) and nothing else."""
    try:
        value = DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise BadValue(Reason.MALFORMED_JSON, f"{exc.msg} at column {exc.colno}") from None
    except RecursionError:
        raise BadValue(Reason.MALFORMED_JSON, "nested too deeply to parse") from None
    check_text(text, value)
    return value


def check_text(raw: str, value: Any) -> None:
    """Raise BadValue when the raw text held invalid UTF-8 or the value holds a lone surrogate.

    Invalid bytes reach here as surrogateescape's surrogates, which UTF-8 refuses to encode:
    encoding (only texts that are not ASCII) finds them several times faster than a regex.
    """
    if not raw.isascii() and not encodes(raw):
        raise BadValue(Reason.UNDECODABLE_BYTES, "invalid UTF-8 in the row")
    if _SURROGATE_ESCAPE.search(raw) and has_surrogate(value):
        raise BadValue(Reason.UNDECODABLE_BYTES, "a lone surrogate escape (\\ud800-\\udfff) is not a character")


def encodes(text: str) -> bool:
    """Whether `text` is valid Unicode all through (no surrogates), i.e. encodes as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def has_surrogate(value: Any) -> bool:
    """Whether any string (key or value) inside `value` holds a surrogate code point."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def is_nonfinite_text(text: str) -> bool:
    """Whether a text reads as a number no double holds finitely: `nan`, `inf`, `1e400`, 5000 digits."""
    try:
        return not math.isfinite(float(text))
    except ValueError:
        return False
