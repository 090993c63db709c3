"""The beta-guided outlier filter of beta-DPO (Wu et al. 2024), applied offline to the whole set.

The paper weights each pair of a batch by ``w = exp(-0.5 * ((M - M0) / sigma)^2)``, a
Gaussian around the centre of the reward-margin distribution, and keeps
``floor(N * keep)`` pairs drawn without replacement with probability proportional to ``w``
(``keep`` is the paper's rho, the share KEPT: 0.8; the reference code's ``rho = 0.2`` is the
share dropped, so neither name is used here, and a keep share below 0.5, the sign of a drop
share pasted in, is refused). Offline, Winnow applies the same rule to the margins of every pair that passed the
rule filters: pairs far from the bulk on either side (likely mislabelled below, trivially
easy above) get a low weight and are dropped, with the weight and the tail recorded.

Centring: ``median`` (median and 1.4826*MAD, the default) or ``mean`` (mean and std, the
paper's running statistics). The median is the default because the outliers this filter
hunts inflate a standard deviation and drag a mean towards themselves, which widens the
Gaussian exactly where it should be narrow (docs/curation.md has the numbers).
"""

from __future__ import annotations

import math
from dataclasses import InitVar, dataclass
from typing import Literal

import numpy as np

from curation.errors import WinnowError
from curation.filter import robust_centre_scale

BetaMode = Literal["threshold", "sample"]
Centre = Literal["median", "mean"]
SCALE_EPS = 1e-8  # the paper's sigma guard: a zero spread would make every weight 0/0
MIN_KEEP = 0.5  # a kept share below this is almost surely a drop share pasted into a keep share
RHO_REMOVED = ("the beta filter's `rho` (the share dropped) was removed: set `keep`, the share KEPT (the paper's "
               "rho: 0.8 keeps 80%; keep = 1 - rho)")


@dataclass(frozen=True)
class BetaFilterConfig:
    """`threshold` (default) keeps the `keep` share with the highest weight, deterministically;
    `sample` draws the kept pairs as the paper does, seeded. `keep` is the share KEPT (the paper's rho)."""

    enabled: bool = True
    mode: BetaMode = "threshold"
    keep: float = 0.8
    centre: Centre = "median"
    seed: int = 0
    rho: InitVar[float | None] = None  # removed: refused with RHO_REMOVED rather than silently ignored
    __pydantic_config__ = {"extra": "forbid"}  # noqa: RUF012 - read by pydantic (flows.config): unknown keys fail

    def __post_init__(self, rho: float | None = None) -> None:
        if rho is not None:
            raise WinnowError(RHO_REMOVED)
        if self.mode not in ("threshold", "sample"):
            raise WinnowError(f"beta filter mode must be 'threshold' or 'sample', got {self.mode!r}")
        if self.centre not in ("median", "mean"):
            raise WinnowError(f"beta filter centre must be 'median' or 'mean', got {self.centre!r}")
        if not MIN_KEEP <= self.keep <= 1.0:
            raise WinnowError(f"beta filter keep is the share of the pairs KEPT (the paper's rho: 0.8 keeps 80%) and "
                              f"must be in [{MIN_KEEP}, 1], got {self.keep}; for a drop share d set keep = 1 - d")


@dataclass
class BetaFilterResult:
    """Per-pair arrays (in input order) and the statistics behind them."""

    margins: np.ndarray
    weight: np.ndarray
    keep: np.ndarray  # bool
    centre: float
    scale: float
    k: int  # pairs kept
    mode: str
    weight_cutoff: float | None = None  # threshold mode: the smallest kept weight
    margin_low: float | None = None  # threshold mode: kept margins lie in [margin_low, margin_high]
    margin_high: float | None = None

    @property
    def tail(self) -> np.ndarray:
        """'low'/'high' for dropped pairs (which side of the centre), '' for kept ones."""
        return np.where(self.keep, "", np.where(self.margins < self.centre, "low", "high"))

    def stats(self) -> dict[str, float | int | str | None]:
        return {"mode": self.mode, "centre": self.centre, "scale": self.scale, "kept": self.k,
                "dropped": int(self.keep.size - self.k), "weight_cutoff": self.weight_cutoff,
                "margin_low": self.margin_low, "margin_high": self.margin_high}


def kept_count(n: int, keep: float) -> int:
    """floor(N * keep), as the paper; the epsilon keeps 10 * 0.7 from flooring to 6."""
    return int(math.floor(n * keep + 1e-9))


def centre_scale(margins: np.ndarray, centre: Centre) -> tuple[float, float]:
    if centre == "median":
        c, s = robust_centre_scale(margins)
    else:
        c = float(margins.mean()) if margins.size else 0.0
        s = float(margins.std(ddof=1)) if margins.size > 1 else 0.0  # unbiased, as torch.std in the reference
    return c, max(s, SCALE_EPS)


def log_weights(margins: np.ndarray, centre: float, scale: float) -> np.ndarray:
    """log w = -0.5 z^2; kept in log space so far outliers still rank instead of all underflowing to 0."""
    return -0.5 * ((margins - centre) / scale) ** 2


def sample_keep(log_w: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Draw k of N without replacement with probability proportional to exp(log_w).

    The exponential race: keep the k largest ``log_w - log(E)``, E ~ Exp(1). It has the same
    distribution as drawing one pair at a time proportional to w (``torch.multinomial(w, k,
    replacement=False)``, the reference code), and it stays exact when weights underflow.
    """
    rng = np.random.default_rng(seed)
    keys = log_w - np.log(rng.standard_exponential(log_w.size))
    keep = np.zeros(log_w.size, dtype=bool)
    keep[np.argsort(-keys, kind="stable")[:k]] = True
    return keep


def beta_filter(margins: np.ndarray, config: BetaFilterConfig) -> BetaFilterResult:
    """Weights and the keep mask for `margins` (input order decides ties: pass a stable order)."""
    margins = np.asarray(margins, dtype=np.float64)
    k = kept_count(margins.size, config.keep) if config.enabled else margins.size
    return beta_filter_count(margins, k, config)


def beta_filter_count(margins: np.ndarray, k: int, config: BetaFilterConfig) -> BetaFilterResult:
    """:func:`beta_filter` keeping exactly ``k`` pairs (``config.keep`` unused): online curation
    re-decides a pool of pairs to fill stages of a fixed size, so it knows the count, not a share."""
    margins = np.asarray(margins, dtype=np.float64)
    n = margins.size
    k = min(max(int(k), 0), n)
    centre, scale = centre_scale(margins, config.centre)
    log_w = log_weights(margins, centre, scale)
    weight = np.exp(log_w)
    if not config.enabled or k >= n:
        keep = np.ones(n, dtype=bool)
    elif config.mode == "sample":
        keep = sample_keep(log_w, k, config.seed)
    else:
        keep = np.zeros(n, dtype=bool)
        keep[np.argsort(-log_w, kind="stable")[:k]] = True
    result = BetaFilterResult(margins=margins, weight=weight, keep=keep, centre=centre, scale=scale, k=int(keep.sum()),
                              mode=config.mode if config.enabled else "off")
    if config.enabled and config.mode == "threshold" and keep.any():
        result.weight_cutoff = float(weight[keep].min())
        reach = float(np.abs(margins[keep] - centre).max())
        result.margin_low, result.margin_high = centre - reach, centre + reach
    return result
