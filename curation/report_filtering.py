"""The report's "what was dropped, and where" section: every filter's share of all pairs, in order.

Curation's own drops come from `decisions`; online rounds from `decision_rounds`; beta-DPO's
in-batch drop is the expected share from the filtering policy recorded with the advice (it
happens inside each training batch, so no row records it).
"""

from __future__ import annotations

import json
from typing import Any

import polars as pl

from curation.report_doc import Paragraph, Section, Table
from curation.schema import DecisionReason

_SCREEN = (DecisionReason.NEAR_DUPLICATE, DecisionReason.NEAR_CONTRADICTION, DecisionReason.CONTAMINATED)
_BETA = (DecisionReason.BETA_OUTLIER_LOW, DecisionReason.BETA_OUTLIER_HIGH)


def _count(pairs: pl.DataFrame, reasons: tuple[DecisionReason, ...]) -> int:
    return int(pairs["reason"].is_in([r.value for r in reasons]).sum())


def filtering_section(run_id: str, data: dict[str, Any]) -> Section:
    """Total share of the pairs that never reach the loss, and which step took each part."""
    pairs = data["pairs"]
    total = max(pairs.height, 1)
    heldout = _count(pairs, (DecisionReason.HELDOUT,))
    screened, beta = _count(pairs, _SCREEN), _count(pairs, _BETA)
    ruled = int((~pairs["kept"]).sum()) - heldout - screened - beta
    kept = int(pairs["kept"].sum())
    rows: list[list[Any]] = [
        ["held out for evaluation", heldout, f"{heldout / total:.1%}", "reason `heldout` in `decisions`"],
        ["rule filters (offline)", ruled, f"{ruled / total:.1%}", "per pair in `decisions`"],
        ["near-duplicates and contamination (offline)", screened, f"{screened / total:.1%}",
         "per pair in `decisions`, clusters and hits in `clusters`, `contamination`"],
        ["beta-guided filter (offline)", beta, f"{beta / total:.1%}", "per pair in `decisions`"],
    ]
    for r in data.get("rounds", pl.DataFrame()).to_dicts():
        rows.append([f"online round {r['round']} (after stage {r['round']})", 0, "0.0%",
                     f"re-decided {r['pairs']} pairs: {r['readmitted']} re-admitted, {r['newly_dropped']} newly "
                     "dropped (same share; `decision_rounds`)"])
    filtering: dict[str, Any] = {}
    if data["advice"].height:
        filtering = json.loads(data["advice"].row(0, named=True)["evidence"]).get("filtering") or {}
    in_batch = filtering.get("in_batch_keep")
    batch_drop = kept * (1 - in_batch) if in_batch is not None else 0.0
    rows.append(["beta-DPO in-batch filter (training)", round(batch_drop), f"{batch_drop / total:.1%}",
                 f"keeps {in_batch:.1%} of each batch (expected)" if in_batch is not None else
                 "none: the objective has no in-batch filter"])
    dropped = total - kept + batch_drop
    rows.append(["**total**", round(dropped), f"**{dropped / total:.1%}**",
                 f"{total - dropped:.0f} of {total} pairs reach the loss"])
    policy = (f"Policy `{filtering['policy']}` (keep {filtering['filter_keep']:g}, the paper's rho, for the beta "
              "filters together), recorded with the advice." if filtering else "No filtering policy recorded.")
    return Section("filtering", "What was dropped, and where",
                   [Paragraph(policy), Table(["where", "pairs", "share of all", "note"], rows)])
