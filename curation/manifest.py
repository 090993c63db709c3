"""The curation -> training hand-off: one versioned manifest, written by curation, read by training.

Why a dataclass and a version: training trusts a shard folder only as far as the manifest
says how its numbers were made (which reference model computed the log-probs, with which
tokenizer, max_length and truncation), so both sides import this one type instead of
re-parsing a dict, and a manifest of another format is refused in one line, not half-read.
No timestamps: the same curation writes byte-identical manifests.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from curation.errors import WinnowError
from curation.jsonable import json_safe

MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "winnow-shards/2"
# The reference log-prob columns a shard carries and training reuses (TRL's names).
REF_LOGP_COLUMNS: tuple[str, ...] = ("ref_chosen_logps", "ref_rejected_logps")


class ShardIntegrityError(WinnowError):
    """A shard's bytes differ from what its manifest recorded (truncated, edited or replaced)."""


def file_sha256(path: Path | str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_digest(folder: Path | str) -> dict[str, str]:
    """sha256 of every file under `folder`, by relative path: what a checkpoint is checked against."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): file_sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


@dataclass(frozen=True)
class StageShard:
    """One sDPO stage's parquet file; `path` is relative to the manifest's folder."""

    stage: int
    path: str
    rows: int
    bytes: int
    sha256: str
    margin_min: float | None = None
    margin_max: float | None = None
    margin_mean: float | None = None


@dataclass(frozen=True)
class ReferenceInfo:
    """How the shards' reference log-probs (and token facts) were computed."""

    model: str | None  # the model that computed ref_*_logps (None: no reference pass ran)
    tokenizer: str | None
    max_length: int | None
    truncation_mode: str = "keep_start"
    margin_source: str | None = None


@dataclass
class ShardManifest:
    """Everything training needs to trust a shard folder."""

    run_id: str
    reference: ReferenceInfo
    stages: list[StageShard]
    columns: list[str]
    conversational: bool = False
    ref_logps_included: bool = False
    ref_logps_note: str = ""
    advice: dict[str, Any] | None = None
    order_by: str = "margin"
    counts: dict[str, Any] = field(default_factory=dict)
    curation: dict[str, Any] = field(default_factory=dict)  # settings and resolved filters, for the record
    format: str = MANIFEST_FORMAT
    root: Path | None = field(default=None, compare=False)  # the folder it was read from; not written

    def __post_init__(self) -> None:
        self.stages = sorted(self.stages, key=lambda s: s.stage)

    # -- paths ------------------------------------------------------------------------
    def shard_path(self, stage: StageShard) -> Path:
        """The stage's file, which must lie inside the manifest's folder (no `..`, no absolute path)."""
        if self.root is None:
            raise ValueError("manifest has no root folder; load it with ShardManifest.load")
        root = self.root.resolve()
        path = (root / stage.path).resolve()
        if not path.is_relative_to(root):
            raise WinnowError(f"manifest in {root} names a shard outside its folder: {stage.path!r}")
        return path

    def verified_path(self, stage: StageShard) -> Path:
        """:meth:`shard_path`, after checking the file's size and sha256 against this manifest.

        Why: a truncated or edited shard otherwise fails deep inside a parquet reader, or worse,
        trains on other data than curation decided.
        """
        path = self.shard_path(stage)
        if not path.is_file():
            raise WinnowError(f"shard {path} is missing: re-run `winnow curate`")
        size = path.stat().st_size
        if size != stage.bytes or file_sha256(path) != stage.sha256:
            raise ShardIntegrityError(
                f"shard {path} does not match the size and sha256 its manifest recorded: it was truncated or "
                "changed after curation; re-run `winnow curate` (or `winnow run --refresh`)")
        return path

    def selected(self, max_stages: int | None) -> list[StageShard]:
        return self.stages[:max_stages] if max_stages else list(self.stages)

    # -- serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "root"}
        data["reference"] = asdict(self.reference)
        data["stages"] = [asdict(s) for s in self.stages]
        return json_safe(data)

    def write(self, folder: Path) -> Path:
        """Sorted keys, fixed indentation, no timestamps: the same run writes the same bytes."""
        path = Path(folder) / MANIFEST_FILE
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True, allow_nan=False) + "\n"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        self.root = Path(folder)
        return path

    @classmethod
    def load(cls, folder: Path | str) -> ShardManifest:
        """Read a shard folder's manifest; another format, or a malformed one, fails in one line."""
        folder = Path(folder)
        path = folder / MANIFEST_FILE
        if not path.is_file():
            raise WinnowError(f"no {MANIFEST_FILE} in {folder}: run `winnow curate` first, or pass its shard folder")
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise WinnowError(f"{path} is not readable JSON ({str(exc).splitlines()[0]})") from None
        found = raw.get("format") if isinstance(raw, dict) else None
        if found != MANIFEST_FORMAT:
            raise WinnowError(f"{path} has format {found!r}; this Winnow reads {MANIFEST_FORMAT!r}: "
                              "re-run `winnow curate` to write the shards again")
        try:
            stages = [StageShard(**s) for s in raw["stages"]]
            reference = ReferenceInfo(**raw["reference"])
            known = {f.name for f in fields(cls)} - {"root", "stages", "reference"}
            manifest = cls(stages=stages, reference=reference, root=folder,
                           **{k: v for k, v in raw.items() if k in known})
        except (KeyError, TypeError) as exc:
            raise WinnowError(f"{path} is malformed ({exc})") from None
        if not manifest.stages:
            raise WinnowError(f"{path} lists no stages")
        return manifest


def find_shard_folder(path: Path | str) -> Path:
    """A run folder or its shards/ folder -> the folder holding manifest.json."""
    path = Path(path)
    if (path / "shards" / MANIFEST_FILE).is_file():
        return path / "shards"
    return path
