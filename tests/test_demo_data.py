"""The bundled demo set is exactly what its committed generator writes, planted problems included."""

from __future__ import annotations

import json
import runpy
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parents[1]


def test_demo_file_is_reproducible_from_its_generator() -> None:
    module = runpy.run_path(str(ROOT / "data" / "make_demo.py"))
    lines, truth = module["build_lines"]()
    committed = (ROOT / "data" / "demo" / "pairs.jsonl").read_text(encoding="utf-8")
    assert committed == "\n".join(lines) + "\n"
    assert pl.read_parquet(ROOT / "data" / "demo" / "truth.parquet").to_dicts() == truth


def test_demo_has_its_planted_problems(tmp_path: Path) -> None:
    from curation.ingest import ingest
    from curation.store import Catalog

    module = runpy.run_path(str(ROOT / "data" / "make_demo.py"))
    planted = module["PLANTED"]
    result = ingest([str(ROOT / "data" / "demo" / "pairs.jsonl")], Catalog(tmp_path), progress=False)
    by_reason = {r["reason"]: r["rows"] for r in result.reasons.to_dicts()}
    assert by_reason == {
        "duplicate": planted["duplicate"],
        "identical_sides": planted["identical_sides"],
        "empty_text": planted["empty_text"],
        "malformed_json": planted["malformed_json"],
        "contradiction": 2 * planted["contradiction"],  # both orientations are quarantined
    }
    first = json.loads((ROOT / "data" / "demo" / "pairs.jsonl").read_text().splitlines()[0])
    assert {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"} <= set(first)
