"""Padding-free packed DPO training: TRL's padded batch re-laid as one unpadded row.

Why: TRL's ``DataCollatorForPreference`` pads every sequence of a batch (chosen and rejected,
each with its own copy of the prompt) to the longest one, and TRL's ``padding_free`` is
disabled in its DPO trainer since the refactor (trl#2469). On real data, whose lengths run
from a few tokens to several hundred, most of a padded batch can be padding. Here the padded
batch TRL's collator built is re-laid, on the device, as one row with no padding at all:

* per pair, the chosen sequence, then the rejected sequence **sharing the chosen one's prompt**:
  the rejected part starts with a copy of the last prompt token (so every scored token's
  predictor sits inside its own part and the labels stay a plain shift), its positions continue
  the prompt's, and its queries see the prompt keys and, causally, themselves (never the chosen
  tokens). Every token therefore has exactly the context it has in TRL's separate sequence,
  and the loss and its gradients are the padded ones (the prompt's activations feed both sides,
  as the sum of the two copies' gradients does in TRL). Where the two sequences do not share
  their start (``keep_end`` truncation cuts the prompt per side; ``share_prompt=False``), the
  rejected sequence is a segment of its own.
* attention runs per segment (:mod:`curation.lm.packed_attention`: one SDPA call per part on
  the CPU, one varlen FlashAttention call on CUDA with ``flash-attn``); no masked-out score is
  computed and no padding runs through any layer.
* the log-probs come from TRL's fused LM head on the packed row (labels: completion tokens,
  with every segment's first position masked) and are summed per sequence, so the objective
  sees the same ``chosen_logps``/``rejected_logps`` as on the padded batch.

The batch (which pairs, in which order) is TRL's, untouched: the loss curve is the padded one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from curation.lm.packed_attention import flash_varlen_available, packed_attention, packing_blockers

logger = logging.getLogger(__name__)

PACKING_MODES = ("auto", "on", "off")


@dataclass(frozen=True)
class PackingChoice:
    """Whether a trainer packs, and why (logged once when the trainer is built)."""

    enabled: bool
    reason: str
    varlen: bool = False  # attention as one varlen FlashAttention call (CUDA)


@dataclass
class PackedBatch:
    """One padded preference batch as a single unpadded row (batch dimension 1)."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    labels: torch.Tensor  # [1, T]; -100 where nothing is scored
    sequence: torch.Tensor  # [T]: index of the padded row (0..2B-1) each token comes from
    rows: list[tuple[int, int, int, int, None]]  # the attention layout of packed_sdpa
    sequences: int  # 2B
    padded_tokens: int  # tokens of TRL's padded batch (2B x its width)

    @property
    def tokens(self) -> int:
        return int(self.input_ids.shape[1])


def choose_packing(mode: str, model: Any, longest: int, *, prompt_tuning: bool = False) -> PackingChoice:
    """Resolve ``packing: auto|on|off`` for ``model`` on sequences up to ``longest`` tokens.

    ``auto`` packs where it is exact and measured faster: on the CPU (benchmarks/RESULTS.md,
    B3), and on CUDA only with varlen FlashAttention (per-segment SDPA calls would be
    launch-bound there). ``on`` packs wherever it is exact and raises where it is not.
    """
    if mode not in PACKING_MODES:
        raise ValueError(f"packing must be one of {', '.join(PACKING_MODES)}, got {mode!r}")
    if mode == "off":
        return PackingChoice(False, "packing off (configured)")
    why = packing_blockers(model, longest)
    if prompt_tuning:
        why.append("prompt-learning adapters prepend virtual tokens")
    if not _dispatches_attention(model):
        why.append(f"{type(model).__name__} does not dispatch attention through transformers' AttentionInterface")
    if why:
        if mode == "on":
            raise ValueError(f"packing='on' is not possible for this model: {'; '.join(why)}")
        return PackingChoice(False, f"padded batches: packing is not exact here ({'; '.join(why)})")
    device = next(model.parameters()).device
    varlen = device.type == "cuda" and flash_varlen_available()
    if device.type == "cuda" and not varlen and mode == "auto":
        return PackingChoice(False, "padded batches: on CUDA packing needs flash-attn's varlen kernel (not installed)")
    how = "varlen FlashAttention" if varlen else "per-sequence SDPA"
    return PackingChoice(True, f"packed rows, no padding ({how}; packing={mode})", varlen)


def _dispatches_attention(model: Any) -> bool:
    from transformers import PreTrainedModel

    target = next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
    return target is not None and bool(getattr(target, "_supports_attention_backend", False))


def pack_batch(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    completion_mask: torch.Tensor,
    *,
    share_prompt: bool = True,
) -> PackedBatch:
    """Re-lay TRL's padded ``[chosen; rejected]`` batch (right-padded) as one unpadded row.

    Vectorised on the batch's device; only the per-row layout (a few ints per pair) goes to
    the host, because attention slices by it.
    """
    dev = input_ids.device
    n2, width = input_ids.shape
    b = n2 // 2
    attn = attention_mask.bool()
    comp = completion_mask.bool() & attn
    lengths = attn.sum(1)
    # prompt part of each sequence: the leading real, non-completion tokens
    prompt = (attn & ~comp).long().cumprod(1).sum(1)
    if share_prompt:
        same = (input_ids[:b] == input_ids[b:]) & attn[:b] & attn[b:]
        common = same.long().cumprod(1).sum(1)
        shared = torch.minimum(common, torch.minimum(prompt[:b], prompt[b:]))
        # the rejected part starts at the last shared prompt token (a copy), or at 0 when none is shared
        skip = (shared - 1).clamp(min=0)
    else:
        skip = torch.zeros(b, dtype=torch.long, device=dev)
    starts = torch.cat([torch.zeros(b, dtype=torch.long, device=dev), skip])  # first column taken per sequence
    taken = lengths - torch.minimum(starts, lengths)
    # segment order in the row: chosen i, rejected i, chosen i+1, ...
    order = torch.stack([torch.arange(b, device=dev), torch.arange(b, device=dev) + b], 1).reshape(-1)
    seg_len = taken[order]
    seg_start = starts[order]
    seg_off = seg_len.cumsum(0) - seg_len
    total = int(seg_len.sum())
    seg_of_token = torch.repeat_interleave(torch.arange(n2, device=dev), seg_len, output_size=total)
    within = torch.arange(total, device=dev) - seg_off[seg_of_token]
    column = seg_start[seg_of_token] + within
    row = order[seg_of_token]
    ids = input_ids[row, column]
    labels = ids.masked_fill(~comp[row, column], -100)
    labels[seg_off[seg_len > 0]] = -100  # a segment's first token has no predictor in its own sequence
    host = torch.stack([seg_len.view(b, 2)[:, 0], seg_len.view(b, 2)[:, 1], skip]).tolist()
    rows, start = [], 0
    for first, second, p in zip(*host, strict=True):
        rows.append((start, p, first, first + second, None))
        start += first + second
    return PackedBatch(
        input_ids=ids[None], position_ids=column[None], labels=labels[None], sequence=row, rows=rows,
        sequences=n2, padded_tokens=n2 * width,
    )


def packed_logps(model: Any, batch: PackedBatch, *, varlen: bool = False) -> tuple[torch.Tensor, Any]:
    """Summed completion log-probs of each padded row (``[2B]``, TRL's order), and the model outputs.

    The model runs through its own (wrapped) forward, so DDP, PEFT and TRL's fused LM head work
    as on the padded batch (the model must carry TRL's fused head, as a ``DPOTrainer``'s does).
    The attention switch is taken for the call; a trainer also holds it over the whole step, so
    that a backward that recomputes activations (gradient checkpointing) sees it too.
    """
    kwargs = {"winnow_rows": batch.rows}
    if varlen:
        kwargs["winnow_varlen"] = True
    with packed_attention(model):
        outputs = model(
            input_ids=batch.input_ids, position_ids=batch.position_ids, labels=batch.labels,
            use_cache=False, fused_lm_head=True, **kwargs,
        )
    per_token = outputs.log_probs[0]  # [T-1]: the log-prob of token t+1, 0 where not scored
    sums = per_token.new_zeros(batch.sequences)
    return sums.index_add(0, batch.sequence[1:], per_token), outputs


def completion_lengths(completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) completion tokens, TRL's ``completion_mask.sum()``."""
    return completion_mask.sum(dim=1).chunk(2, dim=0)
