"""Reward-margin providers. Each returns per-pair values plus the name recorded with them.

- ``scores``: the source's own ratings, score_chosen - score_rejected;
- ``reward-model``: an ``AutoModelForSequenceClassification`` scoring prompt+response;
- ``reference``: difference of per-token mean log-probs under the reference model;
- ``policy``: the implicit DPO reward beta*(r_w - r_l) of a trained policy against the reference.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from curation.errors import WinnowError

MARGIN_SOURCES = ("auto", "scores", "reference", "reward-model", "policy")


def scores_margin(frame: pl.DataFrame) -> pl.DataFrame:
    if frame["score_chosen"].null_count() or frame["score_rejected"].null_count():
        raise WinnowError("margin source 'scores' needs score_chosen/score_rejected on every pair; use --margin reference")
    return frame.select(
        reward_chosen=pl.col("score_chosen"),
        reward_rejected=pl.col("score_rejected"),
        margin=pl.col("score_chosen") - pl.col("score_rejected"),
    )


def reference_margin(ref: pl.DataFrame) -> pl.Series:
    """Per-token means, so a long response is not favoured for its length alone."""
    return (ref["ref_chosen_logps_mean"] - ref["ref_rejected_logps_mean"]).alias("margin")


def policy_margin(policy: pl.DataFrame, ref: pl.DataFrame, beta: float) -> pl.DataFrame:
    """beta * ((pi_w - ref_w) - (pi_l - ref_l)) on summed log-probs: DPO's implicit reward gap."""
    chosen = beta * (policy["ref_chosen_logps"] - ref["ref_chosen_logps"])
    rejected = beta * (policy["ref_rejected_logps"] - ref["ref_rejected_logps"])
    return pl.DataFrame({"reward_chosen": chosen, "reward_rejected": rejected, "margin": chosen - rejected})


def reward_model_margin(
    model,  # noqa: ANN001 - transformers sequence-classification model
    tokenizer,  # noqa: ANN001
    prompts: Sequence[str] | Sequence[list[dict]],
    chosens: Sequence[str] | Sequence[list[dict]],
    rejecteds: Sequence[str] | Sequence[list[dict]],
    *,
    batch_tokens: int = 16384,
    max_length: int | None = None,
    progress: bool = True,
) -> pl.DataFrame:
    """Score prompt+response with a reward model (see :func:`reward_scores`); margin = chosen - rejected."""
    prompts = list(prompts)
    rewards = reward_scores(model, tokenizer, prompts + prompts, list(chosens) + list(rejecteds),
                            batch_tokens=batch_tokens, max_length=max_length, progress=progress)
    n = len(prompts)
    return pl.DataFrame(
        {"reward_chosen": rewards[:n], "reward_rejected": rewards[n:], "margin": rewards[:n] - rewards[n:]}
    )


def _reward_inputs(tokenizer, prompts: list, responses: list, max_length: int | None) -> list[list[int]]:  # noqa: ANN001
    """Token ids the reward model reads: its chat template for conversations when it has one, else text."""
    from curation.lm.tokenization import is_conversation, render_conversations

    if not prompts or not is_conversation(prompts[0]):
        texts = [p + r for p, r in zip(prompts, responses, strict=True)]
        return tokenizer(texts, truncation=max_length is not None, max_length=max_length)["input_ids"]
    turns = [list(p) + (list(r) if is_conversation(r) else [{"role": "assistant", "content": r}])
             for p, r in zip(prompts, responses, strict=True)]
    if getattr(tokenizer, "chat_template", None) is None:  # a plain reward model: the turns as text
        texts = ["".join(f"\n\n{m['role'].capitalize()}: {m.get('content') or ''}" for m in t) for t in turns]
        return tokenizer(texts, truncation=max_length is not None, max_length=max_length)["input_ids"]
    texts = render_conversations(tokenizer, turns)
    return tokenizer(texts, add_special_tokens=False, truncation=max_length is not None,
                     max_length=max_length)["input_ids"]


def reward_scores(
    model,  # noqa: ANN001 - transformers sequence-classification model
    tokenizer,  # noqa: ANN001
    prompts: Sequence[str] | Sequence[list[dict]],
    responses: Sequence[str] | Sequence[list[dict]],
    *,
    batch_tokens: int = 16384,
    max_length: int | None = None,
    progress: bool = True,
) -> np.ndarray:
    """A reward model's score (logit 0) of each prompt+response: length-sorted batches, no gradient.

    Plain text is read as prompt + response. Conversations (message lists; a response may be a
    string, read as one assistant turn) go through the reward tokenizer's chat template when it
    has one, as reward models trained on chats expect. On CUDA the forward runs in bf16
    autocast; on the CPU in float32. Used for the ``reward-model`` margin and by evaluation's judge.
    """
    import torch

    from curation.progress import progress_bar

    encoded = _reward_inputs(tokenizer, list(prompts), list(responses), max_length)
    lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
    order = np.argsort(-lengths, kind="stable")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad
    rewards = np.zeros(len(encoded), dtype=np.float64)
    was_training = model.training
    model.eval()
    start = 0
    with (
        progress_bar("reward model", total=len(encoded), unit="seq", enabled=progress) as bar,
        torch.inference_mode(),
        torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"),
    ):
        while start < len(order):
            width = int(lengths[order[start]])
            size = max(1, batch_tokens // max(width, 1))
            idx = order[start : start + size]
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                seq = encoded[i]
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            rewards[idx] = logits[:, 0].float().cpu().numpy()
            bar.update(len(idx))
            start += len(idx)
    model.train(was_training)
    return rewards
