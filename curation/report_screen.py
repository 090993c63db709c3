"""The report's near-duplicate and contamination section and its plot (the screen step, curation/screen.py).

Its own module so report.py stays the list of sections; the data comes from named reads in reads.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from curation.reads import (
    cluster_size_counts,
    contamination_by_benchmark,
    near_duplicate_clusters,
    screen_examples,
)
from curation.report_doc import Block, Code, Image, Paragraph, Section, Table
from curation.store import Catalog

SCREEN_PLOT = "near_duplicates.png"  # written when the run has clusters or contamination hits


def screen_data(catalog: Catalog, run_id: str) -> dict[str, pl.DataFrame]:
    """Cluster sizes, the clusters' pairs and contamination hits per benchmark, for the section and plot."""
    return {"sizes": cluster_size_counts(catalog, run_id), "clusters": near_duplicate_clusters(catalog, run_id),
            "benchmarks": contamination_by_benchmark(catalog, run_id)}


def has_screen_plot(screen: dict[str, pl.DataFrame]) -> bool:
    """Whether there is anything to draw (clusters or benchmark hits)."""
    return bool(screen["sizes"].height or screen["benchmarks"].height)


def plot_screen(screen: dict[str, pl.DataFrame], path: Path) -> None:
    """Cluster sizes (pairs per size, near-contradictions marked) and contamination hits per benchmark."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    sizes = screen["sizes"]
    if sizes.height:
        labels = [str(s) for s in sizes["size"].to_list()]
        clean = (sizes["clusters"] - sizes["contradictions"]).to_list()
        left.bar(labels, clean, color="#2a9d8f", label="near-duplicate clusters")
        left.bar(labels, sizes["contradictions"].to_list(), bottom=clean, color="#e76f51",
                 label="near-contradiction clusters")
        left.legend(fontsize=8)
    else:
        left.text(0.5, 0.5, "no near-duplicate clusters", ha="center", va="center", transform=left.transAxes)
    left.set_title("Near-duplicate clusters by size (one pair kept per cluster)")
    left.set_xlabel("pairs in the cluster")
    left.set_ylabel("clusters")
    left.grid(axis="y", alpha=0.3)
    bench = screen["benchmarks"]
    if bench.height:
        names = bench["benchmark"].to_list()
        bottom = np.zeros(len(names))
        for column, colour in (("prompt", "#264653"), ("chosen", "#8ab17d"), ("rejected", "#e9c46a")):
            values = bench[column].cast(pl.Float64).to_numpy()
            right.barh(names, values, left=bottom, color=colour, label=f"hits in {column}")
            bottom += values
        right.legend(fontsize=8)
    else:
        right.text(0.5, 0.5, "no benchmark hits", ha="center", va="center", transform=right.transAxes)
    right.set_title("Benchmark n-gram hits, by pair field")
    right.set_xlabel("pair fields with a shared n-gram")
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)


def _near_dup_blocks(near: dict[str, Any], settings: dict[str, Any], screen: dict[str, pl.DataFrame]) -> list[Block]:
    if not near.get("enabled"):
        return [Paragraph("Near-duplicate step: off.")]
    blocks: list[Block] = [Paragraph(
        f"Near-duplicates (prompt similarity >= {settings['prompt_similarity']}, each response >= "
        f"{settings['response_similarity']}, normalised Indel): {near['pairs']} pairs checked, "
        f"{near['candidates']} LSH candidates, {near['verified']} confirmed; **{near['clusters']} clusters** "
        f"holding {near['clustered_pairs']} pairs, {near['dropped']} dropped (kept per cluster: "
        f"`{settings['keep']}`), {near['contradiction_clusters']} near-contradiction cluster(s) "
        f"(`contradictions: {settings['contradictions']}`).")]
    sizes, clusters = screen["sizes"], screen["clusters"]
    if sizes.height:
        blocks.append(Table(["cluster size", "clusters", "pairs", "near-contradictions"], sizes.rows()))
    if clusters.height:
        shown = clusters.filter(pl.col("contradiction")).head(40)
        shown = shown if shown.height else clusters.head(20)
        title = "Near-contradiction clusters" if clusters["contradiction"].any() else "Largest clusters"
        rows = [[r["cluster_id"], r["size"], r["pair_id"][:12], "kept" if r["representative"] else
                 (r["duplicate_of"] or "")[:12], r["orientation"], r["prompt_similarity"], r["response_similarity"],
                 r["reason"]] for r in shown.to_dicts()]
        blocks += [Paragraph(f"{title}:"), Table(["cluster", "size", "pair", "duplicate of", "orientation",
                                                  "prompt sim", "response sim", "decision"], rows)]
    return blocks


def _decontam_blocks(decon: dict[str, Any], screen: dict[str, pl.DataFrame]) -> list[Block]:
    if not decon.get("enabled"):
        return [Paragraph("Decontamination: no benchmark named (`curate.decontam.benchmarks`).")]
    by_name = {r["benchmark"]: r for r in screen["benchmarks"].to_dicts()}
    rows = [[b["name"], b["rows"], b["entries"], b["short_entries"], b["pairs_hit"],
             by_name.get(b["name"], {}).get("prompt", 0), by_name.get(b["name"], {}).get("chosen", 0),
             by_name.get(b["name"], {}).get("rejected", 0), by_name.get(b["name"], {}).get("example_span")]
            for b in decon["benchmarks"]]
    return [Paragraph(f"Decontamination ({decon['ngram']}-gram overlap, at least {decon['min_ngrams']} shared; "
                      f"{'dropped' if decon['drop'] else 'recorded only'}): **{decon['contaminated_pairs']} pairs** hit."),
            Table(["benchmark", "rows", "entries", f"entries < {decon['ngram']} words", "pairs hit", "in prompt",
                   "in chosen", "in rejected", "example span"], rows)]


def screen_section(run_id: str, data: dict[str, Any]) -> Section:
    """Near-duplicate clusters (with near-contradictions) and benchmark contamination, with the queries."""
    resolved = data["curate"]["resolved"]
    screen = data["screen"]
    blocks = _near_dup_blocks(resolved.get("near_dup") or {}, data["curate"]["settings"].get("near_dup") or {}, screen)
    blocks += _decontam_blocks(resolved.get("decontam") or {}, screen)
    if has_screen_plot(screen):
        blocks.append(Image(SCREEN_PLOT, "near-duplicates and contamination",
                            "Near-duplicate clusters by size, and benchmark n-gram hits by pair field."))
    blocks += [Paragraph("Every cluster and hit (`winnow query`):"), Code("\n".join(screen_examples(run_id)))]
    return Section("screen", "Near-duplicates and contamination", blocks)
