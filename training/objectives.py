"""One preference loss with orthogonal knobs for the DPO variants Winnow trains.

Notation (see shared/spec/OBJECTIVES.md): ``r_w = log pi(y_w|x) - log pi_ref(y_w|x)``, ``r_l``
likewise, log-probs summed over completion tokens. Every variant is a transformation of the
quantity ``beta`` multiplies, so they compose in one fixed order:

1. LN-DPO      ``r <- r / |y|`` on each side (TRL ``sigmoid_norm``; lengths clamped to >= 1).
2. MinorDPO    ``r_l <- max(0, r_l)``: stop pushing a rejected response already below the reference.
3. DPOP        penalty ``p = lambda * max(0, -r_w)`` on the (possibly normalised) ``r_w``:
               "inside" (v2, default) ``z = r_w - r_l - p``, loss ``-logsigmoid(beta * z)``;
               "outside" (v1 reading) ``z = r_w - r_l``, loss ``-logsigmoid(beta * z) + p``.
4. beta-DPO    ``beta`` becomes a detached per-batch value and the batch is masked, both computed
               from the RAW gap ``M = r_w - r_l`` on summed log-probs (step 1 of the reference code,
               github.com/junkangwu/beta-DPO): never from ``z``. Whatever steps 1-3 add, M is the
               same number, because they change what the loss optimises, not which pairs are
               outliers or how confident the batch is. Taking M on ``z`` (Winnow's earlier code)
               let DPOP's penalty (lambda 50) dominate M, so the filter dropped the very pairs
               DPOP protects (r_w < 0) and beta_b was biased up; and under LN it made M ~|y| times
               smaller, so with a = 0.6 beta_b barely moved (std 0.8% of beta0 against 47%).

               Under LN the statistic stays on sums (rather than scaling ``beta_alpha``): a = 0.6
               was tuned on summed gaps, and ``beta_b / beta0 = 1 + a * (mean_kept(M) - M0)`` is a
               relative change of beta, which means the same whether beta0 is on the summed or
               the per-token scale. Scaling a instead would need a typical length per batch or
               data set (a new knob) and would make the kept set depend on how the loss is
               parametrised. So ``length_normalize`` changes the loss only: the kept set and
               beta_b / beta0 are identical with and without it (tests/test_objectives.py).

               ``beta_keep`` is the share of each batch KEPT (the paper's rho, 0.8); a drop share
               and a keep share never share a name, and a value below 0.5 is refused (it would
               drop most of every batch: the sign of a drop share pasted into a keep share).

With every knob off this is exactly TRL's ``loss_type="sigmoid"``. The "outside" form follows
OBJECTIVES.md's reading of Smaug v1: the penalty is added to the loss unscaled by beta, so the
same lambda pulls far harder there than inside.

Logged rewards are ``beta_used * r`` after length normalisation but before Minor's clamp (they
describe the policy, not the loss); ``margins`` is chosen minus rejected reward, as in TRL.
"""

from __future__ import annotations

import math
from dataclasses import InitVar, dataclass, fields
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

Reduction = Literal["mean", "sum", "none"]

# Preset -> field overrides. Kept as data so a new variant is one line here.
PRESETS: dict[str, dict[str, Any]] = {
    # Plain DPO at TRL's default beta.
    "dpo": {},
    # Smaug's lambda (the paper finds 5..500 alike). beta stays at DPO's 0.1 so a DPO-vs-DPOP
    # comparison changes one thing only; pass beta=0.3 to reproduce the paper's setting.
    "dpop": {"dpop_lambda": 50.0},
    # Per-token log-ratios are about |y| times smaller than summed ones, so beta must grow by
    # roughly the typical completion length to give the sigmoid the same range: 2.0 matches DPO's
    # 0.1 at ~20 tokens and sits in the range length-normalised objectives (e.g. SimPO) use.
    # Sweep it per data set.
    "ln-dpo": {"length_normalize": True, "beta": 2.0},
    "minor-dpo": {"minor": True},
    # Reference-run defaults of github.com/junkangwu/beta-DPO.
    # beta_keep is the paper's rho (share kept): the reference run's "rho = 0.2" drops 20%.
    "beta-dpo": {"dynamic_beta": True, "beta": 0.1, "beta_alpha": 0.6, "beta_keep": 0.8},
}

# Removed option names -> what replaces them. A name whose meaning flipped is refused with this
# line instead of being accepted: beta_rho was the share DROPPED, the paper's rho is the share kept.
RENAMED: dict[str, str] = {
    "beta_rho": "beta_rho (the share dropped) was removed: pass beta_keep, the share of each batch KEPT "
                "(the paper's rho: 0.8 keeps 80%; beta_keep = 1 - beta_rho)",
}
MIN_KEEP = 0.5  # a kept share below this is almost surely a drop share pasted into a keep share

_SIGMA_EPS = 1e-8  # the running std starts at 0; without a floor the weights are 0/0


@dataclass
class Objective:
    """Composable DPO objective; see the module docstring for the order knobs apply in.

    ``beta`` is the fixed beta, or beta0 when ``dynamic_beta`` is on. beta-DPO keeps running
    statistics of the gap (``M0``, ``sigma``) across calls, so an instance is stateful: save it
    with :meth:`state_dict` next to the optimizer state.
    """

    beta: float = 0.1
    length_normalize: bool = False
    minor: bool = False
    dpop_lambda: float = 0.0
    dpop_placement: Literal["inside", "outside"] = "inside"
    dynamic_beta: bool = False
    beta_alpha: float = 0.6
    beta_keep: float = 0.8
    beta_momentum: float = 0.9
    beta_min: float = 1e-3
    seed: int | None = None
    name: str = "custom"
    beta_rho: InitVar[float | None] = None  # removed (see RENAMED): refused with a line saying what replaces it

    def __post_init__(self, beta_rho: float | None = None) -> None:
        if beta_rho is not None:
            raise ValueError(RENAMED["beta_rho"])
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.dpop_lambda < 0:
            raise ValueError(f"dpop_lambda must be >= 0, got {self.dpop_lambda}")
        if self.dpop_placement not in ("inside", "outside"):
            raise ValueError(f"dpop_placement must be 'inside' or 'outside', got {self.dpop_placement!r}")
        if not MIN_KEEP <= self.beta_keep <= 1.0:
            raise ValueError(f"beta_keep is the share of each batch KEPT (the paper's rho: 0.8 keeps 80%) and must be "
                             f"in [{MIN_KEEP}, 1], got {self.beta_keep}; for a drop share d pass beta_keep = 1 - d")
        if not 0.0 <= self.beta_momentum < 1.0:
            raise ValueError(f"beta_momentum must be in [0, 1), got {self.beta_momentum}")
        # beta-DPO running state: plain attributes, not fields, so dataclasses.asdict(obj) is the
        # configuration alone.
        self.gap_mean: float = 0.0  # M0
        self.gap_std: float = 0.0  # sigma
        self.steps: int = 0
        self._generator: torch.Generator | None = _fresh_generator(self.seed)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> Objective:
        """Build a named preset (defaults and their reasons: ``PRESETS``); ``overrides`` compose
        freely, e.g. ``from_preset("beta-dpo", dpop_lambda=50.0, length_normalize=True)``."""
        if name not in PRESETS:
            raise ValueError(f"unknown objective preset {name!r}; presets: {', '.join(PRESETS)}")
        renamed = [RENAMED[k] for k in sorted(overrides) if k in RENAMED]
        if renamed:
            raise ValueError("; ".join(renamed))
        allowed = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - allowed)
        if unknown:
            raise ValueError(f"unknown Objective option(s) {unknown}; options: {sorted(allowed)}")
        return cls(**{"name": name, **PRESETS[name], **overrides})

    # ------------------------------------------------------------------ loss

    def loss(
        self,
        policy_chosen_logps: Tensor,
        policy_rejected_logps: Tensor,
        ref_chosen_logps: Tensor,
        ref_rejected_logps: Tensor,
        chosen_lengths: Tensor | None = None,
        rejected_lengths: Tensor | None = None,
        reduction: Reduction = "mean",
        *,
        update_stats: bool = True,
    ) -> tuple[Tensor, dict[str, Tensor | float]]:
        """Loss over N pairs (all inputs shape [N]) and detached statistics for logging.

        ``reduction="none"`` returns per-pair losses [N]; under beta-DPO the dropped pairs are 0 and
        ``stats["mask"]`` says which were kept. ``"mean"`` averages over kept pairs only, ``"sum"``
        sums them. Lengths (completion token counts, clamped to >= 1) are needed only for LN.
        ``update_stats=False`` (evaluation) uses the beta-DPO running statistics without moving
        them and draws the mask from a fresh generator, so evaluating never changes training.
        """
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        r_w = policy_chosen_logps - ref_chosen_logps
        r_l = policy_rejected_logps - ref_rejected_logps
        raw_gap = (r_w - r_l).detach()  # beta-DPO's M: summed, before LN, Minor's clamp and DPOP's penalty
        if self.length_normalize:
            if chosen_lengths is None or rejected_lengths is None:
                raise ValueError("length_normalize=True needs chosen_lengths and rejected_lengths")
            r_w = r_w / chosen_lengths.to(r_w.device).clamp(min=1).to(r_w.dtype)
            r_l = r_l / rejected_lengths.to(r_l.device).clamp(min=1).to(r_l.dtype)

        r_l_used = r_l.clamp(min=0) if self.minor else r_l
        z = r_w - r_l_used
        penalty = self.dpop_lambda * torch.relu(-r_w) if self.dpop_lambda > 0 else None
        if penalty is not None and self.dpop_placement == "inside":
            z = z - penalty

        mask = torch.ones_like(z, dtype=torch.bool)
        beta_stats: dict[str, Tensor | float] = {}
        if self.dynamic_beta:
            beta, mask, beta_stats = self._dynamic_beta(raw_gap, update_stats)
        else:
            beta = self.beta

        losses = -F.logsigmoid(beta * z)
        if penalty is not None and self.dpop_placement == "outside":
            losses = losses + penalty
        losses = torch.where(mask, losses, torch.zeros_like(losses))

        kept = int(mask.sum())
        if reduction == "mean":
            out = losses.sum() / max(kept, 1)
        elif reduction == "sum":
            out = losses.sum()
        else:
            out = losses

        chosen_rewards = (beta * r_w).detach()
        rejected_rewards = (beta * r_l).detach()
        stats: dict[str, Tensor | float] = {
            "beta": beta,
            "mask": mask,
            "kept_fraction": kept / max(mask.numel(), 1),
            "chosen_rewards": chosen_rewards,
            "rejected_rewards": rejected_rewards,
            "margins": chosen_rewards - rejected_rewards,
            "gaps": raw_gap,  # M, what beta-DPO's statistics and filter see
            "loss_margins": z.detach(),  # what beta multiplies in the loss (after LN, Minor, DPOP)
            **beta_stats,
        }
        return out, stats

    # ------------------------------------------------------------- beta-DPO

    def _dynamic_beta(self, gaps: Tensor, update_stats: bool) -> tuple[float, Tensor, dict[str, float]]:
        """beta-DPO steps 1-4 on the detached local raw gaps M; returns (beta_b, local mask, stats).

        Statistics, selection and beta_b use the gaps gathered from every process (as the
        reference does); each process then masks its own slice. The book-keeping runs on CPU in
        float64 so masks are reproducible across devices and ranks.
        """
        all_gaps, rank = _gather(gaps)
        m = all_gaps.double().cpu()
        if update_stats:
            mom = self.beta_momentum
            batch_std = m.std().item() if m.numel() > 1 else 0.0  # unbiased, like the reference
            self.gap_mean = mom * self.gap_mean + (1 - mom) * m.mean().item()
            self.gap_std = mom * self.gap_std + (1 - mom) * batch_std
            self.steps += 1
        generator = self._generator if update_stats else _fresh_generator(self.seed)

        n = m.numel()
        # floor(N * keep), the reference's floor(N(1 - rho_drop)), but at least one pair so every step
        # has a loss; +eps because N * keep can land just below an integer in floating point.
        k = max(1, math.floor(n * self.beta_keep + 1e-9))
        sigma = max(self.gap_std, _SIGMA_EPS)
        log_w = -0.5 * ((m - self.gap_mean) / sigma) ** 2
        keep = _sample_without_replacement(log_w, k, generator)
        keep = _broadcast_from_rank0(keep, gaps.device)

        beta_b = self.beta * (1 + self.beta_alpha * (m[keep].mean().item() - self.gap_mean))
        beta_b = max(beta_b, self.beta_min)
        local = keep[rank * gaps.numel() : (rank + 1) * gaps.numel()].to(gaps.device)
        return beta_b, local, {"gap_mean": self.gap_mean, "gap_std": self.gap_std}

    def state_dict(self) -> dict[str, Any]:
        """beta-DPO running statistics and sampler state, so a resumed run draws the same masks."""
        gen = self._generator
        return {
            "gap_mean": self.gap_mean,
            "gap_std": self.gap_std,
            "steps": self.steps,
            "generator": gen.get_state() if gen is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        self.gap_mean = float(state["gap_mean"])
        self.gap_std = float(state["gap_std"])
        self.steps = int(state["steps"])
        if state.get("generator") is not None:
            if self._generator is None:
                self._generator = torch.Generator()
            self._generator.set_state(state["generator"])


def _sample_without_replacement(log_w: Tensor, k: int, generator: torch.Generator | None) -> Tensor:
    """Bool mask of k indices drawn without replacement with probability proportional to exp(log_w).

    Same draw as ``torch.multinomial(w, k, replacement=False)`` (which is the exponential race
    ``topk(w / E)``, E ~ Exp(1)), done in log space: early in training sigma is tiny, the Gaussian
    weights underflow to exact zeros, and multinomial then picks among the zeros arbitrarily.
    Non-finite log-weights (NaN gaps) fall back to uniform.
    """
    log_w = torch.where(torch.isfinite(log_w), log_w, torch.full_like(log_w, -math.inf))
    if not torch.isfinite(log_w).any():
        log_w = torch.zeros_like(log_w)
    noise = torch.empty_like(log_w).exponential_(generator=generator)
    idx = (log_w - noise.log()).topk(k).indices
    mask = torch.zeros_like(log_w, dtype=torch.bool)
    mask[idx] = True
    return mask


def _fresh_generator(seed: int | None) -> torch.Generator | None:
    return torch.Generator().manual_seed(seed) if seed is not None else None


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather(local: Tensor) -> tuple[Tensor, int]:
    """All gaps across processes (equal per-process batch assumed) and this process's rank."""
    if not _distributed():
        return local, 0
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, local.contiguous())
    return torch.cat(parts), dist.get_rank()


def _broadcast_from_rank0(mask: Tensor, device: torch.device) -> Tensor:
    """Rank 0's mask everywhere, so all ranks agree on the kept set and beta_b even unseeded."""
    if not _distributed():
        return mask
    buf = mask.to(device=device, dtype=torch.uint8)
    dist.broadcast(buf, src=0)
    return buf.bool().cpu()
