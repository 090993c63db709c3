"""Reference log-probabilities of preference pairs, fast, and equal to TRL's precompute pass.

Why: curation needs the reference model's log pi_ref(y|x) for every pair (the reward margin
and the beta-DPO statistics), and training reuses the same numbers instead of running a
reference model. They must therefore be the numbers TRL 1.16's ``DPOTrainer`` computes with
``precompute_ref_log_probs=True`` (same tokens, same truncation, sum over completion tokens),
only cheaper to get. Where the time goes and what this module does about it:

* padding: TRL batches pairs in dataset order and pads chosen and rejected to the longest of
  the batch. Here sequences are sorted by length and packed into buckets under a token budget,
  so padding is a few percent.
* the shared prompt: chosen and rejected share the prompt. Each pair is one row
  ``prompt + chosen + rejected`` whose attention mask hides the chosen tokens from the
  rejected ones, and whose position ids restart the rejected part right after the prompt, so
  every token sees exactly the context it has in TRL's separate sequences, but the prompt runs
  once. (This is the "run the prompt once, reuse its KV cache" idea without any cache plumbing.)
* the LM head: only positions that predict a completion token are projected onto the
  vocabulary, in chunks, as ``logit[target] - logsumexp(logits)``; no (tokens x vocab)
  log-softmax is materialised for the prompt or padding.
* no autograd (``torch.inference_mode``); bf16 autocast on CUDA for fp32 models, fp32 on CPU.

Both kinds of pairs: plain text and conversations (message lists through the model's chat
template, :func:`curation.lm.tokenization.tokenize_conversations`); :func:`reference_logprobs`
takes either. Which fast paths a model allows is :mod:`curation.lm.fast_paths`' business.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import numpy as np
import polars as pl
import torch
from tqdm.auto import tqdm

from curation.lm.fast_paths import _log_off, _longest, _packed_blockers, _shared_blockers, fast_path_blockers
from curation.lm.packed_attention import packed_attention
from curation.lm.tokenization import TokenizedPairs, tokenize_preferences

__all__ = ["COLUMNS", "default_batch_tokens", "fast_path_blockers", "reference_logprobs", "score_tokenized"]

COLUMNS = (
    "ref_chosen_logps",
    "ref_rejected_logps",
    "ref_chosen_logps_mean",
    "ref_rejected_logps_mean",
    "chosen_tokens",
    "rejected_tokens",
)
# Logit elements per LM-head chunk: bounds the fp32 (rows x vocab) tile to 64 MiB on CPU
# (cache-sized), 1 GiB on GPUs (few, large GEMMs)
_LM_HEAD_CHUNK_ELEMS = {"cpu": 1 << 24, "cuda": 1 << 28}


def default_batch_tokens(device: torch.device) -> int:
    """Tokens per forward: large on GPUs (occupancy); on CPU 4096 per thread.

    Measured on 2 shared cores: one thread is fastest at 2-4k tokens (cache-sized GEMMs);
    with more threads, bigger GEMMs amortise each parallel region's fork/join, which costs
    the most when other processes share the cores.
    """
    if device.type == "cuda":
        return 65536
    return 4096 * min(max(torch.get_num_threads(), 1), 8)


def _logit_transform(model) -> tuple[float, float | None]:
    """(scale, softcap) the model applies to its logits, looked up as TRL's fused LM head does."""
    cfg = model.config.get_text_config()
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = getattr(cfg, "logit_scale", None)
    if scale is None:
        scale = getattr(cfg, "output_multiplier", None)
    if scale is None:
        scale = getattr(cfg, "lm_head_multiplier", None)
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        scale = cfg.logits_scaling if cfg.model_type == "hyperclovax" else 1 / cfg.logits_scaling
    return (1.0 if scale is None else float(scale)), softcap


def _completion_logps(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    """log p(target | hidden) per row, fp32, projecting onto the vocabulary chunk by chunk."""
    vocab = weight.shape[0]
    rows = max(64, _LM_HEAD_CHUNK_ELEMS.get(hidden.device.type, 1 << 24) // vocab)
    out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    w = weight.to(hidden.dtype)
    fp32_out = hidden.device.type == "cuda" and hidden.dtype in (torch.bfloat16, torch.float16)
    for start in range(0, hidden.shape[0], rows):
        h = hidden[start : start + rows]
        if fp32_out:  # accumulate the bf16 product in fp32 instead of rounding logits to bf16
            try:
                z = torch.mm(h, w.t(), out_dtype=torch.float32)
            except (TypeError, RuntimeError):
                z = torch.mm(h, w.t()).float()
        else:
            z = torch.mm(h, w.t()).float()
        if bias is not None:
            z += bias.float()
        if scale != 1.0:
            z *= scale
        if softcap is not None:
            z = softcap * torch.tanh(z / softcap)
        t = targets[start : start + rows]
        out[start : start + rows] = z.gather(1, t.unsqueeze(1)).squeeze(1) - torch.logsumexp(z, dim=-1)
    return out


class _Rows:
    """Model rows to run: ``prompt + chosen [+ rejected]`` and their layout, ids built per bucket.

    Per row: ``p`` prompt tokens, then ``lc`` tokens of the first completion (output slot
    ``slot_c``), then ``lr`` tokens of a second completion sharing the prompt (slot
    ``slot_r``; ``lr == 0`` when the row holds one sequence). Slots index the flat result
    array ``2 * pair + side``. Only lengths are held for all rows; token lists are
    assembled bucket by bucket, so memory stays at the tokenised pairs plus one bucket.
    """

    def __init__(self, tp: TokenizedPairs, share_prompt: bool) -> None:
        self.tp = tp
        self.shared = share_prompt
        keep = np.flatnonzero(tp.keep)
        if share_prompt:
            self.pair = keep
            self.side = np.zeros(len(keep), np.int64)
            self.p = tp.prompt_lengths[keep].copy()
            self.lc, self.lr = tp.chosen_lengths[keep].copy(), tp.rejected_lengths[keep].copy()
            self.slot_c, self.slot_r = 2 * keep, 2 * keep + 1
        else:
            self.pair = np.repeat(keep, 2)
            self.side = np.tile(np.array([0, 1], np.int64), len(keep))
            comp = np.stack([tp.chosen_lengths[keep], tp.rejected_lengths[keep]], 1).reshape(-1)
            full = np.repeat(tp.prompt_lengths[keep], 2) + comp
            ml = tp.max_length
            if ml is None:
                self.p = np.repeat(tp.prompt_lengths[keep], 2)
            elif tp.truncation_mode == "keep_start":
                self.p = np.minimum(np.repeat(tp.prompt_lengths[keep], 2), ml)
            else:  # keep_end: what is left of max_length after the kept completion
                self.p = np.minimum(full, ml) - comp
            self.lc, self.lr = comp, np.zeros(len(comp), np.int64)
            self.slot_c, self.slot_r = 2 * self.pair + self.side, np.full(len(comp), -1, np.int64)
        self.length = self.p + self.lc + self.lr
        # Canonical order (length, then content): buckets depend only on the set of pairs, so
        # the numbers do not depend on the input order, and padding within a bucket is minimal.
        ids = (tp.prompt_ids, tp.chosen_ids, tp.rejected_ids)
        self.order = sorted(
            range(len(self.length)),
            key=lambda j: (self.length[j], self.side[j], *(x[self.pair[j]] for x in ids)),
        )

    def ids(self, j: int) -> list[int]:
        """Token ids of row ``j``, truncated as the collator truncates."""
        i = int(self.pair[j])
        tp = self.tp
        if self.shared:
            return tp.prompt_ids[i] + tp.chosen_ids[i][: self.lc[j]] + tp.rejected_ids[i][: self.lr[j]]
        prompt, comp = tp.sequence(i, "chosen" if self.side[j] == 0 else "rejected")
        return prompt + comp

    def buckets(self, batch_tokens: int, packed: bool) -> list[np.ndarray]:
        """Consecutive runs of the sorted rows within ``batch_tokens``.

        Packed: real tokens of the run. Padded: rows times the longest row of the run.
        """
        out, cur, total = [], [], 0
        for j in self.order:
            n = int(self.length[j])
            size = total + n if packed else (len(cur) + 1) * n
            if cur and size > batch_tokens:
                out.append(np.array(cur))
                cur, total = [], 0
            cur.append(j)
            total += n
        if cur:
            out.append(np.array(cur))
        return out


def _segments(count: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows with ``count[j]`` items: (row index, index within the row) of every item, vectorised."""
    row = np.repeat(np.arange(len(count)), count)
    first = np.repeat(np.cumsum(count) - count, count)
    return row, np.arange(int(count.sum())) - first


def _scored(rows: _Rows, idx: np.ndarray, offset: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat (predictor position, target position, output slot) of every scored token of a bucket.

    First completion: token k is predicted by position p-1+k. Second completion: token 0 by
    the last prompt position, token k>0 by split+k-1. A token with no predictor (empty
    prompt, first token) is not scored, as in TRL, whose labels shift by one.
    """
    p, lc, lr = rows.p[idx], rows.lc[idx], rows.lr[idx]
    split = p + lc
    row_c, k_c = _segments(lc)
    row_r, k_r = _segments(lr)
    row = np.concatenate([row_c, row_r])
    pred = np.concatenate([p[row_c] - 1 + k_c, np.where(k_r == 0, p[row_r] - 1, split[row_r] + k_r - 1)])
    tgt = np.concatenate([p[row_c] + k_c, split[row_r] + k_r])
    slot = np.concatenate([rows.slot_c[idx][row_c], rows.slot_r[idx][row_r]])
    ok = pred >= 0
    return offset[row[ok]] + pred[ok], offset[row[ok]] + tgt[ok], slot[ok]


def _padded_inputs(
    rows: _Rows,
    idx: np.ndarray,
    pad_id: int,
    mask4d: bool,
    device: torch.device,
    additive: torch.dtype | None = None,
) -> tuple[dict, np.ndarray]:
    """One bucket as a right-padded batch: a 4D mask for shared-prompt rows, else a 2D one.

    ``additive``: the eager backend adds the mask to the scores, so it gets 0 / dtype-min
    of that dtype instead of booleans.
    """
    b = len(idx)
    t = int(rows.length[idx].max())
    ids = np.full((b, t), pad_id, dtype=np.int64)
    for r, j in enumerate(idx.tolist()):
        ids[r, : rows.length[j]] = rows.ids(j)
    p, lc, lr = (torch.from_numpy(x[idx]).to(device) for x in (rows.p, rows.lc, rows.lr))
    split, end = p + lc, p + lc + lr
    ar = torch.arange(t, device=device)  # masks are built where they are used
    if mask4d:
        # Second completion: positions restart after the prompt; its queries see the prompt and
        # itself, never the first completion
        position_ids = torch.where(ar < split[:, None], ar, ar - lc[:, None])
        causal = ar[None, :] <= ar[:, None]  # [q, k]
        key_ok = ar[None, :] < end[:, None]  # [b, k]
        key_first = (ar[None, :] >= p[:, None]) & (ar[None, :] < split[:, None])  # [b, k]
        query_second = ar[None, :] >= split[:, None]  # [b, q]
        mask = causal[None] & key_ok[:, None, :] & ~(query_second[:, :, None] & key_first[:, None, :])
        mask |= torch.eye(t, dtype=torch.bool, device=device)[None]  # padding queries see themselves: no NaN
        attention_mask = mask[:, None]
        if additive is not None:
            attention_mask = torch.zeros(attention_mask.shape, dtype=additive, device=device).masked_fill_(
                ~attention_mask, torch.finfo(additive).min
            )
    else:
        position_ids = ar.expand(b, t)
        attention_mask = (ar[None, :] < end[:, None]).long()
    inputs = {
        "input_ids": torch.from_numpy(ids),
        "attention_mask": attention_mask,
        "position_ids": position_ids,
    }
    return inputs, np.arange(b) * t


def _packed_inputs(rows: _Rows, idx: np.ndarray, device: torch.device) -> tuple[dict, np.ndarray]:
    """One bucket as a single unpadded sequence; attention runs per row (see :mod:`.packed_attention`)."""
    lengths = rows.length[idx]
    offset = np.cumsum(lengths) - lengths
    ids = np.fromiter(
        (t for j in idx.tolist() for t in rows.ids(j)), dtype=np.int64, count=int(lengths.sum())
    )
    p, lc = rows.p[idx], rows.lc[idx]
    # position within the row; the second completion restarts right after the prompt
    row, k = _segments(lengths)
    pos = np.where(k < (p + lc)[row], k, k - lc[row])
    layout = []
    for start, pi, si, ei in zip(
        offset.tolist(), p.tolist(), (p + lc).tolist(), lengths.tolist(), strict=True
    ):
        second = None
        if ei > si:  # keys: prompt then second completion; all prompt keys visible, causal after
            r = ei - si
            second = torch.ones(r, pi + r, dtype=torch.bool, device=device)
            second[:, pi:] = torch.ones(r, r, dtype=torch.bool, device=device).tril()
        layout.append((start, pi, si, ei, second))
    inputs = {
        "input_ids": torch.from_numpy(ids)[None],
        "position_ids": torch.from_numpy(pos)[None],
        "winnow_rows": layout,
    }
    return inputs, offset


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def score_tokenized(
    model,
    tokenized: TokenizedPairs,
    *,
    batch_tokens: int | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    share_prompt: bool | None = None,
    layout: str | None = None,
    autocast: bool | None = None,
    pad_token_id: int | None = None,
) -> pl.DataFrame:
    """Reference log-probs of already tokenised pairs (the trainer calls this on its own tokens).

    Returns one row per pair in input order with the columns of :data:`COLUMNS`. Sums are
    over the completion tokens the collator keeps (float32 compute, float64 sums);
    means divide by ``chosen_tokens``/``rejected_tokens``, TRL's ``completion_mask.sum()``
    (as its ``sigmoid_norm`` loss does). Pairs TRL drops (prompt fills ``max_length`` under
    ``keep_start``) get nulls.

    ``share_prompt`` (default: on when possible) runs each pair as one row with the prompt
    once; it needs ``keep_start`` truncation (``keep_end`` cuts the prompt differently for
    each side) and plain causal sdpa/eager attention (no sliding window). ``layout``:
    ``"padded"`` (default) pads length-sorted rows (a few percent of padding) and masks, one
    batched attention call per layer; ``"packed"`` concatenates a bucket's rows without any
    padding and runs attention row by row, computing no masked-out scores: as fast single-
    threaded on CPU, but its many small kernels suffer under multi-threaded contention and
    would be launch-bound on a GPU. ``batch_tokens``: tokens per forward (padding included).
    ``device`` moves the model there. ``autocast`` (default: on CUDA for fp32 models) runs
    the model in bf16 autocast; the log-softmax is fp32 either way.
    """
    if device is not None and _model_device(model) != torch.device(device):
        model.to(device)
    dev = _model_device(model)
    batch_tokens = batch_tokens or default_batch_tokens(dev)
    longest = _longest(tokenized)
    blockers = _shared_blockers(model, longest)
    if share_prompt is None:
        share_prompt = tokenized.truncation_mode == "keep_start" and not blockers
        if blockers and len(tokenized):
            _log_off("shared-prompt rows", model, blockers)
    elif share_prompt and (tokenized.truncation_mode != "keep_start" or blockers):
        why = blockers + (["truncation_mode='keep_end'"] if tokenized.truncation_mode != "keep_start" else [])
        raise ValueError(f"share_prompt is not possible here: {', '.join(why)}")
    if layout is None:
        layout = "padded"
    if layout not in ("packed", "padded"):
        raise ValueError(f"layout must be 'packed' or 'padded', got {layout!r}")
    packed_why = _packed_blockers(model, longest)
    if layout == "packed" and packed_why:
        raise ValueError(f"layout='packed' is not possible here: {', '.join(packed_why)}")
    packed = layout == "packed"
    if autocast is None:
        autocast = dev.type == "cuda" and next(model.parameters()).dtype == torch.float32
    if pad_token_id is None:
        pad_token_id = getattr(model.config, "pad_token_id", None)
    pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
    additive = None
    if share_prompt and not packed and model.config.get_text_config()._attn_implementation == "eager":
        additive = torch.bfloat16 if autocast else next(model.parameters()).dtype

    n = len(tokenized)
    sums = torch.zeros(2 * n, dtype=torch.float64)
    rows = _Rows(tokenized, share_prompt)
    backbone = model.base_model
    lm_head = model.get_output_embeddings()
    scale, softcap = _logit_transform(model)
    was_training = model.training
    model.eval()
    bar = tqdm(total=int(tokenized.keep.sum()), desc="reference log-probs", unit="pair", disable=not progress)
    rows_done, per_pair = 0, 1 if share_prompt else 2
    try:
        with (
            torch.inference_mode(),
            torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bool(autocast)),
            packed_attention(model) if packed else nullcontext(),
        ):
            for idx in rows.buckets(batch_tokens, packed):
                if rows.length[idx].max() == 0:  # nothing to run (empty prompt and completions)
                    continue
                if packed:
                    inputs, offset = _packed_inputs(rows, idx, dev)
                else:
                    inputs, offset = _padded_inputs(rows, idx, pad_token_id, share_prompt, dev, additive)
                pred, tgt, slot = _scored(rows, idx, offset)
                ids = inputs["input_ids"]
                targets = ids.view(-1)[torch.from_numpy(tgt)].to(dev)
                inputs = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
                hidden = backbone(**inputs, use_cache=False).last_hidden_state
                hidden = hidden.reshape(-1, hidden.shape[-1])[torch.from_numpy(pred).to(dev)]
                hidden = hidden.to(lm_head.weight.device)
                with torch.autocast(dev.type, enabled=False):  # explicit dtypes: fp32 logits
                    logps = _completion_logps(
                        hidden, targets.to(hidden.device), lm_head.weight, lm_head.bias, scale, softcap
                    )
                sums.index_add_(0, torch.from_numpy(slot), logps.double().cpu())
                rows_done += len(idx)
                bar.update(rows_done // per_pair - bar.n)
    finally:
        bar.close()
        model.train(was_training)
    return _frame(tokenized, sums.numpy())


def _frame(tp: TokenizedPairs, sums: np.ndarray) -> pl.DataFrame:
    keep = np.asarray(tp.keep, bool)
    chosen, rejected = sums[0::2].copy(), sums[1::2].copy()
    nc = tp.chosen_lengths.astype(np.float64)
    nr = tp.rejected_lengths.astype(np.float64)
    chosen[~keep] = np.nan
    rejected[~keep] = np.nan
    tokens_c = pl.Series("chosen_tokens", tp.chosen_lengths, dtype=pl.Int32)
    tokens_r = pl.Series("rejected_tokens", tp.rejected_lengths, dtype=pl.Int32)
    if not keep.all():
        dropped = pl.Series(~keep)
        tokens_c = (
            pl.select(pl.when(dropped).then(None).otherwise(tokens_c)).to_series().alias("chosen_tokens")
        )
        tokens_r = (
            pl.select(pl.when(dropped).then(None).otherwise(tokens_r)).to_series().alias("rejected_tokens")
        )
    return pl.DataFrame(
        [
            pl.Series("ref_chosen_logps", chosen, dtype=pl.Float64, nan_to_null=True),
            pl.Series("ref_rejected_logps", rejected, dtype=pl.Float64, nan_to_null=True),
            pl.Series(
                "ref_chosen_logps_mean", chosen / np.maximum(nc, 1), dtype=pl.Float64, nan_to_null=True
            ),
            pl.Series(
                "ref_rejected_logps_mean", rejected / np.maximum(nr, 1), dtype=pl.Float64, nan_to_null=True
            ),
            tokens_c,
            tokens_r,
        ]
    )


def reference_logprobs(
    model,
    tokenizer,
    prompts: Sequence[str] | Sequence[list[dict]] | None,
    chosens: Sequence[str] | Sequence[list[dict]],
    rejecteds: Sequence[str] | Sequence[list[dict]],
    *,
    tools: Sequence[object] | None = None,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    batch_tokens: int | None = None,
    progress: bool = True,
    device: str | torch.device | None = None,
    share_prompt: bool | None = None,
    layout: str | None = None,
) -> pl.DataFrame:
    """Reference log-probs of pairs, equal to TRL's ``precompute_ref_log_probs`` pass.

    Plain strings or TRL message lists (conversations go through the tokenizer's chat template,
    ``tools`` per pair, ``prompts=None`` for implicit prompts): tokenised as TRL does
    (:func:`curation.lm.tokenization.tokenize_preferences`) and scored with
    :func:`score_tokenized`. Set ``max_length``/``truncation_mode`` to the values training will
    use, or the numbers will not be the ones training needs. Benchmarks call this for both kinds.
    """
    tp = tokenize_preferences(tokenizer, prompts, chosens, rejecteds, tools, max_length, truncation_mode)
    return score_tokenized(
        model,
        tp,
        batch_tokens=batch_tokens,
        progress=progress,
        device=device,
        share_prompt=share_prompt,
        layout=layout,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
    )
