"""Rule filters: drop pairs that cannot teach anything, each with a reason code and a detail.

Why rules before the beta-guided filter: the outlier filter looks at margins only, so pairs
that TRL would truncate into nonsense or whose sides do not differ must go first, with a
reason a user can read ("token_edit_distance 0 < 1 (value)"), not as an anonymous outlier.

Every rule is evaluated on all scored pairs independently (a quantile threshold does not
depend on which rules ran before it); a pair failing several rules gets the reason of the
first in the rule list (:func:`rules_from_config`) and a detail naming every failure. All of it is polars/numpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import polars as pl

from curation.config_fields import setting
from curation.errors import WinnowError
from curation.schema import DecisionReason

ThresholdKind = Literal["value", "quantile", "robust"]
Bound = Literal["min", "max"]
TruncationRule = Literal["off", "uneven", "any"]
LengthPolicy = Literal["truncate", "drop"]
LENGTH_POLICIES: tuple[str, ...] = ("truncate", "drop")

MAD_SCALE = 1.4826  # MAD * 1.4826 estimates the standard deviation of normal data


@dataclass(frozen=True)
class Threshold:
    """Where a rule cuts: a fixed `value`, a `quantile` of the column, or `robust` median +- value*MAD.

    The MAD is scaled by 1.4826, so `robust` with value 3 means "3 standard deviations" for
    normal data while a few wild values cannot move the cut (they would move a mean/std cut).
    """

    kind: ThresholdKind = "value"
    value: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("value", "quantile", "robust"):
            raise WinnowError(f"threshold kind must be value, quantile or robust, got {self.kind!r}")
        if self.kind == "quantile" and not 0.0 <= self.value <= 1.0:
            raise WinnowError(f"a quantile threshold needs a value in [0, 1], got {self.value}")
        if self.kind == "robust" and self.value < 0:
            raise WinnowError(f"a robust threshold needs a value >= 0 (MADs from the median), got {self.value}")

    @classmethod
    def parse(cls, text: str | float) -> Threshold:
        """CLI/recipe spelling: ``5`` (value), ``q0.99`` (quantile), ``robust:3`` or ``3mad`` (median +- 3 MAD)."""
        if isinstance(text, int | float):
            return cls("value", float(text))
        raw = str(text).strip().lower()
        try:
            if raw.startswith("quantile:") or raw.startswith("q"):
                return cls("quantile", float(raw.split(":", 1)[-1].lstrip("q")))
            if raw.startswith("robust:"):
                return cls("robust", float(raw.split(":", 1)[1]))
            if raw.endswith("mad"):
                return cls("robust", float(raw[:-3]))
            return cls("value", float(raw.split(":", 1)[-1]))
        except ValueError:
            raise WinnowError(f"cannot read threshold {text!r}: write 5, q0.99, robust:3 or 3mad") from None

    def describe(self, bound: Bound) -> str:
        if self.kind == "value":
            return "value"
        if self.kind == "quantile":
            return f"quantile {self.value:g}"
        return f"median{'-' if bound == 'min' else '+'}{self.value:g}*MAD"


@dataclass(frozen=True)
class RuleFilterConfig:
    """One threshold rule: drop pairs whose `column` is below (`min`) or above (`max`) the cut.

    `threshold=None` switches the rule off. Null values never fail a rule.
    """

    column: str
    bound: Bound
    threshold: Threshold | None = None

    def __post_init__(self) -> None:
        if self.bound not in ("min", "max"):
            raise WinnowError(f"rule bound must be 'min' or 'max', got {self.bound!r}")


@dataclass(frozen=True)
class RulesConfig:
    """The rule filters and their defaults (see docs/curation.md for why each default).

    - `too_long`: pairs whose prompt alone fills max_length are always dropped (TRL drops them
      anyway, so the shard counts would lie); the cap on prompt + longer completion tokens is
      off by default because max_length already bounds training.
    - `truncation`: `uneven` drops pairs where one completion is cut at max_length and the other
      is not (the summed log-probs then compare a cut answer with a whole one) and pairs cut
      before their first differing token (nothing left to prefer); `any` drops every cut pair.
    - `low_edit_distance`: token edit distance < 1, i.e. the sides tokenise identically: no signal.
      Small but non-zero distances are kept on purpose: they are DPOP's pairs, not noise.
    - `length_ratio`: longer/shorter completion tokens > 8: one side is degenerate.
    - `low_margin`: off; the margin scale depends on its source (ratings, log-probs, a reward
      model), so a fixed cut only makes sense when the user knows it, e.g. Threshold("value", 0).
    - `length_policy`: what happens to pairs whose prompt + longer completion exceed max_length:
      `truncate` (TRL's behaviour: the collator cuts them; the `truncation` rule still drops the
      ones a cut would teach wrong) or `drop` (reason `over_max_length`). The report counts them.
    """

    too_long: RuleFilterConfig = field(default_factory=lambda: RuleFilterConfig("total_tokens", "max", None))
    truncation: TruncationRule = "uneven"
    low_edit_distance: RuleFilterConfig = field(
        default_factory=lambda: RuleFilterConfig("token_edit_distance", "min", Threshold("value", 1.0))
    )
    length_ratio: RuleFilterConfig = field(
        default_factory=lambda: RuleFilterConfig("length_ratio_max", "max", Threshold("value", 8.0))
    )
    low_margin: RuleFilterConfig = field(default_factory=lambda: RuleFilterConfig("margin", "min", None))
    length_policy: LengthPolicy = setting("truncate", help="Pairs longer than max_length (prompt + longer "
                                                           "completion): truncate (TRL's behaviour) or drop "
                                                           "(decision reason over_max_length).")

    def __post_init__(self) -> None:
        if self.truncation not in ("off", "uneven", "any"):
            raise WinnowError(f"truncation rule must be off, uneven or any, got {self.truncation!r}")
        if self.length_policy not in LENGTH_POLICIES:
            raise WinnowError(f"length_policy must be truncate or drop, got {self.length_policy!r}")


@dataclass
class ResolvedRule:
    """A rule with its cut-off computed on the data: what the report draws and the manifest records."""

    reason: str
    column: str | None
    bound: str | None
    threshold: dict[str, Any] | None
    cutoff: float | None
    failing: int  # pairs failing this rule (a pair may fail several)
    dropped: int = 0  # pairs whose recorded reason is this rule

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def with_derived_columns(frame: pl.DataFrame) -> pl.DataFrame:
    """Columns the rules need that scoring does not store directly."""
    chosen, rejected = pl.col("chosen_tokens"), pl.col("rejected_tokens")
    return frame.with_columns(
        total_tokens=pl.col("prompt_tokens") + pl.max_horizontal(chosen, rejected),
        # symmetric: a chosen 10x shorter than the rejected is as degenerate as 10x longer
        length_ratio_max=pl.max_horizontal(chosen, rejected) / pl.max_horizontal(pl.min_horizontal(chosen, rejected), 1),
    )


def robust_centre_scale(values: np.ndarray) -> tuple[float, float]:
    """Median and MAD*1.4826; falls back to the mean absolute deviation when over half the values tie."""
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 0.0
    centre = float(np.median(values))
    deviation = np.abs(values - centre)
    scale = MAD_SCALE * float(np.median(deviation))
    if scale == 0.0:
        scale = 1.2533 * float(deviation.mean())  # mean abs deviation -> sigma for normal data
    return centre, scale


def resolve_threshold(values: np.ndarray, bound: Bound, threshold: Threshold) -> float:
    """The numeric cut-off of `threshold` on `values` (nulls/NaN ignored)."""
    finite = values[np.isfinite(values)]
    if threshold.kind == "value":
        return float(threshold.value)
    if finite.size == 0:
        return float("nan")
    if threshold.kind == "quantile":
        return float(np.quantile(finite, threshold.value))
    centre, scale = robust_centre_scale(finite)
    return centre - threshold.value * scale if bound == "min" else centre + threshold.value * scale


def _fmt(x: float) -> str:
    return f"{x:.4g}"


@dataclass(frozen=True)
class RuleContext:
    """What the rules need besides the scores: the training length budget they protect."""

    max_length: int | None = None
    truncation_mode: str = "keep_start"


@dataclass
class RuleCheck:
    """One rule evaluated on a frame: which pairs fail (None: the rule is off), why, and its cut-off."""

    fails: pl.Expr | None
    detail: pl.Expr | None
    resolved: ResolvedRule


class Rule:
    """A filter step: a reason code and a vectorised check. A new rule is a subclass plus one
    entry in :func:`rules_from_config` (and its :class:`DecisionReason`)."""

    reason: DecisionReason

    def check(self, frame: pl.DataFrame, context: RuleContext) -> RuleCheck:
        raise NotImplementedError


@dataclass(frozen=True)
class ThresholdRule(Rule):
    """Drop pairs whose column is below (`min`) or above (`max`) a resolved threshold."""

    reason: DecisionReason
    config: RuleFilterConfig

    def check(self, frame: pl.DataFrame, context: RuleContext) -> RuleCheck:
        rule, reason = self.config, self.reason.value
        if rule.threshold is None:
            return RuleCheck(None, None, ResolvedRule(reason, rule.column, rule.bound, None, None, 0))
        if rule.column not in frame.columns:
            raise WinnowError(f"rule {reason}: no column {rule.column!r} in the scores; columns: "
                              f"{', '.join(frame.columns)}")
        values = frame[rule.column].cast(pl.Float64).fill_null(float("nan")).to_numpy()
        cutoff = resolve_threshold(values, rule.bound, rule.threshold)
        col = pl.col(rule.column)
        fails = ((col < cutoff) if rule.bound == "min" else (col > cutoff)).fill_null(False)
        op = "<" if rule.bound == "min" else ">"
        detail = pl.format(f"{rule.column} {{}} {op} {_fmt(cutoff)} ({rule.threshold.describe(rule.bound)})",
                           col.cast(pl.Float64).round(4) if frame.schema[rule.column].is_float() else col)
        resolved = ResolvedRule(reason, rule.column, rule.bound,
                                {"kind": rule.threshold.kind, "value": rule.threshold.value}, cutoff, 0)
        return RuleCheck(fails, detail, resolved)


@dataclass(frozen=True)
class TooLongRule(Rule):
    """fits_max_length False (the prompt alone fills max_length) plus the optional token cap."""

    config: RuleFilterConfig
    reason: DecisionReason = DecisionReason.TOO_LONG

    def check(self, frame: pl.DataFrame, context: RuleContext) -> RuleCheck:
        no_room = ~pl.col("fits_max_length").fill_null(True)
        no_room_detail = pl.format(f"prompt of {{}} tokens fills max_length {context.max_length} (TRL drops the pair)",
                                   pl.col("prompt_tokens"))
        cap = ThresholdRule(self.reason, self.config).check(frame, context)
        if cap.fails is None:
            return RuleCheck(no_room, pl.when(no_room).then(no_room_detail), cap.resolved)
        detail = pl.when(no_room).then(no_room_detail).when(cap.fails).then(cap.detail)
        return RuleCheck(no_room | cap.fails, detail, cap.resolved)


@dataclass(frozen=True)
class LengthPolicyRule(Rule):
    """`length_policy: drop`: pairs whose prompt + longer completion exceed max_length leave whole.

    With `truncate` (TRL's behaviour) the rule is off and the collator cuts those pairs; the
    report counts them either way (:func:`length_summary`).
    """

    policy: LengthPolicy
    reason: DecisionReason = DecisionReason.OVER_MAX_LENGTH

    def check(self, frame: pl.DataFrame, context: RuleContext) -> RuleCheck:
        max_length = context.max_length
        resolved = ResolvedRule(self.reason.value, "total_tokens", "max", {"kind": "flag", "value": self.policy},
                                None if max_length is None else float(max_length), 0)
        if self.policy != "drop" or max_length is None:
            return RuleCheck(None, None, resolved)
        fails = (pl.col("total_tokens") > max_length).fill_null(False)
        detail = pl.format(f"prompt {{}} + longer completion {{}} = {{}} tokens > max_length {max_length} "
                           "(length_policy drop)", pl.col("prompt_tokens"),
                           pl.max_horizontal("chosen_tokens", "rejected_tokens"), pl.col("total_tokens"))
        return RuleCheck(fails, detail, resolved)


@dataclass(frozen=True)
class TruncatedRule(Rule):
    """Pairs that truncation at max_length would teach wrong (see :class:`RulesConfig`)."""

    mode: TruncationRule
    reason: DecisionReason = DecisionReason.TRUNCATED

    def check(self, frame: pl.DataFrame, context: RuleContext) -> RuleCheck:
        resolved = ResolvedRule(self.reason.value, None, None, {"kind": "flag", "value": self.mode}, None, 0)
        max_length = context.max_length
        if self.mode == "off" or max_length is None:
            return RuleCheck(None, None, resolved)
        c_cut, r_cut = pl.col("chosen_truncated").fill_null(False), pl.col("rejected_truncated").fill_null(False)
        sizes = pl.format("prompt {} + chosen {} / rejected {} tokens", pl.col("prompt_tokens"),
                          pl.col("chosen_tokens"), pl.col("rejected_tokens"))
        if self.mode == "any":
            fails = c_cut | r_cut
            return RuleCheck(fails, pl.when(fails).then(pl.format(f"truncated at max_length {max_length}: {{}}", sizes)),
                             resolved)
        side = pl.when(c_cut).then(pl.lit("chosen cut, rejected whole")).otherwise(pl.lit("rejected cut, chosen whole"))
        uneven = c_cut != r_cut
        fails = uneven
        detail = pl.when(uneven).then(pl.format(f"uneven truncation at max_length {max_length}: {{}} ({{}})", side, sizes))
        if context.truncation_mode == "keep_start":
            # both sides keep the same completion budget; if it ends before the first differing
            # token, the truncated sides are identical and the pair teaches nothing
            budget = pl.lit(max_length) - pl.col("prompt_tokens")
            blind = c_cut & r_cut & (pl.col("first_diff_token") >= budget)
            fails = fails | blind
            detail = detail.when(blind).then(pl.format(
                f"both sides cut at max_length {max_length} ({{}} completion tokens) before their first difference "
                "at token {}", budget, pl.col("first_diff_token")))
        return RuleCheck(fails, detail, resolved)


@dataclass(frozen=True)
class NoMarginRule(Rule):
    """A pair without a margin cannot be placed by the beta filter or the stages."""

    reason: DecisionReason = DecisionReason.NO_MARGIN

    def check(self, frame: pl.DataFrame, context: RuleContext) -> RuleCheck:
        fails = pl.col("margin").is_null() | pl.col("margin").is_nan()
        detail = pl.format("margin is null (margin source {})", pl.col("margin_source").fill_null("none"))
        return RuleCheck(fails, detail, ResolvedRule(self.reason.value, "margin", None,
                                                     {"kind": "flag", "value": "null"}, None, 0))


def rules_from_config(config: RulesConfig) -> list[Rule]:
    """The rule steps in precedence order: a pair failing several gets the first one's reason."""
    return [
        TooLongRule(config.too_long),
        LengthPolicyRule(config.length_policy),
        TruncatedRule(config.truncation),
        ThresholdRule(DecisionReason.LOW_EDIT_DISTANCE, config.low_edit_distance),
        ThresholdRule(DecisionReason.LENGTH_RATIO, config.length_ratio),
        ThresholdRule(DecisionReason.LOW_MARGIN, config.low_margin),
        NoMarginRule(),
    ]


RULE_ORDER: tuple[str, ...] = tuple(r.reason.value for r in rules_from_config(RulesConfig()))


def apply_rules(frame: pl.DataFrame, config: RulesConfig | list[Rule], max_length: int | None = None,
                truncation_mode: str = "keep_start") -> tuple[pl.DataFrame, list[ResolvedRule]]:
    """Evaluate every rule; returns (pair_id, reason, detail) with null reason for survivors, and the cut-offs.

    `frame` is the scored frame (scores columns plus pair_id); derived columns are added here.
    `config` is the rules' settings, or a ready list of :class:`Rule` steps.
    """
    rules = rules_from_config(config) if isinstance(config, RulesConfig) else list(config)
    context = RuleContext(max_length, truncation_mode)
    frame = with_derived_columns(frame)
    results = [rule.check(frame, context) for rule in rules]
    checks = [(c.resolved.reason, c.fails, c.detail) for c in results if c.fails is not None]
    resolved = [c.resolved for c in results]

    flags = frame.select("pair_id", *(f.alias(f"_fail_{r}") for r, f, _ in checks),
                         *(pl.when(f).then(d).alias(f"_detail_{r}") for r, f, d in checks))
    reason = pl.lit(None, dtype=pl.String)
    for r, _, _ in reversed(checks):  # the first rule of the list wins
        reason = pl.when(pl.col(f"_fail_{r}")).then(pl.lit(r)).otherwise(reason)
    out = flags.select(
        "pair_id",
        reason=reason,
        detail=pl.concat_str([pl.col(f"_detail_{r}") for r, _, _ in checks], separator="; ", ignore_nulls=True),
    ).with_columns(detail=pl.when(pl.col("reason").is_not_null()).then(pl.col("detail")))
    counts = dict(flags.select(pl.col(f"_fail_{r}").sum().alias(r) for r, _, _ in checks).row(0, named=True)) \
        if checks else {}
    dropped = dict(out.group_by("reason").len().drop_nulls().iter_rows())
    for info in resolved:
        info.failing = int(counts.get(info.reason, 0) or 0)
        info.dropped = int(dropped.get(info.reason, 0))
    return out, resolved


def length_summary(frame: pl.DataFrame, max_length: int | None, policy: str = "truncate") -> dict[str, Any]:
    """Token lengths of prompt + completion against max_length: what the report shows before training.

    `frame` has prompt/chosen/rejected token counts (and `kept`, `reason` when decided). Sequences
    are TRL's (prompt + completion, completions with their end-of-turn/eos tokens); `over` counts
    pairs whose longer side exceeds max_length, `over_kept` those of them that training gets
    (truncated by TRL under `truncate`; none under `drop`).
    """
    longer = pl.max_horizontal("chosen_tokens", "rejected_tokens")
    totals = frame.select(total=pl.col("prompt_tokens") + longer).to_series().cast(pl.Float64).drop_nulls()
    out: dict[str, Any] = {"max_length": max_length, "length_policy": policy, "pairs": frame.height}
    if totals.len():
        values = totals.to_numpy()
        out.update({f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}, max=float(values.max()))
    if max_length is None:
        return {**out, "over": 0, "over_share": 0.0}
    over = (pl.col("prompt_tokens") + longer > max_length).fill_null(False)
    counts = frame.select(over=over.sum(), prompt_fills=(pl.col("prompt_tokens") >= max_length).fill_null(False).sum(),
                          **({"over_kept": (over & pl.col("kept")).sum()} if "kept" in frame.columns else {}),
                          **({"dropped_over": (pl.col("reason") == DecisionReason.OVER_MAX_LENGTH.value)
                              .fill_null(False).sum()} if "reason" in frame.columns else {})).row(0, named=True)
    out.update({k: int(v or 0) for k, v in counts.items()})
    out["over_share"] = out["over"] / frame.height if frame.height else 0.0
    return out
