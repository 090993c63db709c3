"""The gym's claims: pre-declared tests, computed from the numbers, never tuned.

Each rule was fixed before any number was seen; :func:`evaluate_claims` documents them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

if TYPE_CHECKING:
    from training.gym.runner import GymResult


@dataclass
class Claim:
    name: str
    statement: str
    verdict: str  # reproduced | partly reproduced | not reproduced | not measured
    evidence: str


def stat(summary: pl.DataFrame, arm: str, metric: str) -> tuple[float, float]:
    row = summary.filter((pl.col("arm") == arm) & (pl.col("metric") == metric))
    if row.height == 0:
        return math.nan, math.nan
    mean, std = row["mean"][0], row["std"][0]
    return float(mean), (float(std) if std is not None else math.nan)


def per_seed_values(per_seed: pl.DataFrame, arm: str, metric: str) -> list[float]:
    if metric not in per_seed.columns:
        return []
    return [float(v) for v in per_seed.filter(pl.col("arm") == arm).sort("seed")[metric].to_list() if v is not None]


def _fmt_list(values: Sequence[float], digits: int = 3) -> str:
    return "[" + ", ".join(f"{v:+.{digits}f}" if digits and v < 0 else f"{v:.{digits}f}" for v in values) + "]"


def _spread(*stds: float) -> float:
    finite = [s for s in stds if s is not None and math.isfinite(s)]
    return max(finite) if finite else math.nan


def evaluate_claims(result: GymResult) -> list[Claim]:
    """The issue's four claims, each with a rule fixed before the numbers were seen:

    1. DPOP: mean low-edit chosen drift of trl-dpo < 0 and of dpop >= 0 (partly: dpop's above
       trl-dpo's by more than the seed spread but still below 0);
    2. LN-DPO: mean greedy length of ln-dpo below trl-dpo's by more than the seed spread, and
       its gold reward not below trl-dpo's by more than the spread;
    3. filter: mean precision of the beta filter's drops against is_flipped >= 0.8;
    4. curated: mean gold reward of winnow-curated above trl-dpo's by more than the seed spread.

    The spread of a comparison is the larger sample std (across seeds) of the two arms.
    """
    s, per_seed = result.summary, result.per_seed
    claims: list[Claim] = []
    arms = set(result.config.arms)

    if {"trl-dpo", "dpop"} <= arms:
        d, d_sd = stat(s, "trl-dpo", "chosen_drift_low_edit")
        p, p_sd = stat(s, "dpop", "chosen_drift_low_edit")
        dh, _ = stat(s, "trl-dpo", "chosen_drift_high_edit")
        ph, _ = stat(s, "dpop", "chosen_drift_high_edit")
        spread = _spread(d_sd, p_sd)
        if d < 0 <= p:
            verdict = "reproduced"
        elif d < 0 and p - d > spread:
            verdict = "partly reproduced"
        else:
            verdict = "not reproduced"
        claims.append(Claim(
            "dpop-low-edit", "On low-edit-distance pairs DPO drives the chosen log-prob below the reference; DPOP "
            "keeps it at or above.", verdict,
            f"chosen drift on held-out low-edit pairs: trl-dpo {d:+.3f} ± {d_sd:.3f} "
            f"(seeds {_fmt_list(per_seed_values(per_seed, 'trl-dpo', 'chosen_drift_low_edit'))}), dpop {p:+.3f} ± "
            f"{p_sd:.3f} (seeds {_fmt_list(per_seed_values(per_seed, 'dpop', 'chosen_drift_low_edit'))}); on "
            f"high-edit pairs trl-dpo {dh:+.3f}, dpop {ph:+.3f}."))
    else:
        claims.append(Claim("dpop-low-edit", "DPOP vs DPO on low-edit pairs", "not measured", "arm not run"))

    if {"trl-dpo", "ln-dpo"} <= arms:
        ld, ld_sd = stat(s, "trl-dpo", "len_tokens")
        ll, ll_sd = stat(s, "ln-dpo", "len_tokens")
        gd, gd_sd = stat(s, "trl-dpo", "gold_reward")
        gl, gl_sd = stat(s, "ln-dpo", "gold_reward")
        sd, _ = stat(s, "trl-dpo", "len_tokens_sampled")
        sl, _ = stat(s, "ln-dpo", "len_tokens_sampled")
        fd, _ = stat(s, "trl-dpo", "filler_rate_sampled")
        fl, _ = stat(s, "ln-dpo", "filler_rate_sampled")
        gfd, _ = stat(s, "trl-dpo", "filler_rate")
        gfl, _ = stat(s, "ln-dpo", "filler_rate")
        fr, _ = stat(s, "reference", "filler_rate_sampled")
        lr_, _ = stat(s, "reference", "len_tokens")
        shorter = ld - ll > _spread(ld_sd, ll_sd)
        no_loss = gl >= gd - _spread(gd_sd, gl_sd)
        verdict = "reproduced" if shorter and no_loss else ("partly reproduced" if (ll < ld and no_loss) else
                                                           "not reproduced")
        claims.append(Claim(
            "ln-dpo-length", "LN-DPO gives shorter responses than DPO under verbosity bias at no loss of gold reward.",
            verdict,
            f"greedy length (tokens): trl-dpo {ld:.2f} ± {ld_sd:.2f}, ln-dpo {ll:.2f} ± {ll_sd:.2f}; gold reward: "
            f"trl-dpo {gd:.3f} ± {gd_sd:.3f}, ln-dpo {gl:.3f} ± {gl_sd:.3f}; greedy responses with a filler "
            f"phrase {gfd:.3f} vs {gfl:.3f} (reference length {lr_:.2f}). Temperature-1 samples: length "
            f"{sd:.2f} vs {sl:.2f} tokens, filler share {fd:.3f} vs {fl:.3f} (reference {fr:.3f})."))
    else:
        claims.append(Claim("ln-dpo-length", "LN-DPO vs DPO length", "not measured", "arm not run"))

    precisions = [s_.filter["precision"] for s_ in result.seeds]
    recalls = [s_.filter["recall"] for s_ in result.seeds]
    low_prec = [s_.filter["precision_low_tail"] for s_ in result.seeds]
    mean_p = float(np.nanmean(precisions))
    claims.append(Claim(
        "filter-precision", f"At {result.config.label_noise:.0%} label noise the offline beta-guided filter removes "
        "flipped pairs with precision of at least 0.8.", "reproduced" if mean_p >= 0.8 else "not reproduced",
        f"precision {mean_p:.3f} (seeds {_fmt_list(precisions)}), recall {float(np.nanmean(recalls)):.3f} "
        f"(seeds {_fmt_list(recalls)}); the low tail alone (drops below the centre): precision "
        f"{float(np.nanmean(low_prec)):.3f} (seeds {_fmt_list(low_prec)}). Flipped share of the kept pairs "
        f"{float(np.mean([s_.filter['flipped_share_kept'] for s_ in result.seeds])):.3f} vs "
        f"{float(np.mean([s_.filter['flipped_share_before'] for s_ in result.seeds])):.3f} before."))

    if {"trl-dpo", "winnow-curated"} <= arms:
        gc, gc_sd = stat(s, "winnow-curated", "gold_reward")
        gd, gd_sd = stat(s, "trl-dpo", "gold_reward")
        spread = _spread(gc_sd, gd_sd)
        diffs = [a - b for a, b in zip(per_seed_values(per_seed, "winnow-curated", "gold_reward"),
                                       per_seed_values(per_seed, "trl-dpo", "gold_reward"), strict=True)]
        verdict = "reproduced" if gc - gd > spread else "not reproduced"
        claims.append(Claim(
            "curated-beats-dpo", f"Winnow curated beats plain DPO on gold reward at {result.config.label_noise:.0%} "
            "label noise by more than the spread across seeds.", verdict,
            f"gold reward: winnow-curated {gc:.3f} ± {gc_sd:.3f}, trl-dpo {gd:.3f} ± {gd_sd:.3f}; difference "
            f"{gc - gd:+.3f} vs spread {spread:.3f}; per-seed differences {_fmt_list(diffs)}."))
    else:
        claims.append(Claim("curated-beats-dpo", "curated vs DPO", "not measured", "arm not run"))
    if result.config.seeds and len(result.config.seeds) < 2:
        for c in claims:
            if c.verdict != "not measured":
                c.evidence += " (one seed: no spread, the verdict is not meaningful)"
    return claims

