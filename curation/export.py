"""Export a run's kept pairs for use outside Winnow: a `datasets` folder, JSONL, or a hub dataset.

Why: the shards are training's hand-off (parquet plus a manifest, reference log-probs
included); a user who wants "the curated data" wants something `datasets.load_from_disk`,
`load_dataset("json", ...)` or the hub takes as it is. The rows are the shards' (TRL's layout:
prompt/chosen/rejected, message lists for conversational pairs, `tools` when they carry
function schemas) in teaching order (stage,
then position); the curation columns (margin, weight, stage, source line...) come on request.

Layout of ``--to DIR``::

    DIR/dataset/        Dataset.save_to_disk (a DatasetDict with one split per stage, with per_stage)
    DIR/pairs.jsonl     one pair a line (stage-K.jsonl per stage, with per_stage)
    DIR/export.json     what was exported: run, rows per stage, columns

``--to hf:NAME`` pushes the same dataset with ``push_to_hub`` when a token and the hub are
there, and says in one line what is missing when not.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from curation.config_fields import setting
from curation.errors import WinnowError

if TYPE_CHECKING:  # the CLI imports ExportOptions for its help text: the heavy modules load on use
    import polars as pl

    from curation.store import Catalog

HUB_PREFIX = "hf:"
_HUB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")
TRL_COLUMNS = ("prompt", "chosen", "rejected")
MARKER = "export.json"


@dataclass
class ExportOptions:
    """What `winnow export` writes."""

    stage: int | None = setting(None, help="Export only this sDPO stage (default: every stage, in teaching order).")
    per_stage: bool = setting(False, help="One split (and one JSONL file) per stage instead of one for all.")
    curation_columns: bool = setting(False, help="Add what curation knows of each pair: pair_id, stage, position, "
                                                 "source line, ratings, margin, beta weight, token lengths, edit "
                                                 "distance, reference log-probs.")
    private: bool = setting(True, help="hf:NAME only: create the hub dataset as private.")


@dataclass
class ExportResult:
    run_id: str
    destination: str
    rows: int
    rows_per_stage: dict[int, int]
    columns: list[str]
    files: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "destination": self.destination, "rows": self.rows,
                "rows_per_stage": {str(k): v for k, v in self.rows_per_stage.items()}, "columns": self.columns,
                "files": self.files}


def kept_frame(catalog: Catalog, run_id: str, options: ExportOptions) -> pl.DataFrame:
    """The kept pairs in TRL's layout and teaching order, with a `stage` column (dropped unless asked for)."""
    from curation.reads import has_rows, kept_curation_columns, kept_order, kept_pair_rows, run_config
    from curation.shard import shard_frame

    if run_config(catalog, run_id) is None:
        raise WinnowError(f"no run {run_id!r} in {catalog.path}")
    if not has_rows(catalog, "decisions", run_id):
        raise WinnowError(f"run {run_id} is not curated yet: run `winnow curate` first")
    order = kept_order(catalog, run_id, options.stage)
    if order.height == 0:
        which = f"stage {options.stage}" if options.stage is not None else "any stage"
        raise WinnowError(f"run {run_id} keeps no pairs in {which}")
    shards = shard_frame(kept_pair_rows(catalog, run_id, order))[0]
    trl = [*TRL_COLUMNS, *(["tools"] if "tools" in shards.columns else [])]  # tool schemas ride with conversations
    frame = shards.select("stage", "pair_id", *trl)
    if options.curation_columns:
        extra = kept_curation_columns(catalog, run_id).drop("stage")
        frame = frame.join(extra, on="pair_id", how="left", maintain_order="left")
        frame = frame.select("stage", *trl, *extra.columns)
    else:
        frame = frame.drop("pair_id")
    return frame


def _datasets(frame: pl.DataFrame, options: ExportOptions) -> Any:
    """A Dataset (all stages) or a DatasetDict with one split per stage."""
    from datasets import Dataset, DatasetDict

    keep_stage = options.curation_columns
    if not options.per_stage:
        return Dataset.from_polars(frame if keep_stage else frame.drop("stage"))
    return DatasetDict({f"stage_{int(part['stage'][0])}": Dataset.from_polars(part if keep_stage else part.drop("stage"))
                        for part in frame.partition_by("stage", maintain_order=True)})


def export_run(catalog: Catalog, run_id: str, destination: str, options: ExportOptions | None = None) -> ExportResult:
    """Write (or push) the run's kept pairs; see the module docstring for the layout."""
    options = options or ExportOptions()
    frame = kept_frame(catalog, run_id, options)
    per_stage = {int(k): int(v) for k, v in frame.group_by("stage").len().sort("stage").iter_rows()}
    columns = [c for c in frame.columns if c != "stage" or options.curation_columns]
    if destination.startswith(HUB_PREFIX):
        name = destination[len(HUB_PREFIX):]
        push_to_hub(_datasets(frame, options), name, options.private)
        return ExportResult(run_id, destination, frame.height, per_stage, columns)
    return _write_folder(frame, run_id, Path(destination), options, per_stage, columns)


def _write_folder(frame: pl.DataFrame, run_id: str, folder: Path, options: ExportOptions,
                  per_stage: dict[int, int], columns: list[str]) -> ExportResult:
    if folder.exists() and (not folder.is_dir() or (any(folder.iterdir()) and not (folder / MARKER).is_file())):
        raise WinnowError(f"{folder} exists and is not an earlier export: pick an empty or new folder")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "dataset.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    _datasets(frame, options).save_to_disk(str(tmp))
    shutil.rmtree(folder / "dataset", ignore_errors=True)
    tmp.rename(folder / "dataset")
    for stale in [*folder.glob("stage-*.jsonl"), folder / "pairs.jsonl"]:
        stale.unlink(missing_ok=True)
    files = ["dataset"]
    parts = frame.partition_by("stage", maintain_order=True) if options.per_stage else [frame]
    for part in parts:
        name = f"stage-{int(part['stage'][0])}.jsonl" if options.per_stage else "pairs.jsonl"
        (part if options.curation_columns else part.drop("stage")).write_ndjson(folder / name)
        files.append(name)
    result = ExportResult(run_id, str(folder), frame.height, per_stage, columns, files)
    (folder / MARKER).write_text(json.dumps(result.to_dict(), indent=1) + "\n", encoding="utf-8")
    return result


def push_to_hub(dataset: Any, name: str, private: bool = True) -> None:
    """``dataset.push_to_hub(name)`` when a token and the hub are there; else one WinnowError line."""
    from curation.env import environment
    from curation.lm.hub import hub_offline, hub_reachable

    if not _HUB_NAME.match(name):
        raise WinnowError(f"hf:{name}: not a hub dataset name (expected hf:OWNER/NAME)")
    import huggingface_hub

    token = huggingface_hub.get_token()
    if not token:
        raise WinnowError(f"hf:{name}: no Hugging Face token (set HF_TOKEN or run `hf auth login`)")
    if hub_offline() or not hub_reachable():
        raise WinnowError(f"hf:{name}: the hub ({environment().hf_endpoint}) is offline or unreachable")
    try:
        dataset.push_to_hub(name, token=token, private=private)
    except Exception as exc:  # noqa: BLE001 - the hub's errors are many; the user needs the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WinnowError(f"hf:{name}: push failed: {first}") from None
