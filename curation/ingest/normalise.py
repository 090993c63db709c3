"""Detect a source's shape and turn its records into candidate pairs (or quarantine rows)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

from curation.errors import UnknownFormatError
from curation.ingest.candidates import Normalised, Reject
from curation.ingest.formats import score_keys
from curation.ingest.mapping import suggest_columns
from curation.ingest.multi_response import PairingOptions
from curation.ingest.readers import RawBatch
from curation.ingest.shapes import BY_NAME, Format, Shape, recognise
from curation.schema import Reason


@dataclass(frozen=True)
class Layout:
    shape: Shape
    scored: bool  # ratings required: --format scored, or a generic layout whose rows mostly carry them

    @property
    def label(self) -> str:
        return self.shape.label(self.scored)


def detect_layout(records: list[dict[str, Any]], requested: Format, source_label: str) -> Layout:
    """Majority vote over the first batch, so a few broken rows do not decide the shape."""
    if requested not in (Format.AUTO, Format.SCORED):
        return _layout(BY_NAME[requested.value], records, requested)
    votes = Counter(s.name for r in records if (s := recognise(r)) is not None)
    if not votes:
        keys = sorted({k for r in records[:50] for k in r})
        raise UnknownFormatError(
            f"{source_label}: cannot detect the format: no known shape has the keys {keys}; "
            f"map them, e.g. --columns {suggest_columns(keys)} (ingest.columns in a recipe; "
            "shapes and targets: docs/datasets.md), or pass --format"
        )
    return _layout(BY_NAME[votes.most_common(1)[0][0]], records, requested)


def _layout(shape: Shape, records: list[dict[str, Any]], requested: Format) -> Layout:
    """Ratings are required with --format scored; a generic layout also requires them when most rows have them
    (a shape with ratings of its own reads them where they are)."""
    if requested == Format.SCORED:
        return Layout(shape, True)
    return Layout(shape, shape.generic and sum(1 for r in records if score_keys(r)) * 2 > len(records))


def normalise_batch(raw: RawBatch, layout: Layout, options: PairingOptions) -> tuple[Normalised, RawBatch]:
    """Split a batch into candidate pairs and rejects (one quarantine row per row that makes none)."""
    out, rejects = Normalised(), RawBatch(rejects=list(raw.rejects))
    make = layout.shape.make
    require_scores = layout.scored
    if options.require_scores != require_scores:
        options = replace(options, require_scores=require_scores)
    for row, record in raw.records:
        try:
            candidates = make(record, options)
            if require_scores and any(c[6] is None or c[7] is None for c in candidates):
                raise Reject(Reason.MISSING_FIELD, "missing field(s): score_chosen, score_rejected")
        except Reject as bad:  # the preview is built for rejects only: dumping every record cost ~10% of ingest
            rejects.reject(row, bad.reason, bad.detail, json.dumps(record, ensure_ascii=False, default=str))
            continue
        out.add(row, candidates)
    return out, rejects
