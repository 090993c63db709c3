"""What every benchmark prints about the machine it ran on, so ratios can be compared honestly."""

from __future__ import annotations

import os
import platform
import re
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

__all__ = ["as_conversations", "cpu_model", "describe_machine", "hh_like_pairs", "usable_cores"]


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def usable_cores() -> int:
    """Cores this process may run on (a container's limit, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def describe_machine(packages: Sequence[str], gpu: str = "none", torch_threads: int | None = None) -> str:
    """One line: cores, CPU, RAM, GPU, Python and the versions of the packages that matter."""
    threads = f", {torch_threads} torch threads" if torch_threads is not None else ""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    libs = ", ".join(f"{p} {_version(p)}" for p in packages)
    return (f"{os.cpu_count()} cores ({usable_cores()} usable{threads}), CPU {cpu_model()}, {ram:.0f} GiB RAM, "
            f"GPU {gpu}; python {platform.python_version()}, {libs}")


def hh_like_pairs(n: int, seed: int, vocabulary: int = 400, scale: float = 1.0) -> dict[str, list[str]]:
    """Preference pairs with an Anthropic-HH-like length spread, generated (no download).

    Prompts are 1-3 ``Human:``/``Assistant:`` turns; prompt and response lengths are log-normal
    (medians ~70 and ~45 words, long tails), clipped to 3-600 and 2-400 words, so a batch mixes
    a few tokens with several hundred, as HH does. ``vocabulary`` distinct short words keep one
    word near one BPE token once the tokenizer is trained on them. ``scale`` stretches lengths.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    words = sorted({"".join(rng.choice(letters, rng.integers(2, 7))) for _ in range(vocabulary * 2)})[:vocabulary]
    words = np.array(words)
    prompt_len = np.clip(rng.lognormal(np.log(70 * scale), 0.9, n), 3, 600).astype(int)
    chosen_len = np.clip(rng.lognormal(np.log(45 * scale), 0.9, n), 2, 400).astype(int)
    rejected_len = np.clip(rng.lognormal(np.log(45 * scale), 0.9, n), 2, 400).astype(int)
    turns = rng.integers(1, 4, n)

    def text(k: int) -> str:
        return " ".join(words[rng.integers(0, len(words), k)])

    prompts = []
    for k, t in zip(prompt_len.tolist(), turns.tolist(), strict=True):
        t = min(t, max(1, k // 2))  # 2t-1 turns (Human first and last), each at least a word
        cuts = np.sort(rng.choice(np.arange(1, k), 2 * t - 2, replace=False)) if t > 1 else np.array([], int)
        parts = np.diff(np.concatenate([[0], cuts, [k]])).tolist()
        prompt = "".join(f"\n\n{'Human' if i % 2 == 0 else 'Assistant'}: {text(max(w, 1))}"
                         for i, w in enumerate(parts))
        prompts.append(prompt + "\n\nAssistant:")
    return {"prompt": prompts, "chosen": [" " + text(k) for k in chosen_len.tolist()],
            "rejected": [" " + text(k) for k in rejected_len.tolist()]}


def as_conversations(
    prompts: list[str], chosens: list[str], rejecteds: list[str]
) -> tuple[list[list[dict]], list[list[dict]], list[list[dict]]]:
    """TRL's conversational layout of the same pairs: HH turns become user/assistant messages."""

    def turns(prompt: str) -> list[dict]:
        parts = re.split(r"\n\n(Human|Assistant): ?", prompt)
        msgs = [{"role": "user" if who == "Human" else "assistant", "content": text.strip()}
                for who, text in zip(parts[1::2], parts[2::2], strict=True) if text.strip()]
        return msgs or [{"role": "user", "content": prompt.strip()}]

    return ([turns(p) for p in prompts], [[{"role": "assistant", "content": c.strip()}] for c in chosens],
            [[{"role": "assistant", "content": r.strip()}] for r in rejecteds])
