"""Sampling from a model and scoring exactly the tokens drawn (the KL estimator needs both).

Log-probs come from :mod:`curation.lm.logprobs` (the same numbers TRL's DPO computes), so
pair metrics line up with the training logs; nothing is re-implemented here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from curation.lm.logprobs import score_tokenized
from curation.lm.tokenization import TokenizedPairs, prompt_token_ids, tokenize_pairs

# --------------------------------------------------------------------------------------------------
# Sampling


@dataclass
class Samples:
    """Sampled completions with the exact token ids drawn, so they can be scored without re-tokenising.

    Why keep ids: decoding and re-encoding a sampled completion may give a different token
    sequence (BPE is not injective on ids), and the KL estimator needs log-probs of exactly
    the tokens that were drawn. ``completion_ids`` include the eos token when one was drawn.
    """

    prompts: list[str]
    prompt_ids: list[list[int]]
    completion_ids: list[list[int]]
    finished: np.ndarray  # True where the completion ended with eos
    texts: list[str]

    @property
    def num_tokens(self) -> np.ndarray:
        """Response length in tokens, not counting the eos token."""
        lengths = np.fromiter(
            (len(c) for c in self.completion_ids), dtype=np.int64, count=len(self.completion_ids)
        )
        return lengths - self.finished.astype(np.int64)

    @property
    def num_chars(self) -> np.ndarray:
        return np.fromiter((len(t) for t in self.texts), dtype=np.int64, count=len(self.texts))


def _model_device(model: Any) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _bare_generation_config(model: Any) -> Iterator[None]:
    """Hide the model's own generation defaults (top_p, repetition penalty, ...) during a call.

    Why: transformers fills every setting we leave unset from ``model.generation_config``; a
    checkpoint shipping ``top_p=0.9`` would silently change the distribution we sample from.
    """
    from transformers import GenerationConfig

    old = getattr(model, "generation_config", None)
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = old


def _special_ids(tokenizer: Any) -> tuple[int, int]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos token; generation could never stop")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return int(eos), int(pad)


def sample_tokens(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str] | Sequence[list[dict]],
    max_new_tokens: int = 24,
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
    tools: Sequence[object] | None = None,
) -> Samples:
    """Batched generation with left padding; completions stop at eos.

    Prompts are strings, or conversations (message lists, ``tools`` per prompt) rendered by the
    chat template with the generation prompt, as TRL builds a prompt's tokens.

    Sampling (``greedy=False``) draws from softmax(logits / temperature) with no top-k/top-p
    truncation. Deterministic for a given seed and batch size: the torch RNG is forked, seeded
    once, and prompts are batched in a fixed order (sorted by length, so padding stays small).
    The caller's global RNG state is left untouched.
    """
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be positive when sampling, got {temperature}")
    prompts = list(prompts)
    eos_id, pad_id = _special_ids(tokenizer)
    prompt_ids: list[list[int]] = prompt_token_ids(tokenizer, prompts, tools) if prompts else []
    for i, ids in enumerate(prompt_ids):
        if not ids:
            raise ValueError(f"prompt {i} tokenises to nothing; there is no context to generate from")

    settings: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "eos_token_id": eos_id,
        "pad_token_id": pad_id,
        "do_sample": not greedy,
    }
    if not greedy:  # only sampling reads these; greedy would warn about them
        settings.update(temperature=float(temperature), top_k=0, top_p=1.0)
    gen_config = GenerationConfig(**settings)

    device = _model_device(model)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompt_ids[i]), i))
    completions: list[list[int]] = [[] for _ in prompts]
    finished = np.zeros(len(prompts), dtype=bool)
    was_training = model.training
    model.eval()
    devices = [device] if device.type == "cuda" else []
    bar = tqdm(total=len(prompts), desc="sampling", unit="prompt", disable=not progress, leave=False)
    try:
        with torch.random.fork_rng(devices=devices), torch.inference_mode(), _bare_generation_config(model):
            torch.manual_seed(seed)
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(prompt_ids[i]) for i in idx)
                input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):
                    ids = prompt_ids[i]
                    input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
                    mask[row, width - len(ids) :] = 1
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=mask.to(device),
                    generation_config=gen_config,
                )
                for row, i in enumerate(idx):
                    new = out[row, width:].tolist()
                    if eos_id in new:
                        new = new[: new.index(eos_id) + 1]
                        finished[i] = True
                    completions[i] = new
                bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    texts = [
        tokenizer.decode(c[:-1] if done else c, skip_special_tokens=True)
        for c, done in zip(completions, finished.tolist(), strict=True)
    ]
    return Samples(prompts, prompt_ids, completions, finished, texts)


def sample_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 24,
    *,
    greedy: bool = True,
    temperature: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = False,
) -> list[str]:
    """Decoded completions (no prompt, no special tokens) of :func:`sample_tokens`."""
    return sample_tokens(
        model,
        tokenizer,
        prompts,
        max_new_tokens,
        greedy=greedy,
        temperature=temperature,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
    ).texts


# --------------------------------------------------------------------------------------------------
# Log-probs (the forward lives in curation.lm.logprobs; nothing is re-implemented here)


def _single_sequence(tp: TokenizedPairs) -> TokenizedPairs:
    """A pairs view whose second side is empty: the scorer then runs each sequence once.

    Why: ``score_tokenized`` lays a pair out as prompt + first + second; an empty second
    completion adds no tokens, so scoring one response per prompt costs one sequence, not two.
    """
    return TokenizedPairs(
        tp.prompt_ids,
        tp.chosen_ids,
        [[] for _ in tp.prompt_ids],
        max_length=tp.max_length,
        truncation_mode=tp.truncation_mode,
    )


def _pad_id(tokenizer: Any) -> int:
    return _special_ids(tokenizer)[1]


def token_logps(
    model: Any,
    prompt_ids: Sequence[list[int]],
    completion_ids: Sequence[list[int]],
    *,
    pad_token_id: int | None = None,
    progress: bool = False,
) -> np.ndarray:
    """Summed log-prob of each completion's exact token ids given its prompt's ids, no truncation."""
    tp = TokenizedPairs(list(prompt_ids), list(completion_ids), [[] for _ in prompt_ids])
    frame = score_tokenized(model, tp, progress=progress, pad_token_id=pad_token_id)
    return frame["ref_chosen_logps"].to_numpy().astype(np.float64)


def sequence_logps(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    responses: Sequence[str],
    max_length: int | None = None,
    *,
    truncation_mode: str = "keep_start",
    progress: bool = False,
) -> np.ndarray:
    """Summed log-prob of each response given its prompt, tokenised and truncated as TRL's DPO does.

    The eos token is appended to each response (as TRL does), so a value equals the
    ``ref_chosen_logps`` that :func:`curation.lm.logprobs.reference_logprobs` gives for a
    pair with that response as chosen. NaN where TRL would drop the pair (prompt fills max_length).
    """
    responses = list(responses)
    tp = tokenize_pairs(tokenizer, prompts, responses, responses, max_length, truncation_mode)
    frame = score_tokenized(model, _single_sequence(tp), progress=progress, pad_token_id=_pad_id(tokenizer))
    return frame["ref_chosen_logps"].to_numpy().astype(np.float64)
