"""Turn the user's SOURCE arguments into concrete inputs: files, or a `datasets` name."""

from __future__ import annotations

import glob
import hashlib
from dataclasses import dataclass
from pathlib import Path

from curation.errors import MissingSourceError, WinnowError

FILE_KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
HUB_PREFIX = "hf:"


@dataclass(frozen=True)
class Source:
    """One input: a file of a known kind, or a Hugging Face dataset (`hf:NAME[:SPLIT]`)."""

    kind: str  # jsonl | json | parquet | csv | hub
    location: str  # file path, or dataset name
    split: str = "train"

    @property
    def label(self) -> str:
        return f"hf:{self.location}:{self.split}" if self.kind == "hub" else self.location

    def fingerprint(self) -> str:
        """Content hash: a changed file gives a new run id, a renamed one does not."""
        if self.kind == "hub":
            return hashlib.sha256(self.label.encode()).hexdigest()
        digest = hashlib.sha256()
        with open(self.location, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()


def _file_source(path: Path) -> Source | None:
    kind = FILE_KINDS.get(path.suffix.lower())
    return Source(kind, str(path)) if kind else None


def resolve_sources(specs: list[str]) -> list[Source]:
    """Expand files, folders (recursively) and globs; keep the user's order, drop repeats."""
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
        if any(ch in spec for ch in "*?["):
            matches = [Path(p) for p in sorted(glob.glob(spec, recursive=True))]
            sources = [s for p in matches if p.is_file() and (s := _file_source(p))]
            if not sources:
                raise MissingSourceError(f"no .jsonl/.json/.parquet/.csv file matches {spec!r}")
            found.extend(sources)
        elif path.is_dir():
            sources = [s for p in sorted(path.rglob("*")) if p.is_file() and (s := _file_source(p))]
            if not sources:
                raise MissingSourceError(f"folder {spec} holds no .jsonl/.json/.parquet/.csv file")
            found.extend(sources)
        elif path.is_file():
            source = _file_source(path)
            if source is None:
                raise WinnowError(f"{spec}: unsupported file type {path.suffix!r}; use .jsonl, .json, .parquet or .csv")
            found.append(source)
        else:
            raise MissingSourceError(f"{spec}: no such file or folder (for a Hugging Face dataset, write hf:{spec})")
    unique: dict[str, Source] = {}
    for source in found:
        unique.setdefault(source.label, source)
    return list(unique.values())
