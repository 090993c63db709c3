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
    prompts: Sequence[str],
    chosens: Sequence[str],
    rejecteds: Sequence[str],
    *,
    batch_tokens: int = 16384,
    max_length: int | None = None,
    progress: bool = True,
) -> pl.DataFrame:
    """Score prompt+response with a reward model: length-sorted batches, no gradient.

    On CUDA the forward runs in bf16 autocast; on the CPU in float32.
    """
    import torch

    from curation.progress import progress_bar

    texts = [p + c for p, c in zip(prompts, chosens, strict=True)] + [
        p + r for p, r in zip(prompts, rejecteds, strict=True)
    ]
    encoded = tokenizer(texts, truncation=max_length is not None, max_length=max_length)["input_ids"]
    lengths = np.fromiter(map(len, encoded), np.int64, len(encoded))
    order = np.argsort(-lengths, kind="stable")
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad
    rewards = np.zeros(len(texts), dtype=np.float64)
    was_training = model.training
    model.eval()
    start = 0
    with (
        progress_bar("reward model", total=len(texts), unit="seq", enabled=progress) as bar,
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
    n = len(prompts)
    return pl.DataFrame(
        {"reward_chosen": rewards[:n], "reward_rejected": rewards[n:], "margin": rewards[:n] - rewards[n:]}
    )
