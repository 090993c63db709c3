"""Write the bundled demo set: sorting-task pairs with planted problems.

Deterministic: the same script always writes the same bytes, so the demo's accounting
table (and everything downstream) is reproducible. Run: python data/make_demo.py
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from training.sorting import TRUTH_COLUMNS, PreferenceSetConfig, generate_preferences

DEMO_CONFIG = PreferenceSetConfig(size=3000, seed=7)
OUT = Path(__file__).parent / "demo" / "pairs.jsonl"
TRUTH = Path(__file__).parent / "demo" / "truth.parquet"

# Planted problems, by count: each one ends in the quarantine with its reason code.
PLANTED = {"duplicate": 60, "identical_sides": 30, "empty_text": 10, "malformed_json": 5, "contradiction": 8}
# Planted near-copies, which ingest lets through as pairs and curation's near-duplicate step
# (curation/near_dup.py) clusters with their originals: the prompt re-typed (whitespace, case,
# punctuation, a changed or added word) with the same answers, or with the answers swapped.
PLANTED_NEAR = {"near_duplicate": 24, "near_contradiction": 4}
_RETYPE = (
    lambda p: p.replace(": ", ":  ", 1),  # whitespace
    lambda p: p.replace("Sort", "sort", 1),  # case
    lambda p: p.replace(":", ";", 1),  # punctuation
    lambda p: p.replace("Sort", "Order", 1),  # a changed word
    lambda p: "Please " + p[0].lower() + p[1:],  # a light rephrasing
    lambda p: p.replace("\nAnswer:", "\nAnswer :"),  # punctuation spacing
)


def build_lines(seed: int = 7) -> tuple[list[str], list[dict]]:
    frame = generate_preferences(DEMO_CONFIG)
    records = frame.drop(TRUTH_COLUMNS).to_dicts()
    truth = frame.select("prompt", "chosen", "rejected", *TRUTH_COLUMNS).to_dicts()
    rng = np.random.default_rng(seed)
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    extra: list[str] = []
    for i in rng.choice(len(records), PLANTED["duplicate"], replace=False):
        extra.append(lines[int(i)])
    for i in rng.choice(len(records), PLANTED["identical_sides"], replace=False):
        r = dict(records[int(i)])
        r["rejected"] = r["chosen"]
        extra.append(json.dumps(r))
    for i in rng.choice(len(records), PLANTED["empty_text"], replace=False):
        r = dict(records[int(i)])
        r["chosen"] = "   "
        extra.append(json.dumps(r))
    for i in rng.choice(len(records), PLANTED["malformed_json"], replace=False):
        extra.append(lines[int(i)][: len(lines[int(i)]) // 2])
    contradicted = rng.choice(len(records), PLANTED["contradiction"], replace=False)
    for i in contradicted:
        r = dict(records[int(i)])
        r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
        r["score_chosen"], r["score_rejected"] = r.get("score_rejected"), r.get("score_chosen")
        extra.append(json.dumps(r))
    used = {int(i) for i in contradicted}  # their originals are quarantined: no pair to be near
    pool = np.array([i for i in range(len(records)) if i not in used])
    near = rng.choice(pool, sum(PLANTED_NEAR.values()), replace=False)
    for k, i in enumerate(near):
        r = dict(records[int(i)])
        r["prompt"] = _RETYPE[k % len(_RETYPE)](r["prompt"])
        if k >= PLANTED_NEAR["near_duplicate"]:
            r["chosen"], r["rejected"] = r["rejected"], r["chosen"]
            r["score_chosen"], r["score_rejected"] = r.get("score_rejected"), r.get("score_chosen")
        extra.append(json.dumps(r))
    positions = rng.choice(len(lines) + len(extra), len(extra), replace=False)
    merged: list[str | None] = [None] * (len(lines) + len(extra))
    for pos, line in zip(sorted(int(p) for p in positions), extra, strict=True):
        merged[pos] = line
    it = iter(lines)
    return [m if m is not None else next(it) for m in merged], truth


def main() -> None:
    import polars as pl

    lines, truth = build_lines()
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n", encoding="utf-8")
    pl.DataFrame(truth).write_parquet(TRUTH)
    print(f"wrote {len(lines)} lines to {OUT} (planted: {PLANTED}, near copies: {PLANTED_NEAR})")


if __name__ == "__main__":
    main()
