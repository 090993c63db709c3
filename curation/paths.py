"""Paths under the workspace, run ids, and file-system faults, checked in one place.

Why: a run id or a shard path comes from the user, a recipe or a file in a (possibly shared)
workspace. Used as a folder name unchecked, ``../../victim`` writes and deletes outside the
workdir. Every path derived from such input is built here: the run id must match
:data:`RUN_ID_PATTERN`, and the joined path must resolve inside the workdir.

File-system faults (disk full, read-only or forbidden folder) are the user's to fix, so they
become one line (:func:`fault_message`), never a traceback.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from curation.errors import WinnowError

RUN_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RUN_ID_RULE = "letters, digits, '.', '_' and '-', starting with a letter or digit, at most 128 characters"


class InvalidRunIdError(WinnowError):
    pass


class OutsideWorkdirError(WinnowError):
    pass


def check_run_id(run_id: object) -> str:
    """The run id itself when it matches :data:`RUN_ID_PATTERN`; else one line saying the rule.

    The one check of run ids: the CLI, the flow config and the library entry points call it.
    """
    if not isinstance(run_id, str) or not RUN_ID_PATTERN.fullmatch(run_id):
        raise InvalidRunIdError(f"invalid run id {run_id!r}: use {RUN_ID_RULE}")
    return run_id


def inside(root: Path | str, *parts: str | Path) -> Path:
    """``root / parts``, refused unless it resolves (symlinks followed) inside ``root``."""
    root = Path(root)
    path = root.joinpath(*parts)
    base = root.resolve()
    if not path.resolve().is_relative_to(base):
        shown = "/".join(str(p) for p in parts)
        raise OutsideWorkdirError(f"{shown!r} leads outside the workspace {base}")
    return path


def contained(root: Path | str, path: Path | str) -> Path:
    """`path` itself (absolute, or relative to the current folder), refused unless it lies inside `root`.

    For paths read back from the workspace (a cached task result naming a file): they may name
    any file there, but none outside it.
    """
    base = Path(root).resolve()
    if not Path(path).resolve().is_relative_to(base):
        raise OutsideWorkdirError(f"{str(path)!r} lies outside the workspace {base}")
    return Path(path)


def run_dir(workdir: Path | str, run_id: str) -> Path:
    """The run's folder, ``<workdir>/<run_id>``: the run id checked, the path kept inside the workdir."""
    return inside(workdir, check_run_id(run_id))


# -- file-system faults -------------------------------------------------------------------------

FAULTS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
}
# DuckDB reports the same faults as its own IOException, with the OS's text.
_FAULT_TEXT = {"no space left on device": errno.ENOSPC, "disk quota exceeded": errno.EDQUOT,
               "read-only file system": errno.EROFS, "permission denied": errno.EACCES}


def fault_message(exc: BaseException) -> str | None:
    """One line for a disk-full, read-only or permission fault (an OSError or DuckDB's IO error), else None."""
    code = getattr(exc, "errno", None) if isinstance(exc, OSError) else None
    if code is None and type(exc).__module__.split(".")[0] in ("duckdb", "_duckdb"):
        text = str(exc).lower()
        code = next((c for phrase, c in _FAULT_TEXT.items() if phrase in text), None)
    if code not in FAULTS:
        return None
    where = getattr(exc, "filename", None)
    hint = ("free some space or pass another --workdir" if code in (errno.ENOSPC, errno.EDQUOT)
            else "pass a --workdir you can write to")
    detail = f" ({where})" if where else f" ({str(exc).splitlines()[0][:200]})" if not isinstance(exc, OSError) else ""
    return f"{FAULTS[code]}{detail}: {hint}"


@contextmanager
def faults_in_one_line() -> Iterator[None]:
    """Inside the block, a disk-full, read-only or permission fault is raised as a WinnowError."""
    try:
        yield
    except WinnowError:
        raise
    except Exception as exc:
        message = fault_message(exc)
        if message is None:
            raise
        raise WinnowError(message) from None
