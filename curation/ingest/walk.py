"""Expand folders and `**` globs without following a symlink loop or reaching one folder twice.

`glob.glob(recursive=True)` follows every symlinked folder: a link back to its parent made it
read one file 41 times (until the kernel's ELOOP), and two such links never finished. Here a
folder is entered once, by the identity of what it is (device and inode), so links to folders
still work (a data folder made of links) while loops and repeats cannot happen. Real folders
are walked before linked ones, so a file reachable both ways is labelled by its path through
real folders.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
from collections import deque
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path

MAGIC = re.compile(r"[*?\[]")


def walk_files(root: Path, descend: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Every file path under `root` (links to files included), each folder entered once.

    The tree under `root` is walked without following links first; the linked folders it
    holds are then walked the same way, unless their target was already entered. `descend`
    says which folders below `root` are worth entering (a glob prunes what cannot match).
    """
    entered: set[tuple[int, int]] = set()
    pending: deque[Path] = deque([root])
    while pending:
        top = pending.popleft()
        for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
            try:
                stat = os.stat(dirpath)
            except OSError:
                dirnames[:] = []
                continue
            key = (stat.st_dev, stat.st_ino)
            if key in entered:
                dirnames[:] = []
                continue
            entered.add(key)
            here = Path(dirpath)
            if descend is not None:
                dirnames[:] = [d for d in dirnames if descend(here / d)]
            for name in sorted(dirnames):
                if (here / name).is_symlink():
                    pending.append(here / name)  # os.walk lists links to folders but does not enter them
            yield from (here / name for name in filenames)


def _split(pattern: str) -> tuple[Path, list[str]]:
    """The literal folder a pattern starts in, and the pattern's remaining segments."""
    parts = Path(pattern).parts
    literal = 0
    while literal < len(parts) - 1 and not MAGIC.search(parts[literal]):
        literal += 1
    root = Path(*parts[:literal]) if literal else Path(".")
    return root, list(parts[literal:])


def _segment_matches(segment: str, name: str) -> bool:
    """glob's rule for one path segment: `*` and `?` never match a leading dot."""
    if name.startswith(".") and not segment.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, segment)


def _matches(segments: tuple[str, ...], parts: tuple[str, ...], prefix: bool = False) -> bool:
    """`**` is any number of non-hidden names (none included); other segments match one name each.

    With `prefix`, whether `parts` (a folder) can begin a match, so that a walk enters it.
    """

    @cache
    def match(i: int, j: int) -> bool:
        if prefix and j == len(parts):
            return True
        if i == len(segments):
            return j == len(parts)
        if segments[i] == "**":
            if match(i + 1, j):
                return True
            return j < len(parts) and not parts[j].startswith(".") and match(i, j + 1)
        return j < len(parts) and _segment_matches(segments[i], parts[j]) and match(i + 1, j + 1)

    return match(0, 0)


def glob_files(pattern: str) -> list[Path]:
    """The paths a glob pattern matches, in glob's order (sorted text); `**` crosses folders safely.

    A pattern without `**` descends a fixed number of levels, so glob itself cannot loop;
    repeats through links are dropped by the caller, which compares real paths. With `**`,
    the walk starts in the pattern's literal folder and enters only folders that can match.
    """
    if "**" not in pattern:
        return [Path(p) for p in sorted(glob.glob(pattern))]
    root, segments = _split(pattern)
    if not root.is_dir():
        return []
    pattern_parts = tuple(segments)

    def descend(folder: Path) -> bool:
        return _matches(pattern_parts, folder.relative_to(root).parts, prefix=True)

    found = [p for p in walk_files(root, descend) if _matches(pattern_parts, p.relative_to(root).parts)]
    return sorted(found, key=str)
