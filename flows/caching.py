"""Cache keys from the content of a task's inputs, and cached results that are data, never code.

A key covers the task's name, its settings, and the bytes of the files it reads (sources,
model folders, shards), so an edited file or setting recomputes and nothing else does.
Digests of large files are remembered by (path, size, mtime) to keep lookups cheap.

Why data-only results: Prefect persists a task's result as a record file under
``<workdir>/.prefect-results/<cache key>``, and by default its payload is a pickle (Prefect's default serializer) that a
cache hit unpickles. Keys can be computed in advance, and workspaces are shared folders, so a
planted file ran code on the next run. Worse, the record names its own serializer, and Prefect
reads a record with the serializer the *record* names (even its ``json`` serializer imports
any class a record names). So here both halves are ours:

* :class:`DataOnlySerializer` writes plain JSON and reads it with ``json.loads`` and nothing
  else: no object hooks, no imports; a value that is not plain JSON data is refused when
  written, so what a cache hit returns equals what the task returned.
* :class:`DataOnlyKeyStorage` holds the record under each cache key and hands it to Prefect
  only after checking, with the standard library alone, that it is exactly such a record
  (keys, our serializer, a JSON result file inside the folder); anything else (a pickle,
  another serializer, a truncated write) reads as absent, so the task recomputes, with a log
  line, and overwrites it. Writes are atomic (temp file, rename).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from prefect.filesystems import LocalFileSystem
from prefect.logging import get_logger
from prefect.serializers import Serializer

from curation.store import CatalogBusyError

DATA_ONLY = "winnow-data-json"
MAX_RECORD_BYTES = 64 << 20  # task results are small summaries; a bigger file is not ours
_METADATA_KEYS = {"storage_key", "expiration", "serializer", "prefect_version", "storage_block_id"}
log = get_logger("winnow.cache")


class NotDataError(TypeError):
    pass


def _check_data(value: Any, where: str = "result") -> None:
    """Plain JSON data only: None, bool, int, finite float, str, list, dict with str keys."""
    if value is None or isinstance(value, bool | int | str):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise NotDataError(f"{where} is {value!r}, which JSON cannot hold")
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_data(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise NotDataError(f"{where} has a non-string key {key!r}")
            _check_data(item, f"{where}[{key!r}]")
        return
    raise NotDataError(f"{where} is a {type(value).__name__}, not plain JSON data")


class DataOnlySerializer(Serializer):
    """Plain JSON in, plain JSON out: nothing read back can name a type, a module or a function."""

    type: Literal["winnow-data-json"] = DATA_ONLY

    def dumps(self, obj: Any) -> bytes:
        if isinstance(obj, BaseException):  # Prefect persists a failed task's exception: keep its text only
            obj = {"error": type(obj).__name__, "message": str(obj)}
        _check_data(obj)
        return json.dumps(obj, allow_nan=False, ensure_ascii=False).encode("utf-8")

    def loads(self, blob: bytes) -> Any:
        return json.loads(blob)


def data_only_metadata(content: bytes, results: Path) -> str | None:
    """Why `content` is not a cache record this module wrote (None when it is), checked without Prefect.

    A record is the metadata Prefect keeps under a cache key: it must name our serializer, no
    storage block, and a result file inside `results` that holds JSON.
    """
    if len(content) > MAX_RECORD_BYTES:
        return f"larger than {MAX_RECORD_BYTES} bytes"
    try:
        metadata = json.loads(content)
    except (UnicodeDecodeError, ValueError):
        return "not JSON"
    if not isinstance(metadata, dict) or not set(metadata) <= _METADATA_KEYS:
        return "not a result record"
    if metadata.get("serializer") != {"type": DATA_ONLY}:
        return f"written with another serializer ({str(metadata.get('serializer'))[:80]})"
    if metadata.get("storage_block_id") is not None:
        return "points at a storage block"
    if not all(metadata.get(k) is None or isinstance(metadata.get(k), str) for k in ("expiration", "prefect_version")):
        return "unexpected record metadata"
    key = metadata.get("storage_key")
    if not isinstance(key, str) or not key:
        return "names no result file"
    base = results.resolve()
    target = (base / key).resolve()
    if not target.is_relative_to(base) or not target.is_file():
        return "its result file is missing or outside the results folder"
    if target.stat().st_size > MAX_RECORD_BYTES:
        return "its result file is too large"
    try:
        json.loads(target.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError):
        return "its result file is not JSON"
    return None


class DataOnlyKeyStorage(LocalFileSystem):
    """Prefect's cache-key records (result metadata) in a workspace folder, handed to Prefect only
    after :func:`data_only_metadata` accepted them; a rejected one reads as absent (recompute)."""

    _block_type_name = "Winnow Data-Only Cache Keys"
    def _checked(self, path: str) -> bytes:
        resolved = self._resolve_path(path)
        if not resolved.is_file():
            raise ValueError(f"Path {resolved} does not exist.")
        with open(resolved, "rb") as handle:
            content = handle.read(MAX_RECORD_BYTES + 1)
        problem = data_only_metadata(content, self._resolve_path("").parent)  # keys/ sits in the results folder
        if problem is not None:
            log.warning("cached result %s is not a data-only record (%s): ignored, the task recomputes",
                        resolved.name, problem)
            raise ValueError(f"{resolved} is not a data-only result record ({problem})")
        return content

    def read_path(self, path: str, _sync: bool | None = None) -> bytes:  # noqa: ARG002 - Prefect passes _sync
        return self._checked(path)

    async def aread_path(self, path: str) -> bytes:
        return self._checked(path)

    def _write(self, path: str, content: bytes) -> str:
        target = self._resolve_path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(content)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return str(target)

    def write_path(self, path: str, content: bytes, _sync: bool | None = None) -> str:  # noqa: ARG002
        return self._write(path, content)

    async def awrite_path(self, path: str, content: bytes) -> str:
        return self._write(path, content)


KEYS = "keys"  # the records under each cache key, in a sub-folder of the results


def results_folder(workdir: Path | str) -> Path:
    """Where a workspace's task results live: ``<workdir>/.prefect-results``."""
    return Path(workdir).resolve() / ".prefect-results"


def data_only_cache(task_fn: Any, workdir: Path | str) -> dict[str, Any]:
    """``Task.with_options`` settings that keep `task_fn`'s cached results data-only in `workdir`.

    Results (bare JSON payloads) go to ``.prefect-results/<cache key>``, read only by
    :class:`DataOnlySerializer`; the record under each cache key goes to
    ``.prefect-results/keys/<cache key>`` through :class:`DataOnlyKeyStorage`, so Prefect reads
    a key's record, and the serializer it names, only after the check. Prefect stores the two apart only when the cache policy names
    a key storage, hence the policy's ``configure``.
    """
    from prefect.cache_policies import NO_CACHE, CachePolicy

    folder = results_folder(workdir)
    options: dict[str, Any] = {"result_storage": folder, "result_serializer": DataOnlySerializer()}
    policy = task_fn.cache_policy
    if isinstance(policy, CachePolicy) and policy is not NO_CACHE:
        options["cache_policy"] = policy.configure(key_storage=DataOnlyKeyStorage(basepath=str(folder / KEYS)))
    return options


def keyed_by(cache_key_fn: Any) -> Any:
    """A task's cache policy from a key function (a policy, not `cache_key_fn`, so that
    :func:`data_only_cache` can give it a key storage)."""
    from prefect.cache_policies import CachePolicy

    return CachePolicy.from_cache_key_fn(cache_key_fn)


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
    if isinstance(exc, (*TRANSIENT, CatalogBusyError)):
        return True
    text = str(exc).lower()
    return "could not set lock" in text or "conflicting lock" in text or "resource temporarily unavailable" in text


def retry_on_transient(task, task_run, state) -> bool:  # noqa: ANN001 - Prefect's retry_condition_fn signature
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - we only classify it
        return is_transient(exc)
    return False
