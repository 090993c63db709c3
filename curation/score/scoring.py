"""Score a run's pairs: stream them out of the catalog, compute every statistic, write `scores`.

Streaming: pairs leave DuckDB in Arrow batches and each batch's scores go to a parquet part
file, so memory holds one batch. Parts are loaded into the catalog in one transaction at
the end; a shard (index, count) scores only its share, which lets an orchestrator split
scoring into independent tasks and load all parts once.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from curation.config_fields import setting
from curation.errors import WinnowError
from curation.lm.tokenization import ChatTemplateError, TokenizedPairs, tokenize_conversations, tokenize_pairs
from curation.parquet_stream import open_parquet_stream
from curation.paths import run_dir
from curation.progress import progress_bar
from curation.reads import export_pairs_parquet, unrated_pairs
from curation.score.features import text_features, token_features
from curation.score.margins import (
    MARGIN_SOURCES,
    policy_margin,
    reference_margin,
    reward_model_margin,
    scores_margin,
)
from curation.store import Catalog, bounded_memory

REFERENCE_SCORE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "ref_chosen_logps_mean", "ref_rejected_logps_mean")
# What the score record says about conversations: tokenised with the model's chat template, as TRL
# trains on them (curation/shard.py ships their log-probs only then)
CONVERSATION_TOKENS = "chat_template"
MESSAGE_COLUMNS = ("prompt_messages", "chosen_messages", "rejected_messages")


@dataclass(frozen=True)
class ScoreOptions:
    """How pairs are measured. `max_length` is the one owner of the token budget: truncation flags,
    log-probs and (through the shard manifest) training follow it."""

    margin: str = setting("auto", help="Margin source: auto (ratings when every pair has them, else the "
                                       "reference), scores, reference, reward-model or policy.")
    max_length: int | None = setting(1024, help="Token budget of prompt + completion, as TRL's DPOConfig "
                                                "(default 1024): truncation flags, log-probs and training follow it.")
    truncation_mode: str = setting("keep_start", help="What truncation keeps: keep_start (TRL) or keep_end.")
    beta: float = setting(0.1, help="beta of the implicit reward, for the policy margin.")
    batch_pairs: int = setting(20_000, help="Pairs per scoring batch (memory holds one batch).")

    def __post_init__(self) -> None:
        if self.margin not in MARGIN_SOURCES:
            raise WinnowError(f"unknown margin source {self.margin!r}; choose one of {', '.join(MARGIN_SOURCES)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ScoringModels:
    """What the providers need; any may be None when its provider is not used."""

    tokenizer: Any
    tokenizer_name: str = "unknown"
    reference: Any = None  # causal LM: reference log-probs (and the `reference` margin)
    reference_name: str | None = None  # its path or hub id, recorded in the manifest
    reward_model: Any = None
    reward_tokenizer: Any = None
    policy: Any = None


@dataclass
class ScoreResult:
    run_id: str
    pairs: int
    margin_source: str
    parts: list[Path] = field(default_factory=list)


def scores_dir(workdir: Path, run_id: str) -> Path:
    return run_dir(workdir, run_id) / "scores"


def resolve_margin_source(requested: str, catalog: Catalog, run_id: str, models: ScoringModels | None) -> str:
    """`auto`: the source's ratings when every pair has them, else the reference model."""
    if requested != "auto":
        return requested
    unrated, total = unrated_pairs(catalog, run_id)
    if total and unrated == 0:
        return "scores"
    if models is None or models.reference is not None:
        return "reference"
    raise WinnowError("no ratings in the source and no reference model: pass --margin reward-model or a model")


def conversation_frame(frame: pl.DataFrame) -> pl.DataFrame:
    """Conversational pairs in TRL's layout (pair_id, prompt, chosen, rejected as message lists[, tools]),
    exactly as their shard gives them to TRL.

    Why through :func:`curation.shard.shard_frame`: TRL reads the messages from the parquet shard
    (struct fields a message lacks come back as None, which the chat template never sees), so
    the scorer decodes them with the very same expression. Pairs of a mixed run that came as
    plain text become one user and one assistant message, as in the shard.
    """
    from curation.shard import shard_frame

    rows = frame.select("pair_id", "prompt", "chosen", "rejected",
                        *(c for c in (*MESSAGE_COLUMNS, "tools") if c in frame.columns))
    if not has_messages(rows):  # only plain-text pairs here (a conversational run's): wrapped as the shard does
        turn = {"prompt": "user", "chosen": "assistant", "rejected": "assistant"}
        return rows.select("pair_id", *(pl.concat_list(pl.struct(role=pl.lit(role), content=pl.col(name))).alias(name)
                                        for name, role in turn.items()),
                           *(["tools"] if "tools" in rows.columns else []))
    trl, _, _, _ = shard_frame(rows.with_columns(stage=pl.lit(0)))
    trl = trl.drop("stage", strict=False)
    if "tools" in rows.columns and "tools" not in trl.columns:
        trl = trl.with_columns(rows["tools"])
    return trl


def conversation_rows(frame: pl.DataFrame) -> tuple[list, list, list, list | None]:
    """(prompts, chosens, rejecteds, tools) of :func:`conversation_frame` as Python lists, for the tokenizer."""
    trl = conversation_frame(frame)
    tools = trl["tools"].to_list() if "tools" in trl.columns else None
    return trl["prompt"].to_list(), trl["chosen"].to_list(), trl["rejected"].to_list(), tools


def has_messages(frame: pl.DataFrame) -> bool:
    """Whether any pair of the frame came as a conversation."""
    return "prompt_messages" in frame.columns and frame["prompt_messages"].null_count() < frame.height


def batch_tokens(frame: pl.DataFrame, models: ScoringModels, options: ScoreOptions,
                 conversational: bool | None = None, rows: tuple | None = None) -> TokenizedPairs:
    """The pairs' tokens as TRL's DPOTrainer builds them: chat template for conversations, else plain text.

    ``conversational`` is the run's kind (a run with any conversation is trained as
    conversations); None: this frame's own kind. ``rows``: :func:`conversation_rows`, when
    the caller has them already.
    """
    if conversational is None:
        conversational = has_messages(frame)
    if not conversational:
        prompts, chosens, rejecteds = (frame[c].to_list() for c in ("prompt", "chosen", "rejected"))
        return tokenize_pairs(models.tokenizer, prompts, chosens, rejecteds, options.max_length,
                              options.truncation_mode)
    prompts, chosens, rejecteds, tools = rows if rows is not None else conversation_rows(frame)
    try:
        return tokenize_conversations(models.tokenizer, prompts, chosens, rejecteds, tools, options.max_length,
                                      options.truncation_mode)
    except ChatTemplateError as exc:
        pair = frame["pair_id"][exc.row]
        raise WinnowError(f"pair {pair[:12]}: {exc} (tokenizer {models.tokenizer_name}; TRL would fail on it too: "
                          "fix or drop the pair, or use a model whose template accepts it)") from None


def score_batch(frame: pl.DataFrame, models: ScoringModels, options: ScoreOptions, margin_source: str,
                progress: bool = False, conversational: bool | None = None) -> pl.DataFrame:
    """All statistics of one batch of pairs (columns pair_id, prompt, chosen, rejected, scores[, messages]).

    Token statistics and log-probs are of the tokens TRL trains on (:func:`batch_tokens`);
    character statistics of the texts.
    """
    prompts, chosens, rejecteds = (frame[c].to_list() for c in ("prompt", "chosen", "rejected"))
    if conversational is None:
        conversational = has_messages(frame)
    rows = conversation_rows(frame) if conversational else None
    tokens = batch_tokens(frame, models, options, conversational, rows)
    parts = [frame.select("pair_id"), text_features(prompts, chosens, rejecteds), token_features(tokens)]
    ref = None
    if models.reference is not None:
        from curation.lm.logprobs import score_tokenized

        ref = score_tokenized(models.reference, tokens, progress=progress).select(REFERENCE_SCORE_COLUMNS)
        parts.append(ref)
    if margin_source == "scores":
        margin = scores_margin(frame)
    elif margin_source == "reference":
        if ref is None:
            raise WinnowError("margin source 'reference' needs a reference model")
        margin = pl.DataFrame({"reward_chosen": ref["ref_chosen_logps_mean"],
                               "reward_rejected": ref["ref_rejected_logps_mean"], "margin": reference_margin(ref)})
    elif margin_source == "reward-model":
        if models.reward_model is None:
            raise WinnowError("margin source 'reward-model' needs --reward-model PATH")
        judged = rows[:3] if rows is not None else (prompts, chosens, rejecteds)  # conversations: its own template
        margin = reward_model_margin(models.reward_model, models.reward_tokenizer or models.tokenizer, *judged,
                                     max_length=options.max_length, progress=progress)
    elif margin_source == "policy":
        if models.policy is None or ref is None:
            raise WinnowError("margin source 'policy' needs a trained policy and the reference model")
        from curation.lm.logprobs import score_tokenized

        margin = policy_margin(score_tokenized(models.policy, tokens, progress=progress), ref, options.beta)
    else:
        raise WinnowError(f"unknown margin source {margin_source!r}")
    parts.append(margin.with_columns(pl.col("reward_chosen", "reward_rejected", "margin").cast(pl.Float64)))
    out = pl.concat(parts, how="horizontal")
    for name in REFERENCE_SCORE_COLUMNS:
        if name not in out.columns:
            out = out.with_columns(pl.lit(None, dtype=pl.Float64).alias(name))
    return out.with_columns(
        margin_source=pl.lit(margin_source),
        tokenizer=pl.lit(models.tokenizer_name),
        max_length=pl.lit(options.max_length, dtype=pl.Int64),
    )


def export_pairs(catalog: Catalog, run_id: str) -> Path:
    """Write the run's pairs to one parquet file that scoring tasks stream from.

    Shard tasks (threads, processes, Dask or Ray workers) then read a file, never the
    catalog: DuckDB allows one writing process per file, and a scorer holds its input for
    minutes.
    """
    out = run_dir(catalog.workdir, run_id) / "pairs.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    return export_pairs_parquet(catalog, run_id, out)


def shard_range(total: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    """Contiguous rows [start, stop) of shard (index, count): near-equal sizes, all rows once."""
    if shard is None:
        return 0, total
    index, count = shard
    if not 0 <= index < count:
        raise WinnowError(f"shard index {index} out of range for {count} shards")
    return index * total // count, (index + 1) * total // count


def _pair_batches(pairs_path: Path, batch_pairs: int, shard: tuple[int, int] | None):
    parquet = open_parquet_stream(pairs_path)
    start, stop = shard_range(parquet.metadata.num_rows, shard)
    yield stop - start
    offset = 0
    for record_batch in parquet.iter_batches(batch_size=batch_pairs):
        lo, hi = max(start - offset, 0), min(stop - offset, record_batch.num_rows)
        offset += record_batch.num_rows
        if hi > lo:
            yield pl.from_arrow(record_batch.slice(lo, hi - lo))
        if offset >= stop:
            break


def pairs_have_messages(pairs_path: Path) -> bool:
    """Whether any pair of the exported run is a conversation (then the whole run trains as one).

    Reads the one column batch by batch and stops at the first conversation: memory stays flat.
    """
    parquet = open_parquet_stream(pairs_path)
    if "prompt_messages" not in parquet.schema_arrow.names:
        return False
    for batch in parquet.iter_batches(batch_size=65536, columns=["prompt_messages"]):
        if batch.column(0).null_count < batch.num_rows:
            return True
    return False


def score_shard(pairs_path: Path, out_dir: Path, models: ScoringModels, options: ScoreOptions, margin_source: str,
                shard: tuple[int, int] | None = None, progress: bool = True) -> list[Path]:
    """Score one shard (or all pairs) of an exported pairs file into parquet parts; returns their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = f"shard{shard[0]:04d}of{shard[1]:04d}" if shard else "all"
    for stale in out_dir.glob(f"{tag}-*.parquet"):
        stale.unlink()
    conversational = pairs_have_messages(Path(pairs_path))
    batches = _pair_batches(Path(pairs_path), options.batch_pairs, shard)
    total = next(batches)
    paths: list[Path] = []
    with progress_bar("score" + (f" [{tag}]" if shard else ""), total=total, unit="pair", enabled=progress) as bar:
        for i, frame in enumerate(batches):
            scored = score_batch(frame, models, options, margin_source, progress=False, conversational=conversational)
            path = out_dir / f"{tag}-{i:05d}.parquet"
            tmp = path.with_suffix(".tmp")
            scored.write_parquet(tmp)
            tmp.rename(path)  # a crash never leaves a half part that looks complete
            paths.append(path)
            bar.update(frame.height)
    return paths


MARGIN_COLUMNS = ("pair_id", "margin_source", "margin", "reward_chosen", "reward_rejected")


def score_record(options: ScoreOptions, margin_source: str, models: ScoringModels | None = None, *,
                 tokenizer: str | None = None, reference_model: str | None = None) -> dict[str, Any]:
    """What `runs.config.score` records: the options plus which model made the numbers (the manifest copies it)."""
    return {**options.to_dict(), "margin_source": margin_source, "conversations": CONVERSATION_TOKENS,
            "tokenizer": tokenizer or (models.tokenizer_name if models else None),
            "reference_model": reference_model or (models.reference_name if models else None)}


def load_scores(catalog: Catalog, run_id: str, parts: list[Path], record: dict[str, Any] | None = None) -> int:
    """Replace the run's `scores` and its `margins` rows from part files, in one transaction."""
    if not parts:
        raise WinnowError(f"run {run_id} has no pairs to score")
    files = [str(p) for p in parts]
    with catalog.transaction() as con, bounded_memory(con):
        count = catalog.replace_slice_from_parquet(con, "scores", files, run_id=run_id)
        for source in catalog.distinct_in_parquet(con, files, "margin_source"):
            catalog.replace_slice_from_parquet(con, "margins", files, MARGIN_COLUMNS, run_id=run_id,
                                               margin_source=source)
        catalog.upsert_run(run_id, con, stage="score", status="scored",
                           **({"config": {"score": record}} if record else {}))
    return int(count)


def score_run(catalog: Catalog, run_id: str, models: ScoringModels, options: ScoreOptions | None = None,
              progress: bool = True) -> ScoreResult:
    """Score every pair of a run and load the statistics into the catalog."""
    options = options or ScoreOptions()
    if not catalog.run_exists(run_id):
        raise WinnowError(f"no run {run_id!r} in {catalog.path}; run `winnow ingest` first")
    margin_source = resolve_margin_source(options.margin, catalog, run_id, models)
    out_dir = scores_dir(catalog.workdir, run_id)
    shutil.rmtree(out_dir, ignore_errors=True)
    parts = score_shard(export_pairs(catalog, run_id), out_dir, models, options, margin_source, progress=progress)
    count = load_scores(catalog, run_id, parts, score_record(options, margin_source, models))
    return ScoreResult(run_id, count, margin_source, parts)
