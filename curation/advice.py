"""Objective advice: which DPO variant the statistics call for, with the numbers behind it.

Three signals, each tied to the failure mode its paper describes (shared/spec/OBJECTIVES.md):

- many low-edit pairs (sides differ by a few tokens) -> DPOP: DPO can lower the chosen
  likelihood on them (Smaug). A pair is low-edit when its token edit distance is at most
  `low_edit_tokens` (one swap or substitution) or at most `low_edit_norm` of the longer side.
- a systematic chosen-longer bias -> LN-DPO: the summed log-ratio rewards length itself.
- noisy margins -> beta-DPO: label disagreement (negative margins from ratings or a reward
  model) or heavy tails make a fixed beta wrong for part of every batch.

Signals compose: the preset is the strongest mechanism (beta-dpo > ln-dpo > dpop > dpo) and
the others become overrides, e.g. ``beta-dpo`` with ``{"dpop_lambda": 50.0}``; the params
are exactly what ``training.objectives.Objective.from_preset(objective, **params)`` accepts.

Filtering policy (OBJECTIVES.md, "Composing them"): two beta-guided filters can drop pairs, the
offline one (curation, on reward margins, per pair in ``decisions``) and beta-DPO's in-batch one
(training, on implicit-reward gaps). Each alone drops the paper's 20%; both at once drop 36%.
So their joint share is decided here, on purpose, and recorded: ``filter_policy="joint"``
(default) keeps ``filter_keep`` (the paper's rho, 0.8) of the pairs with both filters together;
the offline filter's share counts first and beta-DPO's ``beta_keep`` is what is left (1.0 when
the offline filter already dropped 20%: beta still adapts per batch, nothing more is dropped).
``"each"`` lets beta-DPO keep ``filter_keep`` of every batch on top of the offline filter (the
two papers' settings stacked, the product recorded). Online curation between sDPO stages
(training/online.py) re-decides pairs at the offline share and adds no drop of its own.
``evidence["filtering"]`` holds the shares; the gym (benchmarks/GYM.md) chose the default.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
import polars as pl

from curation.config_fields import setting
from curation.errors import WinnowError
from curation.filter import robust_centre_scale

# Margin sources whose sign states agreement with the label; a reference model's or a
# policy's margin can be negative on a correct label simply because the model is weak.
LABEL_MARGIN_SOURCES = ("scores", "reward-model")
FilterPolicy = Literal["joint", "each"]
MIN_KEEP = 0.5  # as beta_keep and the offline filter's keep: below it, a drop share was pasted in


@dataclass(frozen=True)
class AdviceConfig:
    """Thresholds of the three signals (docs/curation.md says why each value)."""

    low_edit_norm: float = 0.1  # Smaug's math pairs average 6.5% normalised edit distance
    low_edit_tokens: int = 2  # one transposition or two substitutions
    low_edit_share: float = 0.25  # share of low-edit pairs that recommends DPOP
    dpop_lambda: float = 50.0  # Smaug: 5..500 behave alike; 50 is the paper's value
    longer_share: float = 0.6  # chosen longer in >= 60% of the pairs whose lengths differ
    min_log_length_ratio: float = 0.1  # and ~10% longer on average (mean log chosen/rejected tokens)
    min_sign_z: float = 3.0  # and the sign test is not chance (z of the binomial)
    ln_beta: float = 2.0  # beta for length-normalised rewards (the ln-dpo preset's value)
    negative_share: float = 0.05  # labels contradicted by their own ratings/reward in >= 5% of pairs
    tail_share: float = 0.05  # or >= 5% of margins beyond 3 robust sigmas (0.27% for a Gaussian)
    tail_z: float = 3.0
    filter_keep: float = setting(0.8, help="Share of the pairs the beta-guided filters keep (the paper's rho, the "
                                           "share KEPT: 0.8 keeps 80%), offline and in-batch together under the "
                                           "joint policy.")
    filter_policy: FilterPolicy = setting("joint", help="joint: the offline and beta-DPO's in-batch filter together "
                                                        "keep filter_keep (the offline share counts first, beta_keep "
                                                        "is the rest); each: beta-DPO keeps filter_keep of every "
                                                        "batch on top of the offline filter.")

    def __post_init__(self) -> None:
        if self.filter_policy not in ("joint", "each"):
            raise WinnowError(f"advice filter_policy must be 'joint' or 'each', got {self.filter_policy!r}")
        if not MIN_KEEP <= self.filter_keep <= 1.0:
            raise WinnowError(f"advice filter_keep is the share of the pairs KEPT (the paper's rho: 0.8 keeps 80%) and "
                              f"must be in [{MIN_KEEP}, 1], got {self.filter_keep}; for a drop share d set 1 - d")


@dataclass
class Advice:
    objective: str
    params: dict[str, Any] = field(default_factory=dict)
    evidence: dict[str, Any] = field(default_factory=dict)
    rationale: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _clean(x: float | None) -> float | None:
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else round(float(x), 6)


def edit_evidence(kept: pl.DataFrame, config: AdviceConfig) -> dict[str, Any]:
    low = (pl.col("token_edit_distance") <= config.low_edit_tokens) | (pl.col("token_edit_norm") <= config.low_edit_norm)
    row = kept.select(
        low_edit_share=low.mean(),
        low_edit_pairs=low.sum(),
        median_token_edit_norm=pl.col("token_edit_norm").median(),
        median_token_edit_distance=pl.col("token_edit_distance").median(),
        median_first_diff_frac=pl.col("first_diff_frac").median(),
    ).row(0, named=True)
    return {k: _clean(v) if isinstance(v, float) else v for k, v in row.items()}


def length_evidence(kept: pl.DataFrame) -> dict[str, Any]:
    c, r = pl.col("chosen_tokens").cast(pl.Float64), pl.col("rejected_tokens").cast(pl.Float64)
    row = kept.select(
        chosen_longer=(c > r).sum(), chosen_shorter=(c < r).sum(), same_length=(c == r).sum(),
        mean_length_gap=pl.col("length_gap").mean(),
        mean_log_length_ratio=(pl.max_horizontal(c, 1).log() - pl.max_horizontal(r, 1).log()).mean(),
        gap_margin_corr=pl.corr(pl.col("length_gap").cast(pl.Float64), pl.col("margin")),
    ).row(0, named=True)
    unequal = row["chosen_longer"] + row["chosen_shorter"]
    share = row["chosen_longer"] / unequal if unequal else 0.5
    z = (row["chosen_longer"] - unequal / 2) / math.sqrt(unequal / 4) if unequal else 0.0
    return {**{k: _clean(v) if isinstance(v, float) else v for k, v in row.items()},
            "chosen_longer_share": _clean(share), "sign_test_z": _clean(z)}


def margin_evidence(margins: np.ndarray, margin_source: str, config: AdviceConfig) -> dict[str, Any]:
    margins = margins[np.isfinite(margins)]
    centre, scale = robust_centre_scale(margins)
    tails = float(np.mean(np.abs(margins - centre) > config.tail_z * scale)) if scale > 0 and margins.size else 0.0
    return {
        "margin_source": margin_source,
        "pairs": int(margins.size),
        "negative_margin_share": _clean(float(np.mean(margins < 0)) if margins.size else 0.0),
        "tail_share": _clean(tails),
        "median_margin": _clean(centre),
        "robust_sigma": _clean(scale),
        "robust_snr": _clean(abs(centre) / scale if scale > 0 else None),
        "label_bearing": margin_source in LABEL_MARGIN_SOURCES,
    }


def advise(entered: pl.DataFrame, kept: pl.DataFrame, margin_source: str,
           config: AdviceConfig | None = None) -> Advice:
    """Advice from the pairs that entered the beta filter (margin noise) and the kept ones (what training sees).

    Margin noise is judged before the outlier filter because it describes the data's labels;
    the offline filter removes the far tails, while beta-DPO keeps adapting inside the bulk.
    """
    config = config or AdviceConfig()
    edits = edit_evidence(kept, config)
    lengths = length_evidence(kept)
    noise = margin_evidence(entered["margin"].cast(pl.Float64).to_numpy(), margin_source, config)
    noise["negative_margin_share_kept"] = _clean(float((kept["margin"] < 0).mean() or 0.0)) if kept.height else None

    low_edit = (edits["low_edit_share"] or 0.0) >= config.low_edit_share
    length_bias = ((lengths["chosen_longer_share"] or 0.0) >= config.longer_share
                   and (lengths["mean_log_length_ratio"] or 0.0) >= config.min_log_length_ratio
                   and (lengths["sign_test_z"] or 0.0) >= config.min_sign_z)
    noisy_labels = noise["label_bearing"] and (noise["negative_margin_share"] or 0.0) >= config.negative_share
    heavy_tails = (noise["tail_share"] or 0.0) >= config.tail_share
    noisy = noisy_labels or heavy_tails

    params: dict[str, Any] = {}
    reasons: list[str] = []
    if noisy:
        objective = "beta-dpo"
        what = (f"{noise['negative_margin_share']:.1%} of the labels are contradicted by their {margin_source} margin"
                if noisy_labels else f"{noise['tail_share']:.1%} of the margins lie beyond {config.tail_z:g} robust sigmas")
        reasons.append(f"noisy margins ({what}) call for beta-DPO's per-batch beta and filtering")
    elif length_bias:
        objective = "ln-dpo"
    elif low_edit:
        objective = "dpop"
    else:
        objective = "dpo"
    if length_bias:
        if objective != "ln-dpo":
            params.update(length_normalize=True, beta=config.ln_beta)
        reasons.append(f"the chosen side is longer in {lengths['chosen_longer_share']:.0%} of the pairs whose lengths "
                       "differ, so rewards are length-normalised (LN-DPO)")
    if low_edit:
        params["dpop_lambda"] = config.dpop_lambda
        reasons.append(f"{edits['low_edit_share']:.0%} of the pairs differ by a few tokens, where DPO can lower the "
                       f"chosen likelihood, so the DPOP penalty is on (lambda {config.dpop_lambda:g})")
    filtering = filtering_evidence(entered.height, kept.height, objective == "beta-dpo", config)
    if filtering["in_batch_keep"] is not None:
        params["beta_keep"] = filtering["in_batch_keep"]
    rationale = ("; ".join(reasons) + ".") if reasons else (
        "No signal fired (few low-edit pairs, no length bias, clean margins): plain DPO.")
    rationale = rationale[0].upper() + rationale[1:] + " " + filtering["summary"]
    evidence = {
        "pairs_kept": kept.height,
        "pairs_entered_beta_filter": entered.height,
        "signals": {"low_edit": low_edit, "length_bias": length_bias, "noisy_margins": noisy},
        "edit_distance": edits,
        "length": lengths,
        "margins": noise,
        "filtering": filtering,
        "thresholds": asdict(config),
    }
    return Advice(objective=objective, params=params, evidence=evidence, rationale=rationale)


def filtering_evidence(entered: int, kept: int, in_batch: bool, config: AdviceConfig) -> dict[str, Any]:
    """The joint filtering policy in numbers: what the offline filter kept, what beta-DPO keeps, the product.

    Shares are of the pairs that reached the offline beta filter (after the rule filters).
    ``in_batch``: the advised objective is beta-DPO, whose in-batch filter exists.
    """
    offline = kept / entered if entered else 1.0
    if not in_batch:
        in_batch_keep = None
    elif config.filter_policy == "each":
        in_batch_keep = config.filter_keep
    else:  # joint: what is left of filter_keep once the offline filter took its share (never below MIN_KEEP)
        in_batch_keep = round(min(1.0, max(MIN_KEEP, config.filter_keep / offline if offline else 1.0)), 4)
    total = offline * (in_batch_keep if in_batch_keep is not None else 1.0)
    where = (f"the offline beta filter kept {offline:.1%} of the pairs it saw (per pair in `decisions`)"
             + (f" and beta-DPO's in-batch filter keeps {in_batch_keep:.1%} of each batch" if in_batch_keep is not None
                else "; the advised objective has no in-batch filter"))
    summary = (f"Filtering policy `{config.filter_policy}` (keep {config.filter_keep:g}): {where}, so about "
               f"{total:.1%} of them reach the loss.")
    return {"policy": config.filter_policy, "filter_keep": config.filter_keep, "offline_kept_share": _clean(offline),
            "in_batch_keep": in_batch_keep, "total_kept_share": _clean(total), "summary": summary}
