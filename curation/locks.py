"""One process at a time per run folder: an advisory lock file the OS releases when the process dies.

Why: two runs of one run id (the same inputs in one workdir) write the same exported pairs,
score parts and shards; one deleted the other's score parts mid-run. A run holds
``<workdir>/<run_id>/.lock`` (``flock``, exclusive) from start to end; a second run waits,
bounded (``WINNOW_RUN_LOCK_WAIT``, curation.env), then fails in one line naming the holder.
``flock`` belongs to the open file, so a killed run (even SIGKILL) leaves no stale lock: the
file may stay, the lock does not.

Re-entrant within a thread (a flow that holds the lock may call library code that takes it
again); another thread of the same process waits like another process would.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from curation.env import environment
from curation.errors import WinnowError

LOCK_FILE = ".lock"
_POLL_S = 0.2


class RunLockedError(WinnowError):
    pass


_held: dict[str, tuple[int, int]] = {}  # lock path -> (holding thread id, depth)
_held_guard = threading.Lock()


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
    except OSError:
        return ""
    return f" (PID {text})" if text.isdigit() else ""


@contextmanager
def run_lock(folder: Path | str, wait_s: float | None = None) -> Iterator[Path]:
    """Hold `folder`'s lock file for the block; wait up to `wait_s` (default: the env knob) for it.

    `folder` is a run folder already checked to lie inside the workdir (curation.paths.run_dir).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    key = str(path.resolve())
    me = threading.get_ident()
    with _held_guard:
        owner = _held.get(key)
        if owner is not None and owner[0] == me:
            _held[key] = (me, owner[1] + 1)
            reentered = True
        else:
            reentered = False
    if reentered:
        try:
            yield path
        finally:
            with _held_guard:
                thread, depth = _held[key]
                _held[key] = (thread, depth - 1)
        return

    wait = environment().run_lock_wait_s if wait_s is None else wait_s
    try:  # never through a planted symlink, never into another file's hard link
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise WinnowError(f"{path} is a symbolic link, not a lock file: remove it") from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            raise WinnowError(f"{path} is not a plain lock file: remove it")
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise RunLockedError(
                        f"run folder {folder} is in use by another Winnow process{_holder(fd)}; waited {wait:g} s "
                        "(WINNOW_RUN_LOCK_WAIT): let it finish, or pass another --run-id") from None
                time.sleep(_POLL_S)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        with _held_guard:
            _held[key] = (me, 1)
        try:
            yield path
        finally:
            with _held_guard:
                _held.pop(key, None)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
