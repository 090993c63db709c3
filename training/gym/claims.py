"""The gym's claims, each part's effect, and the defaults they decide: pre-declared rules, never tuned.

Each rule was fixed before any number was seen; :func:`evaluate_claims`, :func:`part_effects`
and :func:`decide_defaults` document them.
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
    noise: float | None = None  # the label-noise level it was evaluated at


# Each part of the curated arm, as (part, with it, without it): the effect is gold(with) - gold(without),
# paired by seed. The ablation arms change exactly one thing against winnow-curated (training/gym/arms.py).
PARTS: tuple[tuple[str, str, str], ...] = (
    ("beta-guided filtering (vs none)", "winnow-curated", "curated-no-filter"),
    ("filtering offline rather than in-batch", "winnow-curated", "curated-in-batch"),
    ("20% dropped in all rather than ~36% (policy joint vs each)", "winnow-curated", "curated-each"),
    ("sDPO stages (vs one stage)", "winnow-curated", "curated-one-stage"),
    ("advised objective (vs plain DPO)", "winnow-curated", "curated-dpo"),
    ("online curation between stages", "winnow-curated", "curated-no-online"),
    ("the whole curated arm (vs TRL's DPO)", "winnow-curated", "trl-dpo"),
)
EFFECT_METRIC = "gold_reward"


@dataclass
class Effect:
    part: str
    with_arm: str
    without_arm: str
    noise: float
    mean: float  # mean over seeds of gold(with) - gold(without)
    std: float  # sample std of those paired differences (NaN for one seed)
    diffs: list[float]
    verdict: str  # helps | hurts | no clear effect | not measured


@dataclass
class Decision:
    setting: str
    default_before: str
    decision: str
    rule: str
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


def evaluate_claims(result: GymResult, noise: float | None = None) -> list[Claim]:
    """The four claims at one label-noise level (default: the primary, 20%), rules fixed before any number:

    1. DPOP: mean low-edit chosen drift of trl-dpo < 0 and of dpop >= 0 (partly: dpop's above
       trl-dpo's by more than the seed spread but still below 0);
    2. LN-DPO: mean greedy length of ln-dpo below trl-dpo's by more than the seed spread, and
       its gold reward not below trl-dpo's by more than the spread;
    3. filter: mean precision of the beta filter's drops against is_flipped >= 0.8;
    4. curated: mean gold reward of winnow-curated above trl-dpo's by more than the seed spread.

    The spread of a comparison is the larger sample std (across seeds) of the two arms.
    """
    level = result.config.primary_noise if noise is None else noise
    if "noise" in result.per_seed.columns:
        result = result.at(level)
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
    mean_p = float(np.nanmean(precisions)) if precisions else math.nan
    no_flips = all(s_.filter.get("flipped", 1) == 0 for s_ in result.seeds)
    claims.append(Claim(
        "filter-precision", f"At {level:.0%} label noise the offline beta-guided filter removes "
        "flipped pairs with precision of at least 0.8.",
        "not measured" if no_flips else "reproduced" if mean_p >= 0.8 else "not reproduced",
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
            "curated-beats-dpo", f"Winnow curated beats plain DPO on gold reward at {level:.0%} "
            "label noise by more than the spread across seeds.", verdict,
            f"gold reward: winnow-curated {gc:.3f} ± {gc_sd:.3f}, trl-dpo {gd:.3f} ± {gd_sd:.3f}; difference "
            f"{gc - gd:+.3f} vs spread {spread:.3f}; per-seed differences {_fmt_list(diffs)}."))
    else:
        claims.append(Claim("curated-beats-dpo", "curated vs DPO", "not measured", "arm not run"))
    if result.config.seeds and len(result.config.seeds) < 2:
        for c in claims:
            if c.verdict != "not measured":
                c.evidence += " (one seed: no spread, the verdict is not meaningful)"
    for c in claims:
        c.noise = level
    return claims


def part_effects(result: GymResult) -> list[Effect]:
    """Each part's effect on gold reward at each noise level, paired by seed (rule fixed in advance):

    effect = mean over seeds of gold(with the part) - gold(without), spread = the sample std of
    those per-seed differences; "helps" when effect > spread, "hurts" when effect < -spread, else
    "no clear effect" (with 3 seeds, |t| > 1.7). One seed: no spread, verdict "one seed".
    """
    out: list[Effect] = []
    arms = {"reference", *result.config.arms}
    for noise in result.config.noise_levels:
        level = result.at(noise) if "noise" in result.per_seed.columns else result
        for part, with_arm, without_arm in PARTS:
            if not {with_arm, without_arm} <= arms:
                out.append(Effect(part, with_arm, without_arm, noise, math.nan, math.nan, [], "not measured"))
                continue
            a = dict(level.per_seed.filter(pl.col("arm") == with_arm).select("seed", EFFECT_METRIC).iter_rows())
            b = dict(level.per_seed.filter(pl.col("arm") == without_arm).select("seed", EFFECT_METRIC).iter_rows())
            diffs = [float(a[k] - b[k]) for k in sorted(a) if k in b and a[k] is not None and b[k] is not None]
            mean = float(np.mean(diffs)) if diffs else math.nan
            std = float(np.std(diffs, ddof=1)) if len(diffs) > 1 else math.nan
            if len(diffs) < 2:
                verdict = "one seed"
            elif mean > std:
                verdict = "helps"
            elif mean < -std:
                verdict = "hurts"
            else:
                verdict = "no clear effect"
            out.append(Effect(part, with_arm, without_arm, noise, mean, std, diffs, verdict))
    return out


def decide_defaults(result: GymResult) -> list[Decision]:
    """The product defaults the ablations decide, each by a rule fixed before the run.

    A default changes only when its part's effect (:func:`part_effects`) says so at the primary
    noise level (20%) and it does not hurt at any other level:

    - online curation (on by default since the first run of this rule, GYM.md): kept on unless its
      part hurts at 20% and helps nowhere;
    - filtering policy: ``each`` when "20% rather than ~36%" hurts at 20% and helps nowhere, else ``joint``;
    - where the 20% is dropped: in-batch (offline filter off by default) when "offline rather than
      in-batch" hurts at 20% and helps nowhere, else offline;
    - sDPO stages, the advised objective, beta-guided filtering at all: kept unless their part hurts
      at 20% and helps nowhere.
    """
    effects = part_effects(result)
    primary = result.config.primary_noise

    def cells(part: str) -> tuple[Effect | None, list[Effect]]:
        mine = [e for e in effects if e.part == part]
        return next((e for e in mine if e.noise == primary), None), mine

    def text(part: str) -> str:
        return "; ".join(f"{e.noise:.0%}: {e.mean:+.3f}" + (f" ± {e.std:.3f}" if math.isfinite(e.std) else "")
                         + f" ({e.verdict})" for e in cells(part)[1])

    def flips(part: str, to: str) -> bool:  # to = the verdict at 20% that moves the default
        main, every = cells(part)
        avoid = "hurts" if to == "helps" else "helps"
        return main is not None and main.verdict == to and not any(e.verdict == avoid for e in every)

    out = []
    part = PARTS[5][0]
    out.append(Decision("train.online_curation", "auto (on)", "false" if flips(part, "hurts") else "auto (on)",
                        "kept on unless removing it beats it at 20% and loses at no level", text(part)))
    part = PARTS[2][0]
    out.append(Decision("curate.advice.filter_policy", "joint", "each" if flips(part, "hurts") else "joint",
                        "each when stacking the filters beats joint at 20% and loses at no level", text(part)))
    part = PARTS[1][0]
    out.append(Decision("where the 20% is dropped", "offline (curate.beta.enabled=true)",
                        "in-batch (curate.beta.enabled=false)" if flips(part, "hurts") else "offline",
                        "in-batch when it beats offline at 20% and loses at no level", text(part)))
    for part, setting, default in ((PARTS[3][0], "curate.stages.k", "2"), (PARTS[4][0], "train.objective", "auto"),
                                   (PARTS[0][0], "beta-guided filtering", "on")):
        out.append(Decision(setting, default, f"change from {default}" if flips(part, "hurts") else default,
                            "kept unless removing the part beats it at 20% and loses at no level", text(part)))
    return out

