"""Decontamination: the n-gram matcher, benchmark sources, planted leaks with known answers, curate and report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from curation.decontam import DecontamConfig, load_index, match
from curation.errors import WinnowError
from curation.near_dup import NearDupConfig
from curation.screen import screen
from curation.shingles import normalise, window_hashes, word_tokens
from tests.test_near_dup import _rows_of, catalog_of

OFF = NearDupConfig(enabled=False)


def _vocab(rng: np.random.Generator, size: int = 4000) -> np.ndarray:
    letters = np.array(list("etaoinshrdlucmfwypvbgkqjxz"))
    return np.array(["".join(rng.choice(letters, size=int(rng.integers(2, 9)))) for _ in range(size)])


def _words(rng: np.random.Generator, vocab: np.ndarray, k: int) -> str:
    return " ".join(rng.choice(vocab, k))


def gsm8k_rows(rng: np.random.Generator, vocab: np.ndarray, n: int) -> list[dict]:
    """Rows shaped like openai/gsm8k (config main): {"question": str, "answer": str}."""
    return [{"question": _words(rng, vocab, int(rng.integers(25, 60))) + "?",
             "answer": _words(rng, vocab, int(rng.integers(20, 50))) + "\n#### " + str(int(rng.integers(1, 999)))}
            for _ in range(n)]


def mmlu_rows(rng: np.random.Generator, vocab: np.ndarray, n: int) -> list[dict]:
    """Rows shaped like cais/mmlu: question, subject, choices (4 strings), answer (int)."""
    return [{"question": _words(rng, vocab, int(rng.integers(15, 40))), "subject": "abstract_algebra",
             "choices": [_words(rng, vocab, int(rng.integers(3, 20))) for _ in range(4)], "answer": int(rng.integers(0, 4))}
            for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ----------------------------------------------------------------------------- the matcher


def test_matcher_finds_shared_ngrams_and_the_first_run(tmp_path: Path) -> None:
    text = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen"
    bench = write_jsonl(tmp_path / "b.jsonl", [{"q": "zero " + text}, {"q": "too short to match anything"}])
    index = load_index(DecontamConfig(benchmarks=[str(bench)], ngram=13))
    assert index.infos[0].entries == 2 and index.infos[0].short_entries == 1 and index.infos[0].ngrams == 3
    pairs = normalise(pl.Series([
        "Prefix: ONE two, three four five six seven eight nine ten eleven twelve thirteen fourteen; suffix",
        "one two three four five six seven eight nine ten eleven twelve",  # 12 words: no 13-gram
        "nothing here",
    ]))
    hits = match(index, *window_hashes(word_tokens(pairs), 13, short="drop"))
    assert hits.select("doc", "row", "ngrams", "start", "run").rows() == [(0, 1, 2, 1, 2)]
    # a smaller n finds the 12 words too
    small = load_index(DecontamConfig(benchmarks=[str(bench)], ngram=8))
    found = match(small, *window_hashes(word_tokens(pairs), 8, short="drop"))
    assert found["doc"].to_list() == [0, 1]


def test_a_hash_in_two_benchmarks_counts_for_both(tmp_path: Path) -> None:
    shared = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu"
    first = write_jsonl(tmp_path / "first.jsonl", [{"q": shared}])
    second = write_jsonl(tmp_path / "second.jsonl", [{"x": "other"}, {"q": shared + " xi"}])
    index = load_index(DecontamConfig(benchmarks=[f"one={first}", f"two={second}"]))
    hits = match(index, *window_hashes(word_tokens(pl.Series([shared])), 13, short="drop"))
    assert sorted(zip(hits["bench"].to_list(), hits["row"].to_list(), strict=True)) == [(0, 1), (1, 2)]
    assert index.names == ["one", "two"]


def test_benchmark_sources_fields_and_clear_errors(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vocab = _vocab(rng)
    folder = tmp_path / "mmlu"
    folder.mkdir()
    write_jsonl(folder / "test.jsonl", mmlu_rows(rng, vocab, 5))
    pl.DataFrame(gsm8k_rows(rng, vocab, 4)).write_parquet(tmp_path / "gsm8k.parquet")
    index = load_index(DecontamConfig(benchmarks=[str(folder), f"math={tmp_path / 'gsm8k.parquet'}"]))
    assert index.names == ["mmlu", "math"]
    assert set(index.fields) == {"question", "subject", "choices", "answer"}  # nested lists read too
    assert [i.rows for i in index.infos] == [5, 4]
    only = load_index(DecontamConfig(benchmarks=[str(folder)], fields=["question"]))
    assert only.fields == ["question"] and only.infos[0].entries == 5
    with pytest.raises(WinnowError, match="no such file"):
        load_index(DecontamConfig(benchmarks=[str(tmp_path / "missing.jsonl")]))
    with pytest.raises(WinnowError, match="two benchmarks are named"):
        load_index(DecontamConfig(benchmarks=[str(folder), f"mmlu={tmp_path / 'gsm8k.parquet'}"]))
    (tmp_path / "bad.jsonl").write_text("{not json\n", encoding="utf-8")
    with pytest.raises(WinnowError, match="no readable rows"):
        load_index(DecontamConfig(benchmarks=[str(tmp_path / "bad.jsonl")]))


# ----------------------------------------------------------------------------- planted leaks, known answers


def leaked_set(tmp_path: Path, seed: int = 0) -> tuple[pl.DataFrame, dict[int, tuple[str, int, str]], list[str]]:
    """Pairs with leaks planted {row: (benchmark, benchmark row, pair field)} and the benchmark specs.

    Leaks: 13-30 word spans of a benchmark question, answer or choice, re-cased and re-punctuated,
    into the prompt, chosen or rejected. Near misses that must not match: 12-word spans, and
    spans with a word changed every 10 words.
    """
    rng = np.random.default_rng(seed)
    vocab = _vocab(rng)
    gsm, mmlu = gsm8k_rows(rng, vocab, 150), mmlu_rows(rng, vocab, 150)
    specs = [f"gsm8k={write_jsonl(tmp_path / 'gsm8k.jsonl', gsm)}", f"mmlu={write_jsonl(tmp_path / 'mmlu.jsonl', mmlu)}"]
    rows = [{"prompt": _words(rng, vocab, int(rng.integers(5, 40))), "chosen": _words(rng, vocab, int(rng.integers(3, 200))),
             "rejected": _words(rng, vocab, int(rng.integers(3, 200)))} for _ in range(2000)]
    planted: dict[int, tuple[str, int, str]] = {}
    targets = rng.choice(len(rows), 180, replace=False)
    for k, i in enumerate(targets[:120]):
        bench, source = (("gsm8k", gsm), ("mmlu", mmlu))[k % 2]
        j = int(rng.integers(0, len(source)))
        text = source[j]["question"] if k % 3 else (source[j]["answer"] if bench == "gsm8k" else source[j]["question"])
        words = text.split("\n####")[0].split()  # the words normalising keeps ("####" is punctuation)
        length = int(rng.integers(13, min(30, len(words)) + 1))
        start = int(rng.integers(0, len(words) - length + 1))
        span = " ".join(words[start : start + length])
        span = span.upper() if k % 4 == 0 else span.replace(" ", ", ", 2)
        side = ("prompt", "chosen", "rejected")[k % 3]
        rows[int(i)][side] = f"{rows[int(i)][side]} {span} {_words(rng, vocab, 3)}"
        planted[int(i)] = (bench, j + 1, side)
    for k, i in enumerate(targets[120:]):  # near misses
        words = gsm[k]["question"].split()
        if k % 2:
            span = words[:12]
        else:
            span = list(words[:26])
            span[9], span[19] = "zzz", "zzz"  # no 13 consecutive words survive
        rows[int(i)]["chosen"] = " ".join(span) + " " + rows[int(i)]["chosen"]
    frame = pl.DataFrame(rows).with_columns(source=pl.lit("pairs.jsonl"), source_row=pl.int_range(1, len(rows) + 1))
    return frame, planted, specs


def test_planted_leaks_are_found_with_recall_and_precision(tmp_path: Path) -> None:
    frame, planted, specs = leaked_set(tmp_path)
    catalog = catalog_of(tmp_path / "ws", frame)
    result = screen(catalog, "run-near", OFF, DecontamConfig(benchmarks=specs))
    row_of = _rows_of(catalog, "run-near")
    dropped = {row_of[p] - 1 for p in result.decisions["pair_id"]}
    recall = len(dropped & set(planted)) / len(planted)
    precision = len(dropped & set(planted)) / max(len(dropped), 1)
    assert recall >= 0.95 and precision >= 0.95, (recall, precision)
    table = result.contamination.with_columns(row=pl.col("pair_id").replace_strict(row_of) - 1)
    for row in table.iter_rows(named=True):  # the hit names the planted benchmark, row and pair field
        assert (row["benchmark"], row["benchmark_row"], row["field"]) == planted[row["row"]]
        assert len(row["span"].split()) >= 13 and row["span"] == row["span"].lower()
    reasons = set(result.decisions["reason"])
    assert reasons == {"contaminated"}
    detail = result.decisions["detail"][0]
    assert detail.startswith("13-gram overlap with benchmark ") and "span '" in detail
    stats = result.stats["decontam"]
    assert {b["name"]: b["pairs_hit"] for b in stats["benchmarks"]} == {
        name: sum(1 for b, _, _ in planted.values() if b == name) for name in ("gsm8k", "mmlu")}


def test_record_only_and_min_ngrams(tmp_path: Path) -> None:
    frame, planted, specs = leaked_set(tmp_path, seed=1)
    catalog = catalog_of(tmp_path / "ws", frame)
    recorded = screen(catalog, "run-near", OFF, DecontamConfig(benchmarks=specs, drop=False))
    assert recorded.decisions.height == 0 and recorded.contamination["pair_id"].n_unique() == len(planted)
    strict = screen(catalog, "run-near", OFF, DecontamConfig(benchmarks=specs, min_ngrams=5))
    assert 0 < strict.decisions.height < len(planted)
    assert (strict.contamination["ngrams"] >= 5).all()


# ----------------------------------------------------------------------------- curate, catalog, report


def test_curate_drops_contaminated_and_near_duplicate_pairs_and_reports_them(tmp_path: Path) -> None:
    from curation.decide import CurateConfig, curate
    from curation.reads import cluster_size_counts, contamination_by_benchmark, why
    from curation.report import SCREEN_PLOT
    from tests.test_curation_decisions import make_catalog, synthetic_scores

    rng = np.random.default_rng(5)
    vocab = _vocab(rng)
    bench = gsm8k_rows(rng, vocab, 20)
    spec = f"gsm8k={write_jsonl(tmp_path / 'gsm8k.jsonl', bench)}"
    frame = synthetic_scores(rng.normal(2.0, 1.0, 300))
    prompts = [_words(rng, vocab, 20) for _ in range(300)]
    chosen = [_words(rng, vocab, 30) for _ in range(300)]
    prompts[10] = prompts[10] + " " + bench[3]["question"]  # a leak
    prompts[20], chosen[20] = prompts[5] + "!", chosen[5]  # a near-copy of pair 5 (rejected set below)
    rejected = frame["rejected"].to_list()
    rejected[20] = rejected[5]
    frame = frame.with_columns(prompt=pl.Series(prompts), chosen=pl.Series(chosen), rejected=pl.Series(rejected))
    catalog = make_catalog(tmp_path / "ws", frame)
    config = CurateConfig(decontam=DecontamConfig(benchmarks=[spec]), near_dup=NearDupConfig(keep="first"))
    result = curate(catalog, "run-synthetic", config)
    ids = frame["pair_id"].to_list()
    assert why(catalog, "run-synthetic", ids[10])["reason"][0] == "contaminated"
    copy = why(catalog, "run-synthetic", ids[20]).row(0, named=True)
    assert copy["reason"] == "near_duplicate" and ids[5] in copy["detail"]
    assert result.dropped["contaminated"] == 1 and result.dropped["near_duplicate"] == 1
    clusters = catalog.query("SELECT * FROM clusters WHERE run_id = ?", ["run-synthetic"])
    assert clusters.filter(pl.col("pair_id") == ids[20])["duplicate_of"][0] == ids[5]
    assert cluster_size_counts(catalog, "run-synthetic").rows() == [(2, 1, 2, 0)]
    assert contamination_by_benchmark(catalog, "run-synthetic")["pairs"].to_list() == [1]
    manifest = json.loads(result.manifest_path.read_text())
    filters = manifest["curation"]["filters"]
    assert filters["near_dup"]["clusters"] == 1 and filters["decontam"]["contaminated_pairs"] == 1
    assert filters["decontam"]["benchmarks"][0]["fingerprints"]
    text = result.report_path.read_text()
    assert "## Near-duplicates and contamination" in text and "| gsm8k | 20 |" in text
    assert (result.report_path.parent / SCREEN_PLOT).read_bytes()[:4] == b"\x89PNG"
    # a re-run replaces the rows: the same clusters and hits, no duplicates
    curate(catalog, "run-synthetic", replace(config, report=False))
    assert catalog.query("SELECT count(*) AS n FROM clusters WHERE run_id = ?", ["run-synthetic"])["n"][0] == 2
    assert catalog.query("SELECT count(*) AS n FROM contamination WHERE run_id = ?", ["run-synthetic"])["n"][0] == 1
