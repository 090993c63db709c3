"""B1: curation features (ingest + feature scoring into the catalog) vs the bare kernels.

What "ours" includes, timed end to end in a fresh child process per run:
* ``ingest([source.jsonl], catalog)``: JSON parsing, layout detection, normalisation (NFC,
  trimming), validation and quarantine, sha256 pair ids (and the unordered key used for
  contradictions), duplicate/contradiction resolution, and the write of ``pairs`` and
  ``quarantine`` into the DuckDB catalog;
* ``score_run(catalog, run_id, ScoringModels(tokenizer), ScoreOptions(margin="scores"))`` with no
  reference model: export of the run's pairs to parquet, TRL-exact tokenisation
  (``tokenize_pairs``: prompt, prompt+chosen+EOS, prompt+rejected+EOS), character and token edit
  distances, lengths, shared prefix, truncation flags, the ``scores`` margin, parquet parts and
  the load into ``scores`` and ``margins``.

The baseline ("kernels"), also in a fresh child process, streams the same chosen/rejected
strings out of a parquet copy of the source in batches of the same size (reading is not timed)
and times only, per batch, ``rapidfuzz.process.cpdist(chosen, rejected, Levenshtein.distance,
workers=-1)`` plus ONE batched call of the same tokenizer over the batch's chosen + rejected
strings (``tokenizer(texts)["input_ids"]``, the call TRL makes, without the prompt).

Ours and kernels alternate (K O O K K O ...) so drift on the shared machine hits both. Peak
memory is the child's RSS high-water mark (``ru_maxrss``), one child per size.

Run: ``.venv/bin/python benchmarks/bench_b1_features.py`` (200k pairs, 3 rounds, then the
growth/memory runs at 10k, 100k and 1M). ``--pairs 10k|100k|1M``, ``--growth ''`` to skip.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SEED = 20240601
CORPUS_CHARS = 40_000_000


def parse_count(text: str) -> int:
    text = text.strip().lower().replace("_", "")
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


# --------------------------------------------------------------------------------------------------
# Data: N pairs, prompts of 40-250 chars, chosen and rejected of 500-2000 chars each


def build_corpus(seed: int):  # noqa: ANN201 - (str, numpy Generator)
    """A long text of Zipf-distributed pseudo-words, some of them non-ASCII, to slice responses from."""
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlcumwfgypbvkjxqz"))
    freq = np.array([12.7, 9.1, 8.2, 7.5, 7.0, 6.7, 6.3, 6.1, 6.0, 4.3, 4.0, 2.8, 2.8, 2.4, 2.4, 2.2, 2.0,
                     2.0, 1.9, 1.5, 1.0, 0.8, 0.2, 0.2, 0.1, 0.1])
    words = []
    for _ in range(30_000):
        k = int(rng.integers(1, 11))
        words.append("".join(rng.choice(letters, size=k, p=freq / freq.sum())))
    words += ["café", "naïve", "über", "日本語", "😀", "señor", "façade", "Ångström", "—", "1,024", "3.14"]
    words = np.array(words, dtype=object)
    weights = 1.0 / (np.arange(len(words)) + 2.7)
    weights /= weights.sum()
    pieces = []
    total = 0
    while total < CORPUS_CHARS:
        idx = rng.choice(len(words), size=200_000, p=weights)
        chunk = " ".join(words[idx])
        chunk = chunk.replace(" e ", ". ").replace(" t ", ",\n")  # some punctuation and line breaks
        pieces.append(chunk)
        total += len(chunk)
    return " ".join(pieces), rng


def generate(n: int, path_parquet: Path, path_jsonl: Path, chunk: int = 20_000) -> None:
    """Write n pairs to parquet and JSONL (same rows). Rejected: 40% a few word edits of chosen,
    30% chosen's prefix then another continuation, 30% an unrelated response."""
    import numpy as np
    import polars as pl
    import pyarrow.parquet as pq

    corpus, rng = build_corpus(SEED)
    size = len(corpus)

    def piece(length: int) -> str:
        start = int(rng.integers(0, size - length - 1))
        return corpus[start : start + length].strip() or "x"

    tmp_parquet, tmp_jsonl = path_parquet.with_suffix(".parquet.tmp"), path_jsonl.with_suffix(".jsonl.tmp")
    writer = None
    with open(tmp_jsonl, "wb") as jsonl:
        for lo in range(0, n, chunk):
            m = min(chunk, n - lo)
            prompts, chosens, rejecteds = [], [], []
            kinds = rng.random(m)
            for j in range(m):
                prompts.append(f"Task {lo + j}: {piece(int(rng.integers(30, 240)))}?")
                chosen = piece(int(rng.integers(500, 2001)))
                if kinds[j] < 0.4:  # near-duplicate: 1-8 local edits
                    rejected = chosen
                    for _ in range(int(rng.integers(1, 9))):
                        at = int(rng.integers(0, len(rejected)))
                        cut = int(rng.integers(0, 12))
                        rejected = rejected[:at] + piece(int(rng.integers(0, 12))) + rejected[at + cut :]
                elif kinds[j] < 0.7:  # same start, different continuation
                    keep = int(rng.integers(50, max(51, len(chosen) - 100)))
                    rejected = chosen[:keep] + " " + piece(int(rng.integers(500, 2001)) - keep)
                else:
                    rejected = piece(int(rng.integers(500, 2001)))
                if rejected.strip() == chosen.strip():
                    rejected = rejected + " (alt)"
                chosens.append(chosen)
                rejecteds.append(rejected)
            frame = pl.DataFrame({
                "prompt": prompts, "chosen": chosens, "rejected": rejecteds,
                "score_chosen": np.round(rng.uniform(5, 10, m), 3), "score_rejected": np.round(rng.uniform(0, 5, m), 3),
            })
            table = frame.to_arrow()
            if writer is None:
                writer = pq.ParquetWriter(tmp_parquet, table.schema)
            writer.write_table(table, row_group_size=chunk)
            frame.write_ndjson(jsonl)
    writer.close()
    tmp_parquet.replace(path_parquet)
    tmp_jsonl.replace(path_jsonl)


def data_for(n: int, workdir: Path) -> tuple[Path, Path]:
    parquet, jsonl = workdir / f"pairs-{label(n)}.parquet", workdir / f"pairs-{label(n)}.jsonl"
    if not (parquet.exists() and jsonl.exists()):
        t0 = time.perf_counter()
        generate(n, parquet, jsonl)
        print(f"[generated {label(n)} pairs in {time.perf_counter() - t0:.0f} s: {jsonl.stat().st_size / 1e9:.2f} GB "
              f"JSONL]", file=sys.stderr, flush=True)
    return parquet, jsonl


def tokenizer_dir(workdir: Path, vocab: int, sample: Path) -> Path:
    """A byte-level BPE trained locally (training.models.train_tokenizer) on 3000 of the pairs."""
    out = workdir / f"tokenizer-{vocab}"
    if not (out / "tokenizer.json").exists():
        import pyarrow.parquet as pq

        from training.models import train_tokenizer

        rows = pq.ParquetFile(sample).read_row_group(0).slice(0, 3000).to_pylist()
        texts = [r[k] for r in rows for k in ("prompt", "chosen", "rejected")]
        train_tokenizer(texts, vocab, model_max_length=1 << 20).save_pretrained(out)
    return out


# --------------------------------------------------------------------------------------------------
# Children: one measured run each, result as one JSON line on stdout


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def child_ours(args: argparse.Namespace) -> dict:
    import curation.score.scoring as scoring
    from curation.ingest import IngestOptions, ingest
    from curation.lm.loading import load_tokenizer
    from curation.store import Catalog

    tokenizer = load_tokenizer(args.tokenizer)
    phases: dict[str, float] = {}

    def timed(name: str, fn):  # noqa: ANN001, ANN202 - wrap a module function to time its calls
        def wrapper(*a, **k):  # noqa: ANN002, ANN003, ANN202
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0
        return wrapper

    # phase timers around the functions score_run calls (looked up in the module at call time)
    for name in ("export_pairs", "load_scores", "tokenize_pairs", "text_features", "token_features"):
        setattr(scoring, name, timed(name, getattr(scoring, name)))
    workspace = Path(args.workspace)
    shutil.rmtree(workspace, ignore_errors=True)
    catalog = Catalog(workspace)
    rss_before = _rss_mb()
    cpu0, t0 = _cpu_seconds(), time.perf_counter()
    result = ingest([args.source], catalog, IngestOptions(), progress=False)
    t_ingest = time.perf_counter() - t0
    models = scoring.ScoringModels(tokenizer, "bench-bpe")
    options = scoring.ScoreOptions(margin="scores", max_length=args.max_length, batch_pairs=args.batch_pairs)
    scored = scoring.score_run(catalog, result.run_id, models, options, progress=False)
    wall, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    assert result.pairs == scored.pairs == args.pairs, (result.pairs, scored.pairs, args.pairs)
    db_bytes = catalog.path.stat().st_size
    shutil.rmtree(workspace, ignore_errors=True)
    return {"wall": wall, "cpu": cpu, "ingest": t_ingest, "score": wall - t_ingest, "phases": phases,
            "rss_mb": _rss_mb(), "rss_before_mb": rss_before, "catalog_mb": db_bytes / 1e6}


def child_kernels(args: argparse.Namespace) -> dict:
    import numpy as np
    import pyarrow.parquet as pq
    from rapidfuzz import process
    from rapidfuzz.distance import Levenshtein

    from curation.lm.loading import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    rss_before = _rss_mb()
    wall = cpu = 0.0
    t_cpdist = t_tok = 0.0
    n = 0
    checksum = 0
    for batch in pq.ParquetFile(args.parquet).iter_batches(batch_size=args.batch_pairs, columns=["chosen", "rejected"]):
        chosen, rejected = batch.column(0).to_pylist(), batch.column(1).to_pylist()
        c0, t0 = _cpu_seconds(), time.perf_counter()
        distance = process.cpdist(chosen, rejected, scorer=Levenshtein.distance, workers=-1, dtype=np.int64)
        t1 = time.perf_counter()
        ids = tokenizer(chosen + rejected)["input_ids"]
        t2 = time.perf_counter()
        wall += t2 - t0
        cpu += _cpu_seconds() - c0
        t_cpdist += t1 - t0
        t_tok += t2 - t1
        n += len(chosen)
        checksum += int(distance.sum()) + len(ids[-1])
        del ids
    assert n == args.pairs, (n, args.pairs)
    return {"wall": wall, "cpu": cpu, "phases": {"cpdist": t_cpdist, "tokenizer": t_tok}, "rss_mb": _rss_mb(),
            "rss_before_mb": rss_before}


def run_child(kind: str, n: int, parquet: Path, jsonl: Path, tok: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--pairs", str(n), "--parquet", str(parquet),
           "--source", str(jsonl), "--tokenizer", str(tok), "--workspace", str(Path(args.workdir) / "ws"),
           "--batch-pairs", str(args.batch_pairs), "--max-length", str(args.max_length)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"child {kind} {label(n)} failed:\n{done.stderr[-4000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"[{kind} {label(n)}: {out['wall']:.1f} s wall, {out['cpu']:.1f} s cpu, {n / out['wall']:.0f} pairs/s, "
          f"peak RSS {out['rss_mb']:.0f} MB]", file=sys.stderr, flush=True)
    return out


# --------------------------------------------------------------------------------------------------
# Report


def machine() -> str:
    import duckdb
    import polars
    import pyarrow
    import rapidfuzz
    import tokenizers
    import transformers

    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (f"{cores} cores, CPU {cpu}, {mem:.0f} GiB RAM, no GPU used; python {platform.python_version()}, "
            f"rapidfuzz {rapidfuzz.__version__}, tokenizers {tokenizers.__version__}, transformers "
            f"{transformers.__version__}, duckdb {duckdb.__version__}, polars {polars.__version__}, "
            f"pyarrow {pyarrow.__version__}")


def fmt_phases(phases: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in phases.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", default="200k", help="pairs in the main comparison (10k, 100k, 200k, 1M, ...)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of (kernels, ours)")
    parser.add_argument("--growth", default="10k,100k,1M",
                        help="sizes for the growth + peak-memory runs of ours (one child each); '' to skip")
    parser.add_argument("--growth-kernels", default="10k,100k",
                        help="sizes of --growth where the kernels run too (1M kernels alone take ~30 min here)")
    parser.add_argument("--workdir", default="/tmp/winnow_b1", help="generated data, tokenizer, scratch catalog")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch-pairs", type=int, default=20_000, help="ScoreOptions.batch_pairs (both sides)")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--child", choices=["ours", "kernels"], help=argparse.SUPPRESS)
    parser.add_argument("--parquet", help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--workspace", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.pairs = parse_count(args.pairs)

    if args.child:
        out = child_ours(args) if args.child == "ours" else child_kernels(args)
        print(json.dumps(out))
        return

    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    n = args.pairs
    growth = [parse_count(s) for s in args.growth.split(",") if s.strip()]
    growth_kernels = {parse_count(s) for s in args.growth_kernels.split(",") if s.strip()}
    parquet, jsonl = data_for(n, workdir)
    tok = tokenizer_dir(workdir, args.vocab, parquet)

    runs: dict[str, list[dict]] = {"kernels": [], "ours": []}
    for r in range(args.rounds):
        order = ("kernels", "ours") if r % 2 == 0 else ("ours", "kernels")
        for kind in order:
            runs[kind].append(run_child(kind, n, parquet, jsonl, tok, args))

    sizes: dict[int, dict[str, dict]] = {}
    for m in growth:
        p, j = data_for(m, workdir)
        sizes[m] = {}
        for kind in ("kernels", "ours") if len(sizes) % 2 else ("ours", "kernels"):
            if kind == "ours" or m in growth_kernels:
                sizes[m][kind] = run_child(kind, m, p, j, tok, args)

    print(f"\n### B1: curation features, {label(n)} pairs ({args.rounds} alternating rounds)\n")
    print(f"Machine: {machine()}\n")
    print(f"Data: prompts 30-240 chars, chosen/rejected 500-2000 chars each (40% near-duplicates, 30% shared "
          f"prefix, 30% unrelated); byte-level BPE vocab {args.vocab} trained locally on 3000 pairs; "
          f"max_length {args.max_length}; batches of {args.batch_pairs} pairs.\n")
    if args.rounds:
        report_rounds(runs, n)
    if sizes:
        report_sizes(sizes)


def report_rounds(runs: dict[str, list[dict]], n: int) -> None:
    print("| side | wall s (each round) | cpu s (each round) | pairs/s (median wall) | phases, s (last round) |")
    print("|---|---|---|---|---|")
    med = {}
    for kind, name in (("kernels", "bare kernels: cpdist + 1 tokenizer call / batch"),
                       ("ours", "Winnow: ingest + score_run (features, catalog)")):
        walls = [x["wall"] for x in runs[kind]]
        cpus = [x["cpu"] for x in runs[kind]]
        med[kind] = statistics.median(walls)
        phases = dict(runs[kind][-1]["phases"])
        if kind == "ours":
            phases = {"ingest": runs[kind][-1]["ingest"], "score_run": runs[kind][-1]["score"], **phases}
        print(f"| {name} | {', '.join(f'{w:.1f}' for w in walls)} | {', '.join(f'{c:.1f}' for c in cpus)} "
              f"| {n / med[kind]:,.0f} | {fmt_phases(phases)} |")
    per_round = [o["wall"] / k["wall"] for o, k in zip(runs["ours"], runs["kernels"], strict=True)]
    per_round_cpu = [o["cpu"] / k["cpu"] for o, k in zip(runs["ours"], runs["kernels"], strict=True)]
    ratio = med["ours"] / med["kernels"]
    print(f"\nOverhead ratio ours/kernels (median wall): **{ratio:.2f}x** (per round: "
          f"{', '.join(f'{x:.2f}' for x in per_round)}; cpu time per round: "
          f"{', '.join(f'{x:.2f}' for x in per_round_cpu)}); target <= 1.30x: "
          f"{'met' if ratio <= 1.3 else 'MISSED'}")


def report_sizes(sizes: dict[int, dict[str, dict]]) -> None:
    if sizes:
        print("\n| pairs | kernels pairs/s | ours pairs/s | ratio | ours ingest s | ours score_run s "
              "| peak RSS kernels MB | peak RSS ours MB | catalog MB |")
        print("|---|---|---|---|---|---|---|---|---|")
        for m, res in sizes.items():
            o, k = res["ours"], res.get("kernels")
            kernel_cells = (f"{m / k['wall']:,.0f}", f"{o['wall'] / k['wall']:.2f}x", f"{k['rss_mb']:,.0f}") if k \
                else ("not run", "-", "-")
            print(f"| {label(m)} | {kernel_cells[0]} | {m / o['wall']:,.0f} | {kernel_cells[1]} "
                  f"| {o['ingest']:.1f} | {o['score']:.1f} | {kernel_cells[2]} | {o['rss_mb']:,.0f} "
                  f"| {o['catalog_mb']:,.0f} |")
        if 100_000 in sizes and 1_000_000 in sizes:
            grow = sizes[1_000_000]["ours"]["rss_mb"] / sizes[100_000]["ours"]["rss_mb"]
            print(f"\nPeak memory, ours, 1M vs 100k: **{grow:.2f}x** (target <= 1.5x: "
                  f"{'met' if grow <= 1.5 else 'MISSED'}); RSS after imports, before work: "
                  f"{sizes[1_000_000]['ours']['rss_before_mb']:.0f} MB")


if __name__ == "__main__":
    main()
