"""Tokenisation of preference pairs, shared by reference scoring and training.

Why this exists: the reference log-probs computed during curation are reused by training,
so both must see exactly the tokens TRL's ``DPOTrainer._prepare_dataset`` produces (EOS
appended to each completion, prompt/completion split at the common prefix of the tokenised
prompt and prompt+completion) and the truncation its ``DataCollatorForPreference`` applies.
TRL tokenises one example at a time in ``Dataset.map``; here each list goes through the fast
tokenizer in one batched call, which gives the same ids far faster.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

TRUNCATION_MODES = ("keep_start", "keep_end")

# Texts per tokenizer call: large enough that the Rust side parallelises, small enough that
# the returned Python lists of one chunk stay modest in memory.
_TOKENIZE_CHUNK = 16384


@dataclass
class TokenizedPairs:
    """Token ids of preference pairs, as TRL's ``_prepare_dataset`` gives them, plus truncation facts.

    ``prompt_ids``/``chosen_ids``/``rejected_ids`` are the untruncated ids (what TRL stores in
    its dataset). The length and flag arrays describe what the collator keeps at ``max_length``:
    ``chosen_lengths`` is the number of completion tokens left in the truncated sequence (TRL's
    ``completion_mask.sum()``), ``chosen_truncated`` says whether completion tokens were cut.
    ``keep`` is False for pairs TRL drops before training (``keep_start`` and a prompt that alone
    fills ``max_length``); those have lengths 0 and are not scored.
    """

    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    keep: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    chosen_lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    rejected_lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    chosen_truncated: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    rejected_truncated: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    prompt_lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    def __post_init__(self) -> None:
        n = len(self.prompt_ids)
        if len(self.chosen_ids) != n or len(self.rejected_ids) != n:
            raise ValueError("prompt_ids, chosen_ids and rejected_ids must have the same length")
        _check_truncation(self.max_length, self.truncation_mode)
        if len(self.keep) != n:  # derive the truncation facts when not given
            self._compute_truncation()

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def _compute_truncation(self) -> None:
        p = np.fromiter((len(x) for x in self.prompt_ids), dtype=np.int64, count=len(self))
        c = np.fromiter((len(x) for x in self.chosen_ids), dtype=np.int64, count=len(self))
        r = np.fromiter((len(x) for x in self.rejected_ids), dtype=np.int64, count=len(self))
        self.prompt_lengths = p
        self.keep, self.chosen_lengths, self.chosen_truncated = _kept_completion(
            p, c, self.max_length, self.truncation_mode
        )
        _, self.rejected_lengths, self.rejected_truncated = _kept_completion(
            p, r, self.max_length, self.truncation_mode
        )

    def sequence(self, i: int, side: str) -> tuple[list[int], list[int]]:
        """(prompt part, completion part) of pair ``i`` after the collator's truncation.

        Why: with ``keep_end`` the prompt is cut differently for chosen and rejected, so the
        kept prompt depends on the side.
        """
        if side not in ("chosen", "rejected"):
            raise ValueError(f"side must be 'chosen' or 'rejected', got {side!r}")
        prompt = self.prompt_ids[i]
        completion = self.chosen_ids[i] if side == "chosen" else self.rejected_ids[i]
        ml = self.max_length
        if ml is None or len(prompt) + len(completion) <= ml:
            return prompt, completion
        if self.truncation_mode == "keep_start":
            return prompt[:ml], completion[: max(0, ml - len(prompt))]
        if len(completion) >= ml:
            return [], completion[len(completion) - ml :]
        return prompt[len(prompt) - (ml - len(completion)) :], completion


def _check_truncation(max_length: int | None, truncation_mode: str) -> None:
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be a positive integer or None, got {max_length}")


def _kept_completion(
    prompt_len: np.ndarray, comp_len: np.ndarray, max_length: int | None, mode: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """keep mask, completion tokens kept, and completion-cut flag, mirroring the collator."""
    if max_length is None:
        return np.ones(len(prompt_len), bool), comp_len.copy(), np.zeros(len(prompt_len), bool)
    if mode == "keep_start":
        keep = prompt_len < max_length
        kept = np.clip(max_length - prompt_len, 0, None)
        kept = np.minimum(comp_len, kept)
        kept[~keep] = 0
    else:  # keep_end: the completion end survives; the prompt goes first
        keep = np.ones(len(prompt_len), bool)
        kept = np.minimum(comp_len, max_length)
    truncated = keep & (kept < comp_len)
    return keep, kept, truncated


def _as_strings(name: str, values: Sequence[object]) -> list[str]:
    out = list(values)
    for i, v in enumerate(out):
        if not isinstance(v, str):
            kind = "a list of chat messages" if isinstance(v, list | tuple) else type(v).__name__
            raise TypeError(
                f"{name}[{i}] is {kind}; tokenize_pairs takes plain strings only (conversational "
                "message lists are not supported yet: render them with the chat template first)"
            )
    return out


def _rust_backend(tokenizer):  # noqa: ANN001, ANN202 - any HF tokenizer; a tokenizers.Tokenizer or None
    """The fast tokenizer's Rust object when calling it directly gives the ids ``tokenizer(text)`` would.

    ``tokenizer(text)`` encodes through the same Rust ``encode_batch`` and then builds an
    attention mask and offsets for every text, about a quarter of its time on long
    responses; scoring needs only the ids. Direct calls are safe when the backend carries no
    truncation or padding of its own (``tokenizer(...)`` resets both per call); its
    special-token splitting is set for the call by :func:`_backend_kept`. Changes nothing.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_batch_fast"):
        return None
    if backend.truncation is not None or backend.padding is not None:
        return None
    return backend


@contextmanager
def _backend_kept(tokenizer) -> Iterator[None]:  # noqa: ANN001 - any HF tokenizer
    """Leave the tokenizer's Rust backend as the caller had it, whatever the block changes.

    Why: ``tokenizer(...)`` itself writes its settings into the backend (special-token
    splitting, and it clears truncation and padding), and the direct path must set the
    splitting the wrapper would use. Neither may leak into the caller's tokenizer.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not hasattr(backend, "encode_special_tokens"):
        yield
        return
    special, truncation, padding = backend.encode_special_tokens, backend.truncation, backend.padding
    try:
        yield
    finally:
        if backend.encode_special_tokens != special:
            backend.encode_special_tokens = special
        if backend.truncation != truncation:
            if truncation is None:
                backend.no_truncation()
            else:
                backend.enable_truncation(**truncation)
        if backend.padding != padding:
            if padding is None:
                backend.no_padding()
            else:
                backend.enable_padding(**padding)


def _batch_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids per text, one batched tokenizer call per chunk, same defaults as TRL's ``_tokenize``.

    The tokenizer is left exactly as it was (see :func:`_backend_kept`).
    """
    out: list[list[int]] = []
    with _backend_kept(tokenizer):
        backend = _rust_backend(tokenizer)
        if backend is not None:
            split_special = bool(getattr(tokenizer, "split_special_tokens", False))
            if backend.encode_special_tokens != split_special:
                backend.encode_special_tokens = split_special  # what tokenizer(...) sets before encoding
        for start in range(0, len(texts), _TOKENIZE_CHUNK):
            chunk = texts[start : start + _TOKENIZE_CHUNK]
            if backend is not None:
                out.extend(
                    encoding.ids for encoding in backend.encode_batch_fast(chunk, add_special_tokens=True)
                )
            else:
                out.extend(tokenizer(text=chunk)["input_ids"])
    return out


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


def tokenize_pairs(
    tokenizer,
    prompts: Sequence[str],
    chosens: Sequence[str],
    rejecteds: Sequence[str],
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
) -> TokenizedPairs:
    """Tokenise string pairs exactly as TRL 1.16's ``DPOTrainer._prepare_dataset`` does, batched.

    Steps, as TRL: append ``tokenizer.eos_token`` to a completion that does not already end
    with it; tokenise prompt, prompt+chosen and prompt+rejected with the tokenizer's defaults
    (special tokens added); the prompt is the common prefix of the three id lists and each
    completion the rest. ``max_length``/``truncation_mode`` only fill the truncation facts;
    the ids themselves are never cut (the collator cuts).
    """
    _check_truncation(max_length, truncation_mode)
    prompts = _as_strings("prompts", prompts)
    chosens = _as_strings("chosens", chosens)
    rejecteds = _as_strings("rejecteds", rejecteds)
    if not len(prompts) == len(chosens) == len(rejecteds):
        raise ValueError(
            f"prompts, chosens and rejecteds differ in length: {len(prompts)}, {len(chosens)}, {len(rejecteds)}"
        )
    eos = tokenizer.eos_token
    if not eos:
        raise ValueError("the tokenizer has no eos_token; TRL appends it to every completion")

    prompt_ids = _batch_ids(tokenizer, prompts)
    pc_ids = _batch_ids(
        tokenizer, [p + (c if c.endswith(eos) else c + eos) for p, c in zip(prompts, chosens, strict=True)]
    )
    pr_ids = _batch_ids(
        tokenizer, [p + (r if r.endswith(eos) else r + eos) for p, r in zip(prompts, rejecteds, strict=True)]
    )

    out_p: list[list[int]] = []
    out_c: list[list[int]] = []
    out_r: list[list[int]] = []
    for p, pc, pr in zip(prompt_ids, pc_ids, pr_ids, strict=True):
        n = len(p)
        if pc[:n] == p and pr[:n] == p:  # the usual case: the prompt is a prefix of both
            k = n
        else:  # tokens merged across the boundary: TRL splits where the ids diverge
            k = min(_common_prefix(p, pc), _common_prefix(p, pr))
            p = p[:k]
        out_p.append(p)
        out_c.append(pc[k:])
        out_r.append(pr[k:])
    return TokenizedPairs(out_p, out_c, out_r, max_length=max_length, truncation_mode=truncation_mode)
