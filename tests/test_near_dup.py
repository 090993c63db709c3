"""Near-duplicate pairs: hashing kernels, MinHash, LSH buckets, clustering, and planted sets with known answers."""

from __future__ import annotations

import hashlib
import runpy
from collections import deque
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import curation.near_dup as near_dup
from curation.errors import WinnowError
from curation.near_dup import (
    BandSpill,
    NearDupConfig,
    _bucket_edges,
    connected_components,
    minhash,
)
from curation.screen import screen
from curation.shingles import Tokens, byte_tokens, normalise, window_hashes, word_tokens
from curation.store import Catalog

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- kernels


def test_normalise_folds_case_whitespace_and_punctuation() -> None:
    texts = pl.Series(["Sort ascending:  18, 44!\nAnswer:", "sort ascending 18 44 answer", "  ", "Ça—va?", None])
    assert normalise(texts).to_list() == ["sort ascending 18 44 answer", "sort ascending 18 44 answer", "", "ça va", ""]


def test_window_hashes_match_across_positions_and_never_cross_documents() -> None:
    docs = pl.Series(["a b c d", "x a b c", "c d x", "q"])
    tokens = word_tokens(docs)
    assert tokens.counts.tolist() == [4, 4, 3, 1]
    hashes, doc, position = window_hashes(tokens, 3)
    assert doc.tolist() == [0, 0, 1, 1, 2] and position.tolist() == [0, 1, 0, 1, 0]
    assert hashes[0] == hashes[3]  # "a b c" in doc 0 at 0 and in doc 1 at 1
    assert len(set(hashes.tolist())) == 4  # a b c, b c d, x a b, c d x: no window spans "d" + "x a"
    whole, whole_doc, _ = window_hashes(tokens, 3, short="whole")
    assert whole_doc.tolist() == [0, 0, 1, 1, 2, 3]  # the one-word document keeps one shingle
    assert window_hashes(word_tokens(pl.Series(["q"])), 1)[0][0] == whole[-1]
    # byte tokens: the same k-gram of characters anywhere hashes alike
    chars, cdoc, _ = window_hashes(byte_tokens(pl.Series(["hello world", "say hello"])), 5)
    assert chars[0] == chars[cdoc == 1][-1]  # "hello"


def test_window_hashes_equal_a_direct_computation_on_random_tokens() -> None:
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 30, 50)
    tokens = Tokens(hash=rng.integers(0, 2**63, int(counts.sum()), dtype=np.uint64), counts=counts.astype(np.int64))
    hashes, doc, position = window_hashes(tokens, 7)
    starts = np.cumsum(counts) - counts
    seen: dict[tuple[int, ...], int] = {}
    for h, d, p in zip(hashes.tolist(), doc.tolist(), position.tolist(), strict=True):
        window = tuple(tokens.hash[starts[d] + p : starts[d] + p + 7].tolist())
        assert len(window) == 7
        assert seen.setdefault(window, h) == h  # equal windows, equal hashes
    assert len(set(seen.values())) == len(seen)  # distinct windows, distinct hashes
    assert hashes.size == int(np.maximum(counts - 6, 0).sum())


def test_minhash_estimates_jaccard_and_fills_every_bin() -> None:
    rng = np.random.default_rng(0)
    universe = rng.integers(0, 2**63, 20_000, dtype=np.uint64)
    from curation.shingles import mix64

    estimates = {}
    for jaccard in (0.2, 0.5, 0.8):
        shared = int(round(2 * 60 * jaccard / (1 + jaccard)))
        agree = []
        for trial in range(200):
            pick = rng.choice(universe.size, 120 - shared, replace=False)
            a = np.concatenate([pick[:shared], pick[shared : 60]])
            b = np.concatenate([pick[:shared], pick[60 : 120 - shared]])
            hashes = mix64(np.concatenate([universe[a], universe[b]]) + np.uint64(trial))
            sig = minhash(hashes, np.repeat([0, 1], [a.size, b.size]), 2, 64)
            assert (sig < np.uint64(1 << 32)).sum() > 0 and not (sig == near_dup._EMPTY).any()
            agree.append(float((sig[0] == sig[1]).mean()))
        estimates[jaccard] = float(np.mean(agree))
        true = shared / (120 - shared)
        assert abs(estimates[jaccard] - true) < 0.05, (jaccard, estimates[jaccard], true)
    # identical sets sign identically; a document with no shingle keeps the empty marker
    sig = minhash(universe[:5].copy(), np.zeros(5, np.int64), 2, 16)
    assert (sig[1] == near_dup._EMPTY).all() and (sig[0] != near_dup._EMPTY).all()


def test_candidate_probability_is_the_lsh_s_curve() -> None:
    config = NearDupConfig()
    assert config.candidate_probability(1.0, 1.0) == pytest.approx(1.0)
    assert config.candidate_probability(0.7, 0.8) > 0.99  # a re-typed prompt, lightly edited answers
    assert config.candidate_probability(0.3, 1.0) > 0.999  # same answers, rephrased prompt: responses index
    assert config.candidate_probability(0.4, 0.2) < 0.05  # templated prompts, unrelated answers
    with pytest.raises(WinnowError, match="near_dup.keep"):
        NearDupConfig(keep="best")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- buckets and clusters


def _components_oracle(a: list[int], b: list[int]) -> dict[int, int]:
    graph: dict[int, set[int]] = {}
    for x, y in zip(a, b, strict=True):
        graph.setdefault(x, set()).add(y)
        graph.setdefault(y, set()).add(x)
    root: dict[int, int] = {}
    for start in sorted(graph):
        if start in root:
            continue
        queue, members = deque([start]), []
        root[start] = start
        while queue:
            node = queue.popleft()
            members.append(node)
            for other in graph[node]:
                if other not in root:
                    root[other] = start
                    queue.append(other)
    return root


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_connected_components_match_a_breadth_first_search(seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 400, 300)
    b = rng.integers(0, 400, 300)
    chain = np.arange(1000, 1060)  # a long chain: the case label propagation needs pointer jumping for
    a, b = np.concatenate([a, chain[:-1]]), np.concatenate([b, chain[1:]])
    nodes, root = connected_components(a, b)
    oracle = _components_oracle(a.tolist(), b.tolist())
    assert dict(zip(nodes.tolist(), root.tolist(), strict=True)) == oracle


def test_bucket_edges_link_each_member_to_its_next_window() -> None:
    key = np.array([7] * 40 + [9, 9, 11], dtype=np.uint64)
    idx = np.concatenate([np.arange(100, 140)[::-1], [5, 6, 8]]).astype(np.int64)
    codes = _bucket_edges(key, idx, window=16)
    a, b = codes >> 32, codes & 0xFFFFFFFF
    assert (a < b).all()
    assert {(5, 6)} <= set(zip(a.tolist(), b.tolist(), strict=True))
    assert 8 not in set(a.tolist()) | set(b.tolist())  # alone in its bucket
    big = [(x, y) for x, y in zip(a.tolist(), b.tolist(), strict=True) if x >= 100]
    assert len(big) == sum(min(16, 39 - i) for i in range(40))  # 40 members, each to its next 16
    nodes, root = connected_components(np.array([x for x, _ in big]), np.array([y for _, y in big]))
    assert set(root.tolist()) == {100}  # the window still connects the whole bucket


def test_band_spill_partitions_give_the_same_edges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 2**63, (500, 6), dtype=np.uint64)
    keys[250:260] = keys[:10]  # ten planted duplicates, every band alike
    keys[300, 2] = keys[20, 2]  # one band alike
    one = BandSpill(tmp_path / "one", 10)
    one.add(np.arange(500), keys)
    monkeypatch.setattr(near_dup, "_PARTITION_ROWS", 100)
    many = BandSpill(tmp_path / "many", keys.size)
    assert many.partitions == 32
    for lo in range(0, 500, 64):
        many.add(np.arange(lo, min(lo + 64, 500)), keys[lo : lo + 64])
    expected = {(i, 250 + i) for i in range(10)} | {(20, 300)}
    for spill in (one, many):
        a, b = spill.candidate_edges(window=4)
        assert set(zip(a.tolist(), b.tolist(), strict=True)) == expected
    a, b = many.candidate_edges(window=4, skip=np.array([250, 300]))
    assert set(zip(a.tolist(), b.tolist(), strict=True)) == {(i, 250 + i) for i in range(1, 10)}


# ----------------------------------------------------------------------------- a planted set with known answers


def _words(rng: np.random.Generator, vocab: np.ndarray, k: int) -> str:
    return " ".join(rng.choice(vocab, k))


def planted_set(seed: int = 0, base: int = 1500) -> tuple[pl.DataFrame, dict[int, int], set[int]]:
    """Pairs (source_row order), planted copies {copy row: original row}, and the swapped copies.

    Positives satisfy the definition with room (prompt similarity >= 0.75, responses >= 0.95):
    re-typed prompts (whitespace, case, punctuation, a changed word, a prefix), lightly edited long
    answers, sides swapped, clusters of three. Hard negatives violate it: the same prompt with other
    answers (several comparisons per prompt), the same answers under an unrelated prompt, the same
    prompt and chosen with another rejected, templated prompts.
    """
    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkqjxz"))
    vocab = np.array(["".join(rng.choice(letters, size=int(rng.integers(2, 9)))) for _ in range(3000)])
    rows: list[dict] = []
    for i in range(base):
        short = i % 3 == 0  # a third with short answers, like the demo's
        rows.append({"prompt": f"{_words(rng, vocab, int(rng.integers(12, 40)))}?",
                     "chosen": _words(rng, vocab, int(rng.integers(2, 6) if short else rng.integers(60, 300))),
                     "rejected": _words(rng, vocab, int(rng.integers(2, 6) if short else rng.integers(60, 300)))})
    for _ in range(100):  # templated prompts, distinct content
        rows.append({"prompt": f"Translate into French: {_words(rng, vocab, 6)}",
                     "chosen": _words(rng, vocab, 8), "rejected": _words(rng, vocab, 8)})
    originals = list(range(len(rows)))

    def retype(prompt: str, kind: int) -> str:
        words = prompt.split(" ")
        if kind == 0:
            return prompt.replace(" ", "   \t ", 3)
        if kind == 1:
            return prompt.upper()
        if kind == 2:
            return ", ".join(words[:3]) + " " + " ".join(words[3:]).replace("?", "!!")
        if kind == 3:
            words[len(words) // 2] = "banana"
            return " ".join(words)
        return "Please answer this: " + prompt

    def edit(text: str) -> str:
        words = text.split(" ")
        if len(words) < 60:
            return text + "."
        words[10] = "changed"
        return " ".join(words) + " indeed"

    copies: dict[int, int] = {}
    swapped: set[int] = set()
    chosen = rng.choice(originals, 160, replace=False)
    for k, i in enumerate(chosen):
        source = rows[int(i)]
        copy = {"prompt": retype(source["prompt"], k % 5), "chosen": edit(source["chosen"]) if k % 2 else source["chosen"],
                "rejected": source["rejected"]}
        if k % 6 == 0:
            copy["chosen"], copy["rejected"] = copy["rejected"], copy["chosen"]
            swapped.add(len(rows))
        copies[len(rows)] = int(i)
        rows.append(copy)
        if k % 10 == 0:  # a third member
            copies[len(rows)] = int(i)
            rows.append({**source, "prompt": source["prompt"] + " "  + "thanks"})
    negatives = rng.choice(originals, 120, replace=False)
    for k, i in enumerate(negatives):
        source = rows[int(i)]
        kind = k % 3
        if kind == 0:  # the same prompt, another comparison
            rows.append({"prompt": source["prompt"], "chosen": _words(rng, vocab, 40), "rejected": _words(rng, vocab, 40)})
        elif kind == 1:  # the same answers under an unrelated prompt
            rows.append({"prompt": _words(rng, vocab, 20), "chosen": source["chosen"], "rejected": source["rejected"]})
        else:  # same prompt and chosen, another rejected
            rows.append({**source, "rejected": _words(rng, vocab, 50)})
    frame = pl.DataFrame(rows).with_columns(source=pl.lit("planted.jsonl"), source_row=pl.int_range(1, len(rows) + 1))
    return frame, copies, swapped


def catalog_of(workdir: Path, frame: pl.DataFrame, run_id: str = "run-near") -> Catalog:
    catalog = Catalog(workdir)
    ids = [hashlib.sha256(f"{p}\x1f{c}\x1f{r}".encode()).hexdigest()
           for p, c, r in frame.select("prompt", "chosen", "rejected").iter_rows()]
    with catalog.transaction() as con:
        catalog.upsert_run(run_id, con, status="ingested")
        catalog.replace_slice(con, "pairs", frame.with_columns(pair_id=pl.Series(ids)), run_id=run_id)
    return catalog


def _rows_of(catalog: Catalog, run_id: str) -> dict[str, int]:
    return dict(catalog.query("SELECT pair_id, source_row FROM pairs WHERE run_id = ?", [run_id]).iter_rows())


def test_planted_near_duplicates_are_found_with_recall_and_precision(tmp_path: Path) -> None:
    frame, copies, swapped = planted_set()
    catalog = catalog_of(tmp_path, frame)
    result = screen(catalog, "run-near", NearDupConfig(batch_pairs=512))
    row_of = _rows_of(catalog, "run-near")
    dropped = {row_of[p] - 1 for p in result.decisions["pair_id"]}
    planted = set(copies)
    recall = len(dropped & planted) / len(planted)
    precision = len(dropped & planted) / len(dropped)
    assert recall >= 0.95 and precision >= 0.95, (recall, precision, sorted(planted - dropped)[:5])
    # every planted copy that was found sits in its original's cluster, the original kept (first seen)
    clusters = result.clusters.with_columns(row=pl.col("pair_id").replace_strict(row_of) - 1)
    cluster_of = dict(zip(clusters["row"].to_list(), clusters["cluster_id"].to_list(), strict=True))
    for copy, original in copies.items():
        if copy in dropped:
            assert cluster_of[copy] == cluster_of[original]
    kept = clusters.filter(pl.col("representative"))["row"].to_list()
    assert set(kept) <= set(copies.values())
    # swapped copies read the other way round, and their clusters are near-contradictions
    oriented = dict(zip(clusters["row"].to_list(), clusters["orientation"].to_list(), strict=True))
    assert all(oriented[r] == "swapped" for r in swapped if r in dropped)
    flagged = set(clusters.filter(pl.col("contradiction"))["cluster_id"].to_list())
    assert flagged == {cluster_of[r] for r in swapped if r in cluster_of}
    assert result.decisions["reason"].unique().to_list() == ["near_duplicate"]  # contradictions: report
    details = dict(zip(result.decisions["pair_id"].to_list(), result.decisions["detail"].to_list(), strict=True))
    representative = dict(zip(clusters["pair_id"].to_list(), clusters["duplicate_of"].to_list(), strict=True))
    for pair_id, detail in details.items():
        assert detail.startswith(f"near-duplicate of {representative[pair_id]}")
    assert result.stats["near_dup"]["clusters"] == clusters["cluster_id"].n_unique()


def test_batches_partitions_and_row_order_do_not_change_the_answer(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    frame, _, _ = planted_set(seed=4, base=600)
    catalog = catalog_of(tmp_path, frame)
    one = screen(catalog, "run-near", NearDupConfig(batch_pairs=100_000))
    monkeypatch.setattr(near_dup, "_PARTITION_ROWS", 5000)
    many = screen(catalog, "run-near", NearDupConfig(batch_pairs=97))
    assert many.stats["near_dup"]["partitions"] > 1
    assert one.clusters.equals(many.clusters) and one.decisions.sort("pair_id").equals(many.decisions.sort("pair_id"))


def test_drop_mode_keep_by_margin_and_excluded_pairs(tmp_path: Path) -> None:
    base = {"prompt": "How do I bake bread at home without an oven or a bread machine?",
            "chosen": "Use a heavy pot on the stove with a lid, low heat, and turn the loaf once.",
            "rejected": "You cannot bake bread without an oven."}
    rows = [base,
            {**base, "prompt": base["prompt"].replace("How", "how").replace("?", "??")},
            {**base, "prompt": base["prompt"] + " Thanks!"},
            {**base, "chosen": base["rejected"], "rejected": base["chosen"], "prompt": base["prompt"] + " Please."},
            {"prompt": "What is the capital of Peru?", "chosen": "Lima.", "rejected": "Cusco."},
            {"prompt": "what is the capital of peru", "chosen": "Lima", "rejected": "Cusco"}]
    frame = pl.DataFrame(rows).with_columns(source=pl.lit("s.jsonl"), source_row=pl.int_range(1, len(rows) + 1))
    catalog = catalog_of(tmp_path, frame)
    row_of = _rows_of(catalog, "run-near")
    by_row = {r: p for p, r in row_of.items()}
    margins = pl.DataFrame({"pair_id": [by_row[r] for r in range(1, 7)], "margin": [0.1, 0.9, 0.5, 0.2, 1.0, 2.0]})
    with catalog.transaction() as con:
        catalog.replace_slice(con, "scores", margins, run_id="run-near")
    reported = screen(catalog, "run-near", NearDupConfig())
    assert reported.stats["near_dup"]["clusters"] == 2 and reported.stats["near_dup"]["contradiction_clusters"] == 1
    reasons = {row_of[p]: r for p, r in reported.decisions.select("pair_id", "reason").iter_rows()}
    assert reasons == {2: "near_duplicate", 3: "near_duplicate", 4: "near_duplicate", 6: "near_duplicate"}
    dropped = screen(catalog, "run-near", NearDupConfig(contradictions="drop", keep="margin"))
    reasons = {row_of[p]: r for p, r in dropped.decisions.select("pair_id", "reason").iter_rows()}
    assert reasons == {1: "near_contradiction", 2: "near_contradiction", 3: "near_contradiction",
                       4: "near_contradiction", 5: "near_duplicate"}  # row 6 has the higher margin
    # a pair the rules dropped is never clustered: the Peru pair of row 5 then has no partner left
    excluded = screen(catalog, "run-near", NearDupConfig(), excluded=pl.Series([by_row[1], by_row[5]]))
    assert {row_of[p] for p in excluded.clusters["pair_id"]} == {2, 3, 4}


def test_demo_carries_its_planted_near_duplicates(tmp_path: Path) -> None:
    from curation.ingest import ingest

    planted = runpy.run_path(str(ROOT / "data" / "make_demo.py"))["PLANTED_NEAR"]
    catalog = Catalog(tmp_path)
    run_id = ingest([str(ROOT / "data" / "demo" / "pairs.jsonl")], catalog, progress=False).run_id
    result = screen(catalog, run_id)
    stats = result.stats["near_dup"]
    assert stats["clusters"] == sum(planted.values()) and stats["largest_cluster"] == 2  # no natural near-copy
    assert stats["contradiction_clusters"] == planted["near_contradiction"]
    assert result.decisions.height == sum(planted.values())
