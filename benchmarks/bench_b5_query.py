"""B5: a typical stats query (histogram of margins by stage) on a catalog of 1M pairs; target < 1 s.

The catalog is built directly in DuckDB with the real schema (``curation.store.Catalog``
creates every table): one run of N pairs with ``pairs`` (short texts), ``scores`` (every
column filled, margins ~ N(1, 2)), ``decisions`` (85% kept in 3 sDPO stages by margin,
easy first; the rest dropped by the filter's reason codes) and ``stages``. Pair ids are
64-character sha256 hex strings, as ingestion writes them, and the joins go through them.

What is timed: ``Catalog(workdir).query(sql, [run_id])``, i.e. what ``winnow query`` does:
open the catalog file read-only, run the SQL, return a polars frame, close. Each repetition
opens a fresh connection (no DuckDB cache carried over; the OS page cache is warm after
the first one, which is reported separately as "first"). Sizes alternate within each
repetition. The full ``winnow query`` command (python start-up and imports included) is
timed once per size as well.

Run: ``.venv/bin/python benchmarks/bench_b5_query.py`` (10k, 100k, 1M; 7 repetitions).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import duckdb  # noqa: E402

from benchmarks.common import describe_machine  # noqa: E402
from curation.store import Catalog  # noqa: E402

RUN_ID = "run-b5bench0001"

QUERIES = {
    # the typical one: 20 equal-width margin buckets per stage, scores joined to decisions
    "histogram by stage (width buckets)": """
        WITH j AS (
            SELECT d.stage, s.margin FROM scores s JOIN decisions d USING (run_id, pair_id)
            WHERE s.run_id = $1 AND d.kept),
        b AS (SELECT min(margin) AS lo, (max(margin) - min(margin)) / 20 AS w FROM j)
        SELECT stage, least(floor((margin - lo) / w), 19)::INTEGER AS bucket,
               round(any_value(lo + least(floor((margin - lo) / w), 19) * w), 3) AS bucket_lo, count(*) AS pairs
        FROM j, b GROUP BY ALL ORDER BY stage, bucket""",
    # the same with DuckDB's histogram aggregate over fixed bins
    "histogram() aggregate by stage": """
        SELECT d.stage, histogram(s.margin, equi_width_bins(-8.0, 10.0, 20, false)) AS hist, count(*) AS pairs
        FROM scores s JOIN decisions d USING (run_id, pair_id)
        WHERE s.run_id = $1 AND d.kept GROUP BY d.stage ORDER BY d.stage""",
    # a stats summary per stage and for the dropped pairs
    "per-stage summary + quantiles": """
        SELECT coalesce(d.stage::VARCHAR, 'dropped: ' || d.reason) AS stage, count(*) AS pairs,
               avg(s.margin) AS mean_margin, quantile_cont(s.margin, [0.1, 0.5, 0.9]) AS margin_q,
               avg(s.token_edit_norm) AS token_edit, avg(s.length_gap) AS length_gap,
               sum(s.uneven_truncation::INT) AS uneven
        FROM scores s JOIN decisions d USING (run_id, pair_id)
        WHERE s.run_id = $1 GROUP BY ALL ORDER BY 1""",
}


def parse_count(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text[:-1] if scale > 1 else text) * scale)


def label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def build_catalog(workdir: Path, n: int) -> float:
    """Fill a fresh catalog with one run of n pairs; returns seconds taken."""
    shutil.rmtree(workdir, ignore_errors=True)
    t0 = time.perf_counter()
    catalog = Catalog(workdir)
    with catalog.transaction() as con:  # creates every table of the real schema
        con.execute("SELECT setseed(0.42)")
        con.execute(
            """CREATE TEMP TABLE base AS
               SELECT i, sha256('pair-' || i::VARCHAR) AS pair_id,
                      1.0 + 2.0 * sqrt(-2 * ln(1 - random())) * cos(2 * pi() * random()) AS margin,
                      (random() * 1500 + 500)::BIGINT AS chosen_chars, (random() * 1500 + 500)::BIGINT AS rejected_chars,
                      (random() * 200 + 30)::BIGINT AS prompt_chars, random() AS u
               FROM range(?) t(i)""",
            [n],
        )
        con.execute(
            """INSERT INTO pairs (run_id, pair_id, prompt, chosen, rejected, score_chosen, score_rejected, source,
                                  source_row, format)
               SELECT $1, pair_id, 'Task ' || i, 'chosen ' || i, 'rejected ' || i, 5 + margin, 5.0,
                      'bench.jsonl', i + 1, 'explicit+scored' FROM base""",
            [RUN_ID],
        )
        con.execute(
            """INSERT INTO scores
               SELECT $1, pair_id, prompt_chars, chosen_chars, rejected_chars,
                      (u * 1500)::BIGINT, u, prompt_chars // 5, chosen_chars // 5, rejected_chars // 5,
                      (u * 300)::BIGINT, u, (u * 40)::BIGINT, prompt_chars // 5 + (u * 40)::BIGINT, u / 4,
                      chosen_chars // 5 - rejected_chars // 5, chosen_chars / rejected_chars,
                      prompt_chars // 5 + chosen_chars // 5 > 512, prompt_chars // 5 + rejected_chars // 5 > 512,
                      (prompt_chars // 5 + chosen_chars // 5 > 512) != (prompt_chars // 5 + rejected_chars // 5 > 512),
                      prompt_chars // 5 < 512,
                      -chosen_chars / 3.0, -rejected_chars / 3.0, -1.5, -1.6,
                      5 + margin, 5.0, margin, 'scores', 'bench-bpe', 512
               FROM base""",
            [RUN_ID],
        )
        # 15% dropped by rule reasons, the rest kept and staged by margin (easy = large margin first)
        con.execute(
            """INSERT INTO decisions
               WITH r AS (SELECT *, CASE WHEN u < 0.05 THEN 'low_margin' WHEN u < 0.09 THEN 'low_edit_distance'
                                         WHEN u < 0.12 THEN 'truncated' WHEN u < 0.14 THEN 'beta_outlier_high'
                                         WHEN u < 0.15 THEN 'length_ratio' END AS drop_reason FROM base),
               k AS (SELECT pair_id, ntile(3) OVER (ORDER BY margin DESC, pair_id) AS stage
                     FROM r WHERE drop_reason IS NULL)
               SELECT $1, r.pair_id, k.stage IS NOT NULL, coalesce(r.drop_reason, 'kept'), NULL, 1.0, k.stage,
                      row_number() OVER (PARTITION BY k.stage ORDER BY r.margin DESC, r.pair_id) - 1
               FROM r LEFT JOIN k USING (pair_id)""",
            [RUN_ID],
        )
        con.execute(
            """INSERT INTO stages SELECT $1, d.stage, count(*), 'margin', min(s.margin), max(s.margin), avg(s.margin)
               FROM decisions d JOIN scores s USING (run_id, pair_id) WHERE d.run_id = $1 AND d.kept
               GROUP BY d.stage""",
            [RUN_ID],
        )
        catalog.upsert_run(RUN_ID, con, status="curated", stage="curate")
    with duckdb.connect(str(catalog.path)) as con:
        con.execute("CHECKPOINT")
    return time.perf_counter() - t0


def time_query(catalog: Catalog, sql: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    frame = catalog.query(sql, [RUN_ID])
    return time.perf_counter() - t0, frame.height


def time_cli(workdir: Path, sql: str) -> float:
    env = {**os.environ, "COLUMNS": "200"}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "flows.cli", "query", sql.replace("$1", f"'{RUN_ID}'"),
                           "--workdir", str(workdir), "--csv"], cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"winnow query failed: {done.stderr}")
    return seconds


def machine() -> str:
    return describe_machine(("duckdb", "polars"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10k,100k,1M")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--workdir", default="/tmp/winnow_b5")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the catalogs even if present")
    args = parser.parse_args()
    sizes = [parse_count(s) for s in args.sizes.split(",") if s.strip()]

    catalogs: dict[int, Catalog] = {}
    built: dict[int, str] = {}
    for n in sizes:
        workdir = Path(args.workdir) / label(n)
        catalog = Catalog(workdir)
        fresh = args.rebuild or not catalog.path.exists() or \
            catalog.query("SELECT count(*) AS n FROM scores WHERE run_id = ?", [RUN_ID]).item() != n
        built[n] = f"{build_catalog(workdir, n):.1f} s" if fresh else "cached"
        catalogs[n] = catalog

    first: dict[tuple[str, int], float] = {}
    times: dict[tuple[str, int], list[float]] = {}
    rows: dict[tuple[str, int], int] = {}
    for rep in range(args.repeats + 1):
        for name, sql in QUERIES.items():
            for n in sizes if rep % 2 == 0 else list(reversed(sizes)):
                seconds, height = time_query(catalogs[n], sql)
                if rep == 0:
                    first[(name, n)] = seconds
                else:
                    times.setdefault((name, n), []).append(seconds)
                rows[(name, n)] = height
    cli = {n: time_cli(catalogs[n].workdir, QUERIES["histogram by stage (width buckets)"]) for n in sizes}

    print(f"\n### B5: stats query on the catalog ({args.repeats} repetitions, fresh read-only connection each)\n")
    print(f"Machine: {machine()}\n")
    print("| pairs | catalog MB | built |")
    print("|---|---|---|")
    for n in sizes:
        print(f"| {label(n)} | {catalogs[n].path.stat().st_size / 1e6:,.0f} | {built[n]} |")
    print("\n| query | pairs | rows out | first s | median s | min s | max s | target < 1 s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in QUERIES:
        for n in sizes:
            ts = times[(name, n)]
            med = statistics.median(ts)
            print(f"| {name} | {label(n)} | {rows[(name, n)]} | {first[(name, n)]:.3f} | {med:.3f} | {min(ts):.3f} "
                  f"| {max(ts):.3f} | {'met' if med < 1 else 'MISSED'} |")
    print("\n| whole command, python start-up included | " + " | ".join(label(n) for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    print("| `winnow query --csv` (histogram by stage), s | " + " | ".join(f"{cli[n]:.2f}" for n in sizes) + " |")


if __name__ == "__main__":
    main()
