"""Cache keys from the content of a task's inputs: files are hashed, frames are never passed.

A key covers the task's name, its settings, and the bytes of the files it reads (sources,
model folders, shards), so an edited file or setting recomputes and nothing else does.
Digests of large files are remembered by (path, size, mtime) to keep lookups cheap.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

TRANSIENT = (ConnectionError, TimeoutError, BrokenPipeError)


@lru_cache(maxsize=4096)
def _file_digest(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fingerprint_path(path: str | Path) -> str:
    """sha256 over a file, or over every file of a folder (names and contents); else the string."""
    p = Path(path)
    if p.is_file():
        stat = p.stat()
        return _file_digest(str(p.resolve()), stat.st_size, stat.st_mtime_ns)
    if p.is_dir():
        digest = hashlib.sha256()
        for child in sorted(q for q in p.rglob("*") if q.is_file()):
            digest.update(str(child.relative_to(p)).encode())
            digest.update(fingerprint_path(child).encode())
        return digest.hexdigest()
    return hashlib.sha256(str(path).encode()).hexdigest()


def content_key(task_name: str, settings: Any, files: list[str | Path] = ()) -> str:  # type: ignore[assignment]
    payload = json.dumps({"task": task_name, "settings": settings}, sort_keys=True, default=str)
    digest = hashlib.sha256(payload.encode())
    for f in files:
        digest.update(fingerprint_path(f).encode())
    return f"{task_name}-{digest.hexdigest()[:32]}"


def is_transient(exc: BaseException | None) -> bool:
    """Worth a retry: a network hiccup, or another process holding the catalog's write lock."""
    if exc is None:
        return False
    if isinstance(exc, TRANSIENT):
        return True
    text = str(exc).lower()
    return "could not set lock" in text or "conflicting lock" in text or "resource temporarily unavailable" in text


def retry_on_transient(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's retry_condition_fn signature
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - we only classify it
        return is_transient(exc)
    return False
