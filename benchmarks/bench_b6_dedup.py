"""B6: near-duplicate and contamination detection vs B1's features, on the same pairs.

What "ours" times, in a fresh child process per run, on a catalog the pairs were ingested into
beforehand (untimed, once per size): ``curation.screen.screen(catalog, run_id, NearDupConfig(),
DecontamConfig(benchmarks=[bench.jsonl]))``, the step `curate` runs: one streamed pass over the
run's texts out of DuckDB (normalising, word and character shingles, one-permutation MinHash,
LSH band keys spilled to disk, 13-gram lookups against the benchmark), the bucket sort per
partition, the exact rapidfuzz checks of every candidate, the clusters and the decisions. Peak
memory is that child's RSS high-water mark.

The baseline ("B1") is B1's own measured child on the same JSONL: ingest + ``score_run``
(features, tokenizer, catalog write), as ``benchmarks/bench_b1_features.py`` times it.

Data: B1's generator (prompts 30-240 chars, chosen/rejected 500-2000 chars), plus, so the step
has work to do and its answers can be checked, 1% planted near-copies (the prompt re-typed:
whitespace, case, punctuation, a word added; one response lightly edited; every fifth copy with
its sides swapped) and 0.1% pairs carrying a 20-word span of one of 2000 benchmark entries (in the
prompt, chosen or rejected in turn). Recall and precision against the planted rows are printed.

Run: ``nice -n 10 .venv/bin/python benchmarks/bench_b6_dedup.py`` (100k: 2 alternating rounds; 1M:
one of each). ``--sizes 100k`` for a quick run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_b1_features as b1  # noqa: E402  - B1's generator, tokenizer and child
from common import describe_machine  # noqa: E402

SEED = 20240606
NEAR_SHARE, LEAK_SHARE = 0.01, 0.001
BENCH_ENTRIES = 2000


# --------------------------------------------------------------------------------------------------
# Data


def _benchmark(path: Path) -> list[str]:
    """2000 benchmark rows (question + answer) sliced from B1's corpus; returns the questions."""
    import numpy as np

    corpus, _ = b1.build_corpus(SEED)
    rng = np.random.default_rng(SEED)
    rows, questions = [], []
    for i in range(BENCH_ENTRIES):
        start = int(rng.integers(0, len(corpus) - 3000))
        question = " ".join(corpus[start : start + 3000].split()[5 : 5 + int(rng.integers(30, 60))])
        answer = " ".join(corpus[start + 1500 : start + 3000].split()[3 : 3 + int(rng.integers(10, 30))])
        rows.append(json.dumps({"id": i, "question": question, "answer": answer}))
        questions.append(question)
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return questions


def generate(n: int, workdir: Path) -> tuple[Path, Path, Path]:
    """JSONL of n pairs (B1's pairs + planted copies and leaks), the benchmark, and the planted truth."""
    import numpy as np
    import polars as pl
    import pyarrow.parquet as pq

    jsonl, bench, truth = (workdir / f"b6-{b1.label(n)}.jsonl", workdir / "bench.jsonl",
                           workdir / f"b6-{b1.label(n)}-truth.json")
    if jsonl.exists() and bench.exists() and truth.exists():
        return jsonl, bench, truth
    questions = _benchmark(bench)
    copies_total = int(n * NEAR_SHARE)
    base_n = n - copies_total
    base_parquet, base_jsonl = workdir / f"base-{b1.label(n)}.parquet", workdir / f"base-{b1.label(n)}.jsonl"
    b1.generate(base_n, base_parquet, base_jsonl)
    base_jsonl.unlink()
    rng = np.random.default_rng(SEED + n)
    retype = [lambda p: p.str.replace(" ", "  ", literal=True), lambda p: p.str.to_uppercase(),
              lambda p: p.str.replace("?", "!", literal=True), lambda p: pl.lit("Please: ") + p]
    planted_near, planted_leak = [], []
    line = 0
    tmp = jsonl.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        for batch in pq.ParquetFile(base_parquet).iter_batches(batch_size=20_000):
            frame = pl.from_arrow(batch)
            m = frame.height
            # leaks: a 20-word span of a benchmark question, into prompt / chosen / rejected in turn
            leak_rows = rng.choice(m, max(1, round(m * LEAK_SHARE)), replace=False)
            cols = {c: frame[c].to_list() for c in ("prompt", "chosen", "rejected")}
            for k, r in enumerate(leak_rows):
                words = questions[int(rng.integers(0, len(questions)))].split()
                span = " ".join(words[5:25])
                side = ("prompt", "chosen", "rejected")[k % 3]
                cols[side][int(r)] = f"{cols[side][int(r)]} {span}"
                planted_leak.append(line + int(r) + 1)
            frame = frame.with_columns(**{c: pl.Series(v) for c, v in cols.items()})
            # near-copies of some rows of this batch, appended after it
            take = rng.choice(m, round(m * copies_total / base_n), replace=False)
            copies = frame[take]
            copies = pl.concat([copies[i::4].with_columns(prompt=retype[i](pl.col("prompt"))) for i in range(4)])
            copies = copies.with_columns(chosen=pl.col("chosen") + " indeed")
            swap = pl.int_range(pl.len()) % 5 == 0
            copies = copies.with_columns(
                chosen=pl.when(swap).then("rejected").otherwise("chosen"),
                rejected=pl.when(swap).then("chosen").otherwise("rejected"),
                score_chosen=pl.when(swap).then("score_rejected").otherwise("score_chosen"),
                score_rejected=pl.when(swap).then("score_chosen").otherwise("score_rejected"))
            frame.write_ndjson(out)
            line += m
            copies.write_ndjson(out)
            leaked = {int(r) for r in leak_rows}  # a copy of a leaked row is contaminated, not clustered
            for j, source in enumerate(np.concatenate([take[i::4] for i in range(4)])):
                (planted_leak if int(source) in leaked else planted_near).append(line + j + 1)
            line += copies.height
    base_parquet.unlink()
    tmp.replace(jsonl)
    truth.write_text(json.dumps({"pairs": line, "near": planted_near, "leak": planted_leak}))
    return jsonl, bench, truth


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --------------------------------------------------------------------------------------------------
# Children


def child_prepare(args: argparse.Namespace) -> dict:
    from curation.ingest import ingest
    from curation.store import Catalog

    shutil.rmtree(args.workspace, ignore_errors=True)
    result = ingest([args.source], Catalog(args.workspace), progress=False)
    return {"run_id": result.run_id, "pairs": result.pairs}


def child_ours(args: argparse.Namespace) -> dict:
    from curation.decontam import DecontamConfig
    from curation.near_dup import NearDupConfig
    from curation.screen import screen
    from curation.store import Catalog

    catalog = Catalog(args.workspace)
    for leftover in Path(args.workspace).glob(".screen-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    rss_before = _rss_mb()
    c0, t0 = _cpu(), time.perf_counter()
    result = screen(catalog, args.run_id, NearDupConfig(), DecontamConfig(benchmarks=[args.bench]))
    wall, cpu = time.perf_counter() - t0, _cpu() - c0
    rss = _rss_mb()  # the step's high-water mark, before the check of the answers below reads the catalog
    rows = catalog.query("SELECT pair_id, source_row FROM pairs WHERE run_id = ?", [args.run_id])
    dropped = result.decisions.join(rows, on="pair_id")
    truth = json.loads(Path(args.truth).read_text())
    score = {}
    for name, reasons, planted in (("near", ("near_duplicate", "near_contradiction"), truth["near"]),
                                   ("leak", ("contaminated",), truth["leak"])):
        found = set(dropped.filter(dropped["reason"].is_in(list(reasons)))["source_row"].to_list())
        hit = len(found & set(planted))
        score[name] = {"planted": len(planted), "found": len(found), "recall": hit / max(len(planted), 1),
                       "precision": hit / max(len(found), 1)}
    near = result.stats["near_dup"]
    return {"wall": wall, "cpu": cpu, "scan": result.scan_seconds, "rss_mb": rss, "rss_before_mb": rss_before,
            "candidates": near["candidates"], "verified": near["verified"], "clusters": near["clusters"],
            "partitions": near["partitions"], "score": score}


def run(cmd: list[str], what: str) -> dict:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{what} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_b1(n: int, jsonl: Path, tok: Path, args: argparse.Namespace) -> dict:
    out = run([sys.executable, str(ROOT / "benchmarks" / "bench_b1_features.py"), "--child", "ours", "--pairs", str(n),
               "--source", str(jsonl), "--tokenizer", str(tok), "--workspace", str(Path(args.workdir) / "ws-b1"),
               "--batch-pairs", "20000", "--max-length", "512"], f"B1 {b1.label(n)}")
    print(f"[B1 {b1.label(n)}: {out['wall']:.1f} s wall, {out['cpu']:.1f} s cpu, peak RSS {out['rss_mb']:.0f} MB]",
          file=sys.stderr, flush=True)
    return out


def run_ours(n: int, workspace: Path, run_id: str, bench: Path, truth: Path) -> dict:
    out = run([sys.executable, __file__, "--child", "ours", "--workspace", str(workspace), "--run-id", run_id,
               "--bench", str(bench), "--truth", str(truth)], f"B6 {b1.label(n)}")
    print(f"[B6 {b1.label(n)}: {out['wall']:.1f} s wall ({out['scan']:.1f} s scan), {out['cpu']:.1f} s cpu, peak RSS "
          f"{out['rss_mb']:.0f} MB, {out['candidates']} candidates, {out['clusters']} clusters, {out['score']}]",
          file=sys.stderr, flush=True)
    return out


# --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="100k,1M", help="pair counts")
    parser.add_argument("--rounds", default="100k:2,1M:1", help="alternating rounds per size (default 1)")
    parser.add_argument("--workdir", default="/tmp/winnow_b6")
    parser.add_argument("--child", choices=["ours", "prepare"], help=argparse.SUPPRESS)
    parser.add_argument("--workspace", help=argparse.SUPPRESS)
    parser.add_argument("--run-id", help=argparse.SUPPRESS)
    parser.add_argument("--bench", help=argparse.SUPPRESS)
    parser.add_argument("--truth", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_ours(args) if args.child == "ours" else child_prepare(args)))
        return

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rounds = {b1.parse_count(k): int(v) for k, v in (x.split(":") for x in args.rounds.split(",") if x)}
    results: dict[int, dict[str, list[dict]]] = {}
    tok = None
    for n in (b1.parse_count(s) for s in args.sizes.split(",") if s.strip()):
        jsonl, bench, truth = generate(n, workdir)
        if tok is None:
            sample = workdir / "tokenizer-sample.parquet"
            if not sample.exists():
                b1.generate(3000, sample, workdir / "tokenizer-sample.jsonl")
            tok = b1.tokenizer_dir(workdir, 8192, sample)
        workspace = workdir / f"ws-b6-{b1.label(n)}"
        prepared = run([sys.executable, __file__, "--child", "prepare", "--workspace", str(workspace), "--source",
                        str(jsonl)], f"ingest {b1.label(n)}")
        results[n] = {"b1": [], "ours": []}
        for r in range(rounds.get(n, 1)):
            for kind in (("ours", "b1") if r % 2 == 0 else ("b1", "ours")):
                if kind == "b1":
                    results[n]["b1"].append(run_b1(prepared["pairs"], jsonl, tok, args))
                else:
                    results[n]["ours"].append(run_ours(n, workspace, prepared["run_id"], bench, truth))
        shutil.rmtree(workspace, ignore_errors=True)
    report(results)


def _walls(runs: list[dict], key: str = "wall") -> str:
    return ", ".join(f"{x[key]:.1f}" for x in runs)


def report(results: dict[int, dict[str, list[dict]]]) -> None:
    print("\n### B6: near-duplicates + contamination vs B1's features\n")
    print(f"Machine: {describe_machine(['polars', 'numpy', 'duckdb', 'rapidfuzz', 'tokenizers'])}\n")
    print("| pairs | B1 wall s (ingest + score_run) | B6 wall s (screen) | B6 / B1 (median wall) | B1 cpu s | B6 cpu s "
          "| B6 / B1 (median cpu) | B6 scan s | candidates | clusters | near-dup recall / precision "
          "| leak recall / precision | peak RSS B1 MB | peak RSS B6 MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for n, res in results.items():
        b, o = res["b1"], res["ours"]
        ratio = statistics.median(x["wall"] for x in o) / statistics.median(x["wall"] for x in b)
        cpu_ratio = statistics.median(x["cpu"] for x in o) / statistics.median(x["cpu"] for x in b)
        last = o[-1]
        s = last["score"]
        print(f"| {b1.label(n)} | {_walls(b)} | {_walls(o)} | **{ratio:.2f}x** | {_walls(b, 'cpu')} | {_walls(o, 'cpu')} "
              f"| **{cpu_ratio:.2f}x** | {last['scan']:.1f} | {last['candidates']:,} | {last['clusters']:,} "
              f"| {s['near']['recall']:.3f} / {s['near']['precision']:.3f} ({s['near']['planted']} planted) "
              f"| {s['leak']['recall']:.3f} / {s['leak']['precision']:.3f} ({s['leak']['planted']} planted) "
              f"| {max(x['rss_mb'] for x in b):,.0f} | {max(x['rss_mb'] for x in o):,.0f} |")
    if 100_000 in results and 1_000_000 in results:
        grow = max(x["rss_mb"] for x in results[1_000_000]["ours"]) / max(x["rss_mb"] for x in results[100_000]["ours"])
        print(f"\nPeak memory, B6, 1M vs 100k: **{grow:.2f}x** (flat: <= 1.5x, B1's criterion): "
              f"{'met' if grow <= 1.5 else 'MISSED'}; RSS after imports: "
              f"{results[1_000_000]['ours'][-1]['rss_before_mb']:.0f} MB")
    worst = max(statistics.median(x["wall"] for x in r["ours"]) / statistics.median(x["wall"] for x in r["b1"])
                for r in results.values())
    print(f"\nTarget (at most 0.5x B1's time): {'met' if worst <= 0.5 else 'MISSED'} (worst size {worst:.2f}x)")


if __name__ == "__main__":
    main()
