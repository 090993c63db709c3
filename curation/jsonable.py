"""JSON-ready copies of the settings and evidence Winnow records in the catalog and manifests."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["json_safe"]


def json_safe(value: Any) -> Any:
    """A copy that ``json.dumps(..., allow_nan=False)`` accepts.

    Statistics come out of numpy and polars as numpy scalars and may be NaN or inf (an empty
    stage has no mean margin); JSON has neither, so they become Python numbers and null.
    Anything else that is not a JSON primitive (paths, enums) is recorded as its string.
    """
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)
