"""Tokenisation of preference pairs, shared by reference scoring and training.

Why this exists: the reference log-probs computed during curation are reused by training,
so both must see exactly the tokens TRL's ``DPOTrainer._prepare_dataset`` produces and the
truncation its ``DataCollatorForPreference`` applies:

* plain text (:func:`tokenize_pairs`): EOS appended to each completion, prompt/completion
  split at the common prefix of the tokenised prompt and prompt+completion;
* conversations (:func:`tokenize_conversations`): the tokenizer's chat template with the
  generation prompt for the prompt alone, the whole conversation for prompt+completion,
  ``tools`` passed to the template, no EOS appended (the template ends the turn), and the
  same common-prefix split; implicit prompts split as TRL's ``extract_prompt``.

TRL tokenises one example at a time in ``Dataset.map``; here each list goes through the fast
tokenizer in one batched call (conversations are rendered to text first), which gives the
same ids far faster. :func:`tokenize_preferences` takes either kind.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from curation.errors import WinnowError

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
                f"{name}[{i}] is {kind}; tokenize_pairs takes plain strings only (message lists go through "
                "tokenize_conversations, or tokenize_preferences for either)"
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


def _batch_ids(tokenizer, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
    """Token ids per text, one batched tokenizer call per chunk, same defaults as TRL's ``_tokenize``.

    ``add_special_tokens=False`` is what ``apply_chat_template(..., tokenize=True)`` uses (the
    template writes bos itself). The tokenizer is left exactly as it was (see :func:`_backend_kept`).
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
                    encoding.ids
                    for encoding in backend.encode_batch_fast(chunk, add_special_tokens=add_special_tokens)
                )
            elif add_special_tokens:  # the tokenizer's own defaults, as TRL calls it for plain text
                out.extend(tokenizer(text=chunk)["input_ids"])
            else:
                out.extend(tokenizer(text=chunk, add_special_tokens=False)["input_ids"])
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

    return _split(prompt_ids, pc_ids, pr_ids, max_length, truncation_mode)


def _split(
    prompt_ids: list[list[int]],
    pc_ids: list[list[int]],
    pr_ids: list[list[int]],
    max_length: int | None,
    truncation_mode: str,
) -> TokenizedPairs:
    """TRL's prompt/completion split: the prompt is the common prefix of the three id lists."""
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


# --------------------------------------------------------------------------------------------------
# Conversations: the chat template, as TRL's DPOTrainer applies it

Message = dict[str, Any]
Conversation = list[Message]


class ChatTemplateError(WinnowError):
    """The tokenizer's chat template refused a conversation (TRL would fail on it the same way).

    ``row`` is the index of the first refused conversation in the input lists.
    """

    def __init__(self, message: str, row: int) -> None:
        super().__init__(message)
        self.row = row


def is_conversation(value: object) -> bool:
    """A TRL message list: a list whose first item is a dict with a ``role`` (TRL's ``is_conversational``)."""
    return isinstance(value, list | tuple) and len(value) > 0 and isinstance(value[0], dict) and "role" in value[0]


def extract_prompt_messages(chosen: Conversation, rejected: Conversation) -> tuple[Conversation, Conversation,
                                                                                  Conversation]:
    """(prompt, chosen, rejected) of an implicit-prompt conversation, exactly as TRL's ``extract_prompt``.

    The prompt is the run of leading messages both sides share; when one side is a prefix of the
    other, TRL's loop ends on the last shared index, so that message stays in the completions.
    """
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):  # noqa: B007 - the loop's last index is the split
        if chosen[idx] != rejected[idx]:
            break
    return list(chosen[:idx]), list(chosen[idx:]), list(rejected[idx:])


def _tools_value(tools: object) -> Any:
    """A row's tools as the template gets them: TRL decodes a JSON string, passes a list as it is."""
    return json.loads(tools) if isinstance(tools, str) else tools


def render_conversations(
    tokenizer,  # noqa: ANN001 - any HF tokenizer with a chat template
    conversations: Sequence[Conversation],
    tools: Sequence[object] | None = None,
    *,
    add_generation_prompt: bool = False,
) -> list[str]:
    """Each conversation rendered by the tokenizer's chat template (``tokenize=False``), in input order.

    Conversations sharing one ``tools`` value go through one batched ``apply_chat_template``
    call (the template is compiled once); a conversation the template refuses raises
    :class:`ChatTemplateError` naming its row.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise WinnowError(
            "the tokenizer has no chat template, so conversational pairs cannot be tokenised as TRL "
            "would (set tokenizer.chat_template, or give the pairs as plain text)"
        )
    n = len(conversations)
    if tools is not None and len(tools) != n:
        raise ValueError(f"tools has {len(tools)} rows for {n} conversations")
    groups: dict[object, list[int]] = {}
    if tools is None:
        groups[None] = list(range(n))
    else:  # by the raw value: a JSON string (TRL's tools column), None, or a list of schemas
        for i, raw in enumerate(tools):
            key = raw if raw is None or isinstance(raw, str) else json.dumps(raw, sort_keys=True, default=str)
            groups.setdefault(key, []).append(i)
    decoded = {key: _tools_value(key if key is None or tools is None else tools[rows[0]])
               for key, rows in groups.items()}
    out: list[str] = [""] * n
    for key, rows in groups.items():
        batch = [list(conversations[i]) for i in rows]
        try:
            texts = tokenizer.apply_chat_template(
                batch, tools=decoded[key], tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception:  # noqa: BLE001 - a template raises anything (jinja's raise_exception, KeyError)
            _raise_refused(tokenizer, batch, rows, decoded[key], add_generation_prompt)
            raise
        for i, text in zip(rows, texts, strict=True):
            out[i] = text
    return out


def _raise_refused(tokenizer, batch: list[Conversation], rows: list[int], tools: Any,  # noqa: ANN001
                   add_generation_prompt: bool) -> None:
    """Find the first conversation of a failed batch the template refuses and say which, in one line."""
    for row, conversation in zip(rows, batch, strict=True):
        try:
            tokenizer.apply_chat_template(
                conversation, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
            )
        except Exception as exc:  # noqa: BLE001
            roles = ", ".join(str(m.get("role")) for m in conversation)
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ChatTemplateError(
                f"the chat template refuses conversation {row} (roles: {roles}): {reason}", row
            ) from None


def tokenize_conversations(
    tokenizer,  # noqa: ANN001 - any HF tokenizer with a chat template
    prompts: Sequence[Conversation] | None,
    chosens: Sequence[Conversation],
    rejecteds: Sequence[Conversation],
    tools: Sequence[object] | None = None,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
) -> TokenizedPairs:
    """Tokenise conversational pairs exactly as TRL 1.16's ``DPOTrainer._prepare_dataset`` does, batched.

    TRL, per example: ``apply_chat_template(prompt, add_generation_prompt=True, tools=tools)``,
    ``apply_chat_template(prompt + chosen, tools=tools)`` and the same for rejected, each
    tokenised without added special tokens (the template writes bos and end-of-turn itself; no
    eos is appended); the prompt is the common prefix of the three id lists. Here every
    conversation is rendered to text first (batched by ``tools``) and all texts of a kind go
    through one batched tokenizer call, which gives the same ids. ``prompts=None`` is TRL's
    implicit prompt (:func:`extract_prompt_messages`); ``tools`` is one value per pair (a list
    of tool schemas, its JSON string, or None), as TRL reads a ``tools`` column.
    """
    _check_truncation(max_length, truncation_mode)
    chosens, rejecteds = list(chosens), list(rejecteds)
    if prompts is None:
        split = [extract_prompt_messages(c, r) for c, r in zip(chosens, rejecteds, strict=True)]
        prompts = [s[0] for s in split]
        chosens = [s[1] for s in split]
        rejecteds = [s[2] for s in split]
    prompts = list(prompts)
    if not len(prompts) == len(chosens) == len(rejecteds):
        raise ValueError(
            f"prompts, chosens and rejecteds differ in length: {len(prompts)}, {len(chosens)}, {len(rejecteds)}"
        )
    for name, values in (("prompts", prompts), ("chosens", chosens), ("rejecteds", rejecteds)):
        for i, value in enumerate(values):
            if not is_conversation(value):
                raise TypeError(f"{name}[{i}] is not a list of {{role, content}} messages")
    prompt_texts = render_conversations(tokenizer, prompts, tools, add_generation_prompt=True)
    chosen_texts = render_conversations(tokenizer, [p + c for p, c in zip(prompts, chosens, strict=True)], tools)
    rejected_texts = render_conversations(
        tokenizer, [p + r for p, r in zip(prompts, rejecteds, strict=True)], tools
    )
    return _split(
        _batch_ids(tokenizer, prompt_texts, add_special_tokens=False),
        _batch_ids(tokenizer, chosen_texts, add_special_tokens=False),
        _batch_ids(tokenizer, rejected_texts, add_special_tokens=False),
        max_length,
        truncation_mode,
    )


def tokenize_preferences(
    tokenizer,  # noqa: ANN001 - any HF tokenizer
    prompts: Sequence[str] | Sequence[Conversation] | None,
    chosens: Sequence[str] | Sequence[Conversation],
    rejecteds: Sequence[str] | Sequence[Conversation],
    tools: Sequence[object] | None = None,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
) -> TokenizedPairs:
    """Either kind of pair as TRL tokenises it: message lists through the chat template, strings as text.

    The kind is decided by the first chosen value, as TRL decides by its first example; one
    call takes one kind. The entry point for anything that scores pairs of unknown kind.
    """
    chosens = list(chosens)
    if chosens and is_conversation(chosens[0]):
        return tokenize_conversations(tokenizer, prompts, chosens, rejecteds, tools, max_length, truncation_mode)
    if prompts is None:
        raise ValueError("plain-text pairs need their prompts (implicit prompts are split at ingest)")
    return tokenize_pairs(tokenizer, prompts, chosens, rejecteds, max_length, truncation_mode)


def prompt_token_ids(
    tokenizer,  # noqa: ANN001 - any HF tokenizer
    prompts: Sequence[str] | Sequence[Conversation],
    tools: Sequence[object] | None = None,
) -> list[list[int]]:
    """Ids of prompts to generate from, as TRL tokenises a prompt: text with the tokenizer's
    defaults, a conversation with its chat template and the generation prompt."""
    prompts = list(prompts)
    if prompts and is_conversation(prompts[0]):
        texts = render_conversations(tokenizer, prompts, tools, add_generation_prompt=True)
        return _batch_ids(tokenizer, texts, add_special_tokens=False)
    return _batch_ids(tokenizer, _as_strings("prompts", prompts))
