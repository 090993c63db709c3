"""A controlled preference task with a known gold reward: sorting short lists of numbers.

Why this task: the gold reward is exact and cheap (share of numbers in the right place),
a one-swap mistake gives a pair whose sides differ by a few tokens (DPOP's regime), and
filler words give a length bias that carries no quality (LN-DPO's regime). A tiny model
learns it on a CPU in seconds, so every claim about curation can be checked against truth.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

import numpy as np
import polars as pl

PROMPT_PREFIX = "Sort ascending:"
ANSWER_MARKER = "\nAnswer:"
FILLERS: tuple[str, ...] = (
    " Sure, here is the sorted list:",
    " Of course! In ascending order:",
    " Happy to help, the numbers in order are:",
    " Let me sort that for you. Result:",
)
_NUMBER = re.compile(r"-?\d+")


def make_prompt(numbers: list[int]) -> str:
    return f"{PROMPT_PREFIX} {' '.join(map(str, numbers))}{ANSWER_MARKER}"


def render_response(numbers: list[int], filler: str = "") -> str:
    return f"{filler} {' '.join(map(str, numbers))}"


def prompt_numbers(prompt: str) -> list[int]:
    body = prompt.split(PROMPT_PREFIX, 1)[-1].split(ANSWER_MARKER, 1)[0]
    return [int(x) for x in _NUMBER.findall(body)]


def response_numbers(response: str) -> list[int]:
    return [int(x) for x in _NUMBER.findall(response)]


def gold_reward(prompt: str, response: str) -> float:
    """Share of positions holding the right number; extra or missing numbers count as wrong.

    Dividing by the longer of the two lists means padding an answer with numbers never pays.
    """
    target = sorted(prompt_numbers(prompt))
    got = response_numbers(response)
    denominator = max(len(target), len(got))
    if denominator == 0:
        return 0.0
    hits = sum(1 for a, b in zip(target, got, strict=False) if a == b)
    return hits / denominator


def gold_rewards(prompts: list[str], responses: list[str]) -> np.ndarray:
    return np.array([gold_reward(p, r) for p, r in zip(prompts, responses, strict=True)], dtype=np.float64)


@dataclass(frozen=True)
class PreferenceSetConfig:
    """Knobs of a synthetic preference set; every pathology the papers care about has one."""

    size: int = 3000
    seed: int = 0
    list_length: tuple[int, int] = (3, 6)
    max_value: int = 49
    label_noise: float = 0.15  # share of pairs whose labels are flipped
    verbosity_bias: float = 0.3  # share of pairs whose chosen side gets filler words regardless of quality
    filler_rate: float = 0.1  # filler on either side independently of the bias
    low_edit_share: float = 0.3  # share of pairs whose sides differ by one swap of two numbers
    margin_spread: float = 1.0  # mean extra errors of the worse side beyond one
    rating_noise: float = 0.15  # std of the per-response rating noise around the gold reward
    with_scores: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Candidate:
    numbers: list[int]
    filler: str = ""
    text: str = field(init=False)

    def __post_init__(self) -> None:
        self.text = render_response(self.numbers, self.filler)


def _corrupt(target: list[int], errors: int, rng: np.random.Generator) -> list[int]:
    """Apply `errors` random mistakes (swap, replace, drop) to a sorted list."""
    out = list(target)
    for _ in range(errors):
        kind = rng.choice(3, p=[0.6, 0.3, 0.1]) if len(out) > 2 else 0
        if kind == 0 and len(out) >= 2:
            i, j = rng.choice(len(out), size=2, replace=False)
            out[i], out[j] = out[j], out[i]
        elif kind == 1:
            out[rng.integers(len(out))] = int(rng.integers(0, 50))
        else:
            out.pop(int(rng.integers(len(out))))
    return out


def sample_prompts(n: int, seed: int, list_length: tuple[int, int] = (3, 6), max_value: int = 49) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(list_length[0], list_length[1] + 1, size=n)
    return [rng.choice(max_value + 1, size=int(k), replace=False).tolist() for k in lengths]


def generate_preferences(config: PreferenceSetConfig) -> pl.DataFrame:
    """Generate pairs in the explicit-prompt layout plus hidden truth columns.

    Truth columns (prefixed ``gold_``/``is_``) let the gym score curation decisions; the
    demo writer drops them so the bundled file looks like real data.
    """
    rng = np.random.default_rng(config.seed)
    rows: list[dict] = []
    for numbers in sample_prompts(config.size, config.seed + 1, config.list_length, config.max_value):
        prompt = make_prompt(numbers)
        target = sorted(numbers)
        good_errors = int(rng.choice([0, 0, 0, 1]))
        good = _corrupt(target, good_errors, rng)
        low_edit = rng.random() < config.low_edit_share
        if low_edit:
            bad = list(good)
            i = int(rng.integers(len(bad) - 1))
            bad[i], bad[i + 1] = bad[i + 1], bad[i]
        else:
            extra = 1 + int(rng.poisson(config.margin_spread))
            bad = _corrupt(good, extra, rng)
        g_good, g_bad = gold_reward(prompt, render_response(good)), gold_reward(prompt, render_response(bad))
        if g_good == g_bad:
            bad = _corrupt(good, 2, rng)
            g_bad = gold_reward(prompt, render_response(bad))
            if g_good <= g_bad:
                continue
        elif g_good < g_bad:
            good, bad, g_good, g_bad = bad, good, g_bad, g_good
        verbose = rng.random() < config.verbosity_bias
        chosen_filler = str(rng.choice(FILLERS)) if verbose or rng.random() < config.filler_rate else ""
        rejected_filler = str(rng.choice(FILLERS)) if (not verbose and rng.random() < config.filler_rate) else ""
        chosen, rejected = _Candidate(good, chosen_filler), _Candidate(bad, rejected_filler)
        flipped = rng.random() < config.label_noise
        if flipped:
            chosen, rejected = rejected, chosen
            g_chosen, g_rejected = g_bad, g_good
        else:
            g_chosen, g_rejected = g_good, g_bad
        row = {
            "prompt": prompt,
            "chosen": chosen.text,
            "rejected": rejected.text,
            "gold_chosen": g_chosen,
            "gold_rejected": g_rejected,
            "is_flipped": flipped,
            "is_low_edit": low_edit,
            "is_verbose_chosen": bool(chosen.filler) and not rejected.filler,
        }
        if config.with_scores:
            noise = rng.normal(0.0, config.rating_noise, size=2)
            row["score_chosen"] = round(float(np.clip(g_chosen + noise[0], 0, 1)) * 10, 2)
            row["score_rejected"] = round(float(np.clip(g_rejected + noise[1], 0, 1)) * 10, 2)
        rows.append(row)
    return pl.DataFrame(rows)


TRUTH_COLUMNS = ("gold_chosen", "gold_rejected", "is_flipped", "is_low_edit", "is_verbose_chosen")
