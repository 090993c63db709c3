"""Parquet shards per sDPO stage in TRL's column layout (curation/manifest.py describes them).

Why this layout: TRL's DPOTrainer reads `prompt`/`chosen`/`rejected` (strings, or message
lists for conversational data) and, with `precompute_ref_log_probs`, the columns
`ref_chosen_logps`/`ref_rejected_logps`; a shard loads as it is with
``datasets.load_dataset("parquet", data_files=...)``. `pair_id` rides along so any training
number can be joined back to the catalog.

Determinism: rows in stage order, an explicit Arrow schema, fixed compression, one row group,
and no timestamps anywhere (neither in the files nor in the manifest), so the same inputs and
seed give byte-identical shards and an identical manifest.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from curation.manifest import REF_LOGP_COLUMNS
from curation.reads import kept_pair_rows
from curation.store import Catalog

MESSAGES = pl.List(pl.Struct({"role": pl.String, "content": pl.String}))
# What TRL passes to a chat template besides role and content; a shard's message struct carries each
# one only when some message of the run has it, so plain conversations keep {role, content}.
# Tool-call arguments are JSON text (curation/ingest/messages.py says why).
TOOL_CALLS = pl.List(pl.Struct({"id": pl.String, "type": pl.String,
                                "function": pl.Struct({"name": pl.String, "arguments": pl.String})}))
OPTIONAL_MESSAGE_FIELDS: dict[str, pl.DataType] = {"name": pl.String(), "tool_call_id": pl.String(),
                                                   "tool_calls": TOOL_CALLS}
MESSAGE_COLUMNS = ("prompt_messages", "chosen_messages", "rejected_messages")


@dataclass
class ShardInfo:
    stage: int
    path: Path
    rows: int
    bytes: int
    sha256: str


@dataclass
class ShardSet:
    shards: list[ShardInfo]
    columns: list[str]
    conversational: bool
    ref_logps: bool
    ref_logps_note: str


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_name(stage: int) -> str:
    return f"stage-{stage}.parquet"


def message_type(rows: pl.DataFrame) -> pl.DataType:
    """The message list type of a run's shards: {role, content} plus the optional fields its messages use."""
    fields: dict[str, pl.DataType] = {"role": pl.String(), "content": pl.String()}
    for key, dtype in OPTIONAL_MESSAGE_FIELDS.items():
        if any(rows[c].str.contains(f'"{key}"', literal=True).any() for c in MESSAGE_COLUMNS):
            fields[key] = dtype
    return pl.List(pl.Struct(fields))


def _as_messages(json_col: str, text_col: str, role: str, dtype: pl.DataType = MESSAGES) -> pl.Expr:
    """Decoded message list; pairs of a mixed run that came as plain text become one message."""
    decoded = pl.col(json_col).str.json_decode(dtype)
    fields = {f.name: pl.lit(None, f.dtype) for f in dtype.inner.fields}
    fields.update(role=pl.lit(role), content=pl.col(text_col))
    wrapped = pl.concat_list(pl.struct(**fields))
    return pl.when(pl.col(json_col).is_null()).then(wrapped).otherwise(decoded).alias(text_col)


def shard_frame(rows: pl.DataFrame, chat_template_logps: bool = False) -> tuple[pl.DataFrame, bool, bool, str]:
    """(frame in TRL layout, conversational, ref columns included, why or why not).

    The reference log-prob columns ride along when every kept pair has them; for conversations
    only when the scorer computed them on the chat template's tokens (``chat_template_logps``,
    from the run's score record), which is what TRL trains on.
    """
    conversational = rows["prompt_messages"].null_count() < rows.height
    has_ref = rows.height > 0 and all(c in rows.columns and rows[c].null_count() == 0 for c in REF_LOGP_COLUMNS)
    if conversational:
        dtype = message_type(rows)
        tools = ["tools"] if "tools" in rows.columns and rows["tools"].null_count() < rows.height else []
        frame = rows.select(
            "stage",
            _as_messages("prompt_messages", "prompt", "user", dtype),
            _as_messages("chosen_messages", "chosen", "assistant", dtype),
            _as_messages("rejected_messages", "rejected", "assistant", dtype),
            *tools,  # JSON text of the function schemas; TRL's DPOTrainer decodes it for the chat template
            "pair_id",
        )
        if has_ref and chat_template_logps:
            frame = frame.with_columns(*(rows[c] for c in REF_LOGP_COLUMNS)).select(
                *[c for c in frame.columns if c != "pair_id"], *REF_LOGP_COLUMNS, "pair_id")
            return frame, True, True, ("included: computed by the scorer on the chat template's tokens (as TRL "
                                       "tokenises conversations) with the manifest's tokenizer and max_length")
        why = ("the scores' log-probs were computed on rendered text, not on the chat template training applies"
               if has_ref else "the run was scored without a reference model (or some kept pairs lack log-probs)")
        return frame, True, False, f"omitted: conversational pairs; {why}"
    columns = ["stage", "prompt", "chosen", "rejected", *(REF_LOGP_COLUMNS if has_ref else ()), "pair_id"]
    note = ("included: computed by the scorer with the manifest's tokenizer and max_length" if has_ref else
            "omitted: the run was scored without a reference model (or some kept pairs lack log-probs)")
    return rows.select(columns), False, has_ref, note


def _plain(t: pa.DataType) -> pa.DataType:
    """`string` for large_string and `list` for large_list, at any depth (tool calls nest three deep)."""
    if pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return pa.string()
    if pa.types.is_large_list(t) or pa.types.is_list(t):
        return pa.list_(_plain(t.value_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(x.name, _plain(x.type)) for x in t])
    return t


def _arrow(frame: pl.DataFrame) -> pa.Table:
    """Plain `string`/`double` types (not Arrow's large_string), the layout `datasets` writes itself."""
    table = frame.to_arrow()
    return table.cast(pa.schema([pa.field(f.name, _plain(f.type)) for f in table.schema]))


def write_shards(catalog: Catalog, run_id: str, order: pl.DataFrame, out_dir: Path,
                 compression: str = "zstd", chat_template_logps: bool = False) -> ShardSet:
    """One parquet file per stage under `out_dir`; stale stage files of an earlier run are removed.

    `chat_template_logps`: the scorer tokenised conversations with the chat template (see :func:`shard_frame`).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("stage-*.parquet"):
        stale.unlink()
    frame, conversational, has_ref, note = shard_frame(kept_pair_rows(catalog, run_id, order), chat_template_logps)
    shards: list[ShardInfo] = []
    columns = [c for c in frame.columns if c != "stage"]
    for stage_frame in frame.partition_by("stage", maintain_order=True):
        stage = int(stage_frame["stage"][0])
        table = _arrow(stage_frame.drop("stage"))
        path = out_dir / shard_name(stage)
        tmp = path.with_suffix(".tmp")
        pq.write_table(table, tmp, compression=compression, row_group_size=max(table.num_rows, 1),
                       use_dictionary=True, write_statistics=True, store_schema=True)
        tmp.replace(path)
        shards.append(ShardInfo(stage, path, table.num_rows, path.stat().st_size, sha256_file(path)))
    return ShardSet(shards, columns, conversational, has_ref, note)
