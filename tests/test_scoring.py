"""Scoring: edit distances, token statistics, reward-model margins, idempotence, quarantine, CLI, shards.

Everything is built locally (a byte-level BPE trained on the test texts, random tiny Llama
models): no downloads. Reference log-probs against TRL live in tests/test_logprobs.py.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification  # noqa: E402

from curation.errors import WinnowError  # noqa: E402
from curation.ingest import IngestOptions, ingest  # noqa: E402
from curation.lm.tokenization import TokenizedPairs  # noqa: E402
from curation.score.features import text_features, token_features  # noqa: E402
from curation.score.margins import reward_model_margin  # noqa: E402
from curation.score.scoring import (  # noqa: E402
    ScoreOptions,
    ScoringModels,
    export_pairs,
    load_scores,
    score_run,
    score_shard,
)
from curation.store import Catalog  # noqa: E402
from training.models import train_tokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


# -- reference implementations -----------------------------------------------------------


def dp_levenshtein(a, b) -> int:  # noqa: ANN001 - any two sequences
    """Plain O(len(a) * len(b)) dynamic programme: insertions, deletions, substitutions of cost 1."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def common_prefix(a, b) -> int:  # noqa: ANN001
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


# -- character edit distance --------------------------------------------------------------

# Small alphabets make near-duplicates (the interesting case); full unicode checks that
# code points, not bytes or UTF-16 units, are counted.
_texts = st.one_of(
    st.text(alphabet="abc", max_size=40),
    st.text(alphabet="aé日😀\u0301 ", max_size=30),
    st.text(max_size=30),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(_texts, _texts), min_size=1, max_size=8))
@example([("", "")])
@example([("", "abc"), ("abc", "")])
@example([("日本語😀", "日本人😀"), ("café", "cafe\u0301"), ("kitten", "sitting")])
def test_char_edit_distance_equals_dynamic_programme(pairs: list[tuple[str, str]]) -> None:
    chosens = [a for a, _ in pairs]
    rejecteds = [b for _, b in pairs]
    frame = text_features(["p"] * len(pairs), chosens, rejecteds)
    expected = [dp_levenshtein(a, b) for a, b in pairs]
    assert frame["char_edit_distance"].to_list() == expected
    assert frame["chosen_chars"].to_list() == [len(a) for a in chosens]
    assert frame["rejected_chars"].to_list() == [len(b) for b in rejecteds]
    norms = frame["char_edit_norm"].to_list()
    for (a, b), d, norm in zip(pairs, expected, norms, strict=True):
        longest = max(len(a), len(b))
        assert norm == pytest.approx(d / longest if longest else 0.0, abs=1e-12)
        assert 0.0 <= norm <= 1.0


def test_char_features_of_an_empty_batch() -> None:
    frame = text_features([], [], [])
    assert frame.height == 0 and "char_edit_norm" in frame.columns


# -- token edit distance and first difference ----------------------------------------------


def _pairs(rows: list[tuple[list[int], list[int], list[int]]], max_length: int | None = None,
           mode: str = "keep_start") -> TokenizedPairs:
    prompts, chosens, rejecteds = (list(x) for x in zip(*rows, strict=True))
    return TokenizedPairs(prompts, chosens, rejecteds, max_length=max_length, truncation_mode=mode)


def test_token_edit_distance_and_first_difference_on_hand_made_pairs() -> None:
    rows = [
        # (prompt, chosen, rejected)  -> distance, first difference
        ([1, 2, 3], [4, 5, 6, 9], [4, 5, 7, 9]),  # one substitution at index 2
        ([1], [4, 5], [4, 5, 6]),  # rejected extends chosen: one insertion after the shared 2
        ([1, 2], [8, 10, 11], [10, 11]),  # leading deletion: nothing shared from the start
        ([7], [10, 11, 12], [12, 11, 10]),  # reversal: 2 substitutions
        ([1, 2, 3, 4], [], []),  # two empty completions: distance 0, norm 0
        ([], [70000, 5], [70000, 5]),  # large ids, identical sides
        ([5], [300, 301, 302, 303], [999]),  # nothing in common
    ]
    expected_distance = [1, 1, 1, 2, 0, 0, 4]
    expected_first_diff = [2, 2, 0, 0, 0, 2, 0]
    frame = token_features(_pairs(rows))
    assert frame["token_edit_distance"].to_list() == expected_distance
    assert frame["first_diff_token"].to_list() == expected_first_diff
    assert frame["shared_prefix_tokens"].to_list() == [len(p) + k for (p, _, _), k in zip(rows, expected_first_diff,
                                                                                              strict=True)]
    assert frame["prompt_tokens"].to_list() == [len(p) for p, _, _ in rows]
    assert frame["chosen_tokens"].to_list() == [len(c) for _, c, _ in rows]
    assert frame["rejected_tokens"].to_list() == [len(r) for _, _, r in rows]
    assert frame["token_edit_norm"].to_list() == pytest.approx([1 / 4, 1 / 3, 1 / 3, 2 / 3, 0.0, 0.0, 1.0])
    assert frame["first_diff_frac"].to_list() == pytest.approx([2 / 4, 2 / 2, 0.0, 0.0, 0.0, 2 / 2, 0.0])
    assert frame["length_gap"].to_list() == [0, -1, 1, 0, 0, 0, 3]
    assert frame["length_ratio"].to_list() == pytest.approx([1.0, 2 / 3, 1.5, 1.0, 0.0, 1.0, 4.0])
    # no max_length: nothing truncated, everything fits
    assert not frame["chosen_truncated"].any() and not frame["rejected_truncated"].any()
    assert frame["fits_max_length"].all() and not frame["uneven_truncation"].any()


def test_truncation_flags_follow_the_collator() -> None:
    rows = [
        ([1, 2, 3], [4, 5, 6, 7], [4, 5]),  # at 6: chosen cut to 3 tokens, rejected whole -> uneven
        ([1, 2, 3], [4], [5]),  # fits
        ([1, 2, 3, 4, 5, 6], [4], [5]),  # keep_start: the prompt alone fills max_length -> dropped
        ([1, 2], [4, 5, 6, 7, 8], [9, 9, 9, 9, 9]),  # both cut -> even
    ]
    frame = token_features(_pairs(rows, max_length=6))
    assert frame["chosen_truncated"].to_list() == [True, False, False, True]
    assert frame["rejected_truncated"].to_list() == [False, False, False, True]
    assert frame["uneven_truncation"].to_list() == [True, False, False, False]
    assert frame["fits_max_length"].to_list() == [True, True, False, True]
    # token statistics are on the untruncated ids (what TRL stores), whatever max_length says
    assert frame["chosen_tokens"].to_list() == [4, 1, 1, 5]
    keep_end = token_features(_pairs(rows, max_length=6, mode="keep_end"))
    assert keep_end["fits_max_length"].all()  # keep_end drops the prompt first, never the pair
    assert keep_end["chosen_truncated"].to_list() == [False, False, False, False]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.lists(st.integers(0, 5), max_size=12), st.lists(st.integers(0, 5), max_size=12)),
                min_size=1, max_size=6))
def test_token_distance_and_prefix_equal_plain_definitions(pairs: list[tuple[list[int], list[int]]]) -> None:
    frame = token_features(_pairs([([0], a, b) for a, b in pairs]))
    assert frame["token_edit_distance"].to_list() == [dp_levenshtein(a, b) for a, b in pairs]
    assert frame["first_diff_token"].to_list() == [common_prefix(a, b) for a, b in pairs]


# -- shared fixtures: texts, tokenizer, tiny models ----------------------------------------

WORDS = ("alpha beta gamma delta sort these numbers into ascending order the answer is "
         "café naïve 日本語 😀 one two three four five six seven eight nine ten").split()


def make_rows(n: int, seed: int = 0) -> list[dict]:
    """Distinct scored explicit pairs; lengths vary so batches need padding."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = f"Q{i}: " + " ".join(rng.choices(WORDS, k=rng.randint(2, 8)))
        chosen = " " + " ".join(rng.choices(WORDS, k=rng.randint(1, 14)))
        rejected = chosen + " " + " ".join(rng.choices(WORDS, k=rng.randint(1, 6))) if i % 3 else \
            " " + " ".join(rng.choices(WORDS, k=rng.randint(1, 10)))
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected,
                     "score_chosen": round(rng.uniform(5, 10), 3), "score_rejected": round(rng.uniform(0, 5), 3)})
    return rows


@pytest.fixture(scope="module")
def tokenizer():
    texts = [t for r in make_rows(200, seed=1) for t in (r["prompt"], r["chosen"], r["rejected"])]
    return train_tokenizer(texts, vocab_size=320, model_max_length=512)


def _llama_config(tokenizer, **extra) -> LlamaConfig:  # noqa: ANN001, ANN003
    return LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, **extra,
    )


@pytest.fixture(scope="module")
def reward_model(tokenizer) -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(_llama_config(tokenizer, num_labels=1))
    with torch.no_grad():  # larger rewards than the init, so differences are not lost in rounding
        model.score.weight.mul_(20.0)
    return model.eval()


@pytest.fixture(scope="module")
def reference(tokenizer) -> LlamaForCausalLM:
    torch.manual_seed(1)
    return LlamaForCausalLM(_llama_config(tokenizer)).eval()


def direct_rewards(model, tokenizer, texts: list[str], max_length: int | None = None) -> np.ndarray:  # noqa: ANN001
    """One unpadded forward pass per text: the number a reward model gives that text alone."""
    out = []
    with torch.no_grad():
        for text in texts:
            ids = tokenizer(text)["input_ids"]
            ids = ids[:max_length] if max_length else ids
            out.append(float(model(input_ids=torch.tensor([ids])).logits[0, 0]))
    return np.array(out)


# -- reward-model margins -------------------------------------------------------------------


@pytest.mark.parametrize("batch_tokens,max_length", [(64, None), (16384, None), (48, 12)])
def test_reward_model_margin_equals_direct_forward(tokenizer, reward_model, batch_tokens, max_length) -> None:
    rows = make_rows(13, seed=2)
    prompts, chosens, rejecteds = ([r[k] for r in rows] for k in ("prompt", "chosen", "rejected"))
    lengths = {len(tokenizer(p + c)["input_ids"]) for p, c in zip(prompts, chosens, strict=True)}
    assert len(lengths) > 3  # different lengths: padded batches
    got = reward_model_margin(reward_model, tokenizer, prompts, chosens, rejecteds, batch_tokens=batch_tokens,
                              max_length=max_length, progress=False)
    chosen = direct_rewards(reward_model, tokenizer, [p + c for p, c in zip(prompts, chosens, strict=True)],
                            max_length)
    rejected = direct_rewards(reward_model, tokenizer, [p + r for p, r in zip(prompts, rejecteds, strict=True)],
                              max_length)
    assert np.abs(chosen - rejected).max() > 1e-3  # the check below is not vacuous
    np.testing.assert_allclose(got["reward_chosen"].to_numpy(), chosen, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["reward_rejected"].to_numpy(), rejected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got["margin"].to_numpy(), chosen - rejected, atol=2e-5, rtol=0)


# -- catalog-level scoring ------------------------------------------------------------------


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n",
                    encoding="utf-8")
    return path


GOOD_ROWS = make_rows(23)


def planted_bad_rows() -> list:
    """One row per quarantine path ingestion has for explicit JSONL, plus a contradiction."""
    base = {"score_chosen": 1.0, "score_rejected": 0.0}
    return [
        '{"prompt": "broken json", "chosen": ',  # malformed_json
        '["not", "an", "object"]',  # wrong_type
        {"prompt": "no rejected", "chosen": "x", **base},  # missing_field
        {"prompt": "bad type", "chosen": 3, "rejected": "x", **base},  # wrong_type
        {"prompt": "   ", "chosen": "a", "rejected": "b", **base},  # empty_text
        {"prompt": "same", "chosen": "twin", "rejected": " twin ", **base},  # identical_sides
        {"prompt": "unscored", "chosen": "a", "rejected": "b", "score_chosen": "high", "score_rejected": 0},
        GOOD_ROWS[0],  # duplicate of the first good row
        {"prompt": "Which?", "chosen": "left", "rejected": "right", **base},  # contradiction, both ways
        {"prompt": "Which?", "chosen": "right", "rejected": "left", **base},
    ]


@pytest.fixture()
def ingested(tmp_path: Path) -> tuple[Catalog, str]:
    rows = GOOD_ROWS[:12] + planted_bad_rows() + GOOD_ROWS[12:]
    source = write_jsonl(tmp_path / "pairs.jsonl", rows)
    catalog = Catalog(tmp_path / "ws")
    result = ingest([str(source)], catalog, IngestOptions(), progress=False)
    assert (result.pairs, result.quarantined) == (len(GOOD_ROWS), len(planted_bad_rows()))
    return catalog, result.run_id


SCORE_COLUMNS_SQL = "SELECT * EXCLUDE (run_id) FROM scores WHERE run_id = ? ORDER BY pair_id"


def test_scoring_twice_gives_identical_rows_and_skips_quarantine(ingested, tokenizer, reference) -> None:
    catalog, run_id = ingested
    models = ScoringModels(tokenizer, "test-bpe", reference=reference)
    options = ScoreOptions(max_length=24, batch_pairs=5)  # several batches, some pairs truncated
    first = score_run(catalog, run_id, models, options, progress=False)
    before = catalog.query(SCORE_COLUMNS_SQL, [run_id])
    second = score_run(catalog, run_id, models, options, progress=False)
    after = catalog.query(SCORE_COLUMNS_SQL, [run_id])
    assert first.pairs == second.pairs == len(GOOD_ROWS)
    assert first.margin_source == "scores"  # auto: every pair carries ratings
    assert before.equals(after, null_equal=True)
    assert before["pair_id"].n_unique() == before.height == len(GOOD_ROWS)
    assert before["chosen_truncated"].any()
    # reference log-probs for every pair TRL keeps; none for pairs whose prompt alone fills max_length
    assert before.filter(pl.col("ref_chosen_logps").is_null())["fits_max_length"].not_().all()
    assert before.filter(pl.col("fits_max_length"))["ref_chosen_logps"].null_count() == 0
    counts = catalog.query(
        """SELECT (SELECT count(*) FROM scores WHERE run_id = $1) AS scores,
                  (SELECT count(*) FROM margins WHERE run_id = $1) AS margins,
                  (SELECT count(DISTINCT pair_id) FROM margins WHERE run_id = $1) AS margin_pairs""",
        [run_id],
    ).row(0)
    assert counts == (len(GOOD_ROWS),) * 3
    # scores hold exactly the run's pairs: nothing quarantined, nothing missing
    pairs = catalog.query("SELECT pair_id, prompt FROM pairs WHERE run_id = ? ORDER BY pair_id", [run_id])
    assert pairs["pair_id"].to_list() == before["pair_id"].to_list()
    assert sorted(pairs["prompt"]) == sorted(r["prompt"] for r in GOOD_ROWS)
    # the numbers are the source's ratings
    expected = {r["prompt"]: r["score_chosen"] - r["score_rejected"] for r in GOOD_ROWS}
    joined = catalog.query("SELECT p.prompt, s.margin FROM scores s JOIN pairs p USING (run_id, pair_id) "
                           "WHERE run_id = ?", [run_id])
    for prompt, margin in joined.iter_rows():
        assert margin == pytest.approx(expected[prompt])


def test_reward_model_margin_through_score_run(ingested, tokenizer, reward_model) -> None:
    catalog, run_id = ingested
    models = ScoringModels(tokenizer, "test-bpe", reward_model=reward_model)
    score_run(catalog, run_id, models, ScoreOptions(margin="reward-model", max_length=None, batch_pairs=7),
              progress=False)
    got = catalog.query("SELECT p.prompt, p.chosen, p.rejected, s.reward_chosen, s.reward_rejected, s.margin, "
                        "s.margin_source FROM scores s JOIN pairs p USING (run_id, pair_id) WHERE run_id = ?",
                        [run_id])
    assert set(got["margin_source"]) == {"reward-model"}
    chosen = direct_rewards(reward_model, tokenizer, [p + c for p, c in zip(got["prompt"], got["chosen"],
                                                                             strict=True)])
    rejected = direct_rewards(reward_model, tokenizer, [p + r for p, r in zip(got["prompt"], got["rejected"],
                                                                               strict=True)])
    np.testing.assert_allclose(got["margin"].to_numpy(), chosen - rejected, atol=2e-5, rtol=0)
    np.testing.assert_allclose(got["reward_chosen"].to_numpy(), chosen, atol=1e-5, rtol=0)


@pytest.mark.parametrize("count", [1, 3, 4, 30])
def test_sharded_scoring_covers_every_pair_once_and_equals_unsharded(ingested, tokenizer, tmp_path: Path,
                                                                     count: int) -> None:
    catalog, run_id = ingested
    models = ScoringModels(tokenizer, "test-bpe")
    options = ScoreOptions(max_length=24, batch_pairs=4)  # shard edges fall inside batches
    pairs_path = export_pairs(catalog, run_id)
    whole = score_shard(pairs_path, tmp_path / "whole", models, options, "scores", progress=False)
    parts = [p for i in range(count)
             for p in score_shard(pairs_path, tmp_path / "sharded", models, options, "scores", shard=(i, count),
                                  progress=False)]
    unsharded = pl.read_parquet(whole).sort("pair_id")
    sharded = pl.read_parquet(parts).sort("pair_id")
    assert sharded["pair_id"].n_unique() == sharded.height == len(GOOD_ROWS)
    assert sharded.equals(unsharded, null_equal=True)
    # loading the shards' parts gives the catalog the same rows as an unsharded score_run
    assert load_scores(catalog, run_id, parts) == len(GOOD_ROWS)
    from_shards = catalog.query(SCORE_COLUMNS_SQL, [run_id])
    score_run(catalog, run_id, models, options, progress=False)
    assert from_shards.equals(catalog.query(SCORE_COLUMNS_SQL, [run_id]), null_equal=True)


def test_shard_index_out_of_range_is_a_user_error(ingested, tokenizer, tmp_path: Path) -> None:
    catalog, run_id = ingested
    with pytest.raises(WinnowError, match="out of range"):
        score_shard(export_pairs(catalog, run_id), tmp_path / "x", ScoringModels(tokenizer), ScoreOptions(),
                    "scores", shard=(3, 3), progress=False)


# -- the command line -----------------------------------------------------------------------


@pytest.fixture()
def model_dir(tmp_path: Path, tokenizer, reference) -> Path:
    path = tmp_path / "tiny-model"
    reference.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def winnow(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_cli_score_prints_summary_and_fills_the_catalog(ingested, model_dir: Path) -> None:
    catalog, run_id = ingested
    done = winnow("score", run_id, "--workdir", str(catalog.workdir), "--model", str(model_dir),
                  "--max-length", "32")
    assert done.returncode == 0, done.stderr
    assert f"scores of run {run_id}" in done.stdout
    lines = done.stdout.splitlines()
    at = next(i for i, line in enumerate(lines) if "margin_source" in line)
    header = [c.strip() for c in re.split(r"[│┃|]", lines[at]) if c.strip()]
    row = next([c.strip() for c in re.split(r"[│┃|]", line) if c.strip()] for line in lines[at + 1:]
               if "scores" in line)
    summary = dict(zip(header, row, strict=True))
    assert summary["pairs"] == str(len(GOOD_ROWS)) and summary["margin_source"] == "scores"
    mean_margin = np.mean([r["score_chosen"] - r["score_rejected"] for r in GOOD_ROWS])
    assert float(summary["mean_margin"]) == pytest.approx(mean_margin, abs=1e-3)
    stats = catalog.query("SELECT count(*) AS n, count(ref_chosen_logps) AS ref, any_value(tokenizer) AS tok, "
                          "any_value(max_length) AS ml FROM scores WHERE run_id = ?", [run_id]).row(0)
    assert stats == (len(GOOD_ROWS), len(GOOD_ROWS), str(model_dir), 32)


def test_cli_unknown_margin_source_is_one_line(ingested, model_dir: Path) -> None:
    catalog, run_id = ingested
    done = winnow("score", run_id, "--workdir", str(catalog.workdir), "--model", str(model_dir),
                  "--margin", "vibes", "--no-reference")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "unknown margin source 'vibes'" in lines[0] and "reward-model" in lines[0]
    assert catalog.query("SELECT count(*) AS n FROM scores").item() == 0
