"""Turn the user's SOURCE arguments into concrete inputs: files, or a `datasets` name."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from curation.errors import MissingSourceError, WinnowError
from curation.ingest.compression import COMPRESSION_SUFFIXES
from curation.ingest.walk import MAGIC, glob_files, walk_files

FILE_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
COMPRESSIBLE = ("jsonl", "json", "csv")  # Parquet compresses its own pages and needs random access
HUB_PREFIX = "hf:"
KINDS_HELP = ".jsonl/.json/.parquet/.csv (.jsonl, .json and .csv also as .gz, .bz2, .xz or .zst)"


@dataclass(frozen=True)
class Source:
    """One input: a file of a known kind, or a Hugging Face dataset (`hf:NAME[:SPLIT]`).

    A compressed file has the kind of the name inside (`pairs.jsonl.gz` is jsonl); the readers
    decompress it (curation.ingest.compression).
    """

    kind: str  # jsonl | json | parquet | csv | hub
    location: str  # file path, or dataset name
    split: str = "train"

    @property
    def label(self) -> str:
        return f"hf:{self.location}:{self.split}" if self.kind == "hub" else self.location

    def fingerprint(self) -> str:
        """Content hash of the bytes as stored: a changed file gives a new run id, a renamed one does not."""
        if self.kind == "hub":
            return hashlib.sha256(self.label.encode()).hexdigest()
        digest = hashlib.sha256()
        try:
            with open(self.location, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
        except OSError as exc:
            raise WinnowError(f"{self.location}: cannot read ({exc.strerror or exc})") from None
        return digest.hexdigest()


def file_kind(path: Path) -> str | None:
    """The kind a file name says: `.jsonl`, `.json`, `.csv`, `.parquet`, or one of the first three compressed."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSION_SUFFIXES:
        kind = FILE_KINDS.get(suffixes[-2]) if len(suffixes) > 1 else None
        return kind if kind in COMPRESSIBLE else None
    return FILE_KINDS.get(suffixes[-1]) if suffixes else None


def _file_source(path: Path) -> Source | None:
    kind = file_kind(path)
    return Source(kind, str(path)) if kind else None


def _unsupported(path: Path) -> str:
    suffixes = "".join(path.suffixes[-2:]).lower()
    if suffixes.startswith(".parquet") and path.suffix.lower() in COMPRESSION_SUFFIXES:
        return f"{path}: compressed Parquet is not supported (Parquet compresses its pages itself); decompress it"
    return f"{path}: unsupported file type {path.suffix!r}; use {KINDS_HELP}"


def _real(source: Source) -> str:
    """What makes two sources the same input: the file's real path, or the dataset's label."""
    return source.label if source.kind == "hub" else os.path.realpath(source.location)


def resolve_sources(specs: list[str]) -> list[Source]:
    """Expand files, folders (recursively) and globs; keep the user's order, drop repeats.

    A file reached twice (named twice, through a link, or through a symlink loop) is read
    once, under the first path that reached it; no walk follows a loop (curation.ingest.walk).
    """
    if not specs:
        raise WinnowError("no SOURCE given: pass files, folders, globs or hf:DATASET")
    found: list[Source] = []
    for spec in specs:
        if spec.startswith(HUB_PREFIX):
            name, _, split = spec[len(HUB_PREFIX) :].partition(":")
            if not name:
                raise WinnowError(f"empty dataset name in {spec!r}: use hf:NAME or hf:NAME:SPLIT")
            found.append(Source("hub", name, split or "train"))
            continue
        path = Path(spec)
        if MAGIC.search(spec):
            sources = [s for p in glob_files(spec) if p.is_file() and (s := _file_source(p))]
            if not sources:
                raise MissingSourceError(f"no {KINDS_HELP} file matches {spec!r}")
            found.extend(sources)
        elif path.is_dir():
            sources = [s for p in sorted(walk_files(path)) if p.is_file() and (s := _file_source(p))]
            if not sources:
                raise MissingSourceError(f"folder {spec} holds no {KINDS_HELP} file")
            found.extend(sources)
        elif path.is_file():
            source = _file_source(path)
            if source is None:
                raise WinnowError(_unsupported(path))
            found.append(source)
        else:
            raise MissingSourceError(f"{spec}: no such file or folder (for a Hugging Face dataset, write hf:{spec})")
    unique: dict[str, Source] = {}
    for source in found:
        unique.setdefault(_real(source), source)
    return list(unique.values())
