"""Attention for the packed layout of :func:`curation.lm.logprobs.score_tokenized`, scoped to one call.

The packed layout concatenates a bucket's rows into one unpadded sequence; attention must then
run row by row (a ``prompt + first [+ second]`` row: the first part causal, the second part's
queries seeing the prompt and, causally, themselves). transformers dispatches attention by the
name in the model's config through its global ``ALL_ATTENTION_FUNCTIONS``, so the function has
to be known there under a name while the model runs. :func:`packed_attention` makes both
changes only for the duration of the block: the name is added to the registry on the first
entry (counted, so concurrent scorers share it) and removed on the last exit, and the model is
switched with transformers' public ``set_attn_implementation`` and switched back to exactly the
implementation each of its configs had. (A model switched so serves one call at a time: two
threads scoring the same model object in the packed layout would switch it under each other.)

Training uses the same layout with autograd (:mod:`training.packing`): every op here is
differentiable, dropout is applied as the model asks, and on CUDA with ``flash-attn``
installed the rows run as one varlen FlashAttention call (``winnow_varlen=True``) instead of
two small SDPA calls per row. :func:`packing_blockers` says which models cannot be packed
exactly (their attention is more than causal softmax over each sequence).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from curation.lm.fast_paths import sliding_window_shorter_than

# No "sdpa" (or "flash", "flex") in the name: transformers would run its SDPA checks on it
NAME = "winnow_packed_rows"

_lock = threading.Lock()
_users = 0


def packed_sdpa(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    winnow_rows: list | None = None,
    winnow_varlen: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA per row of a packed sequence: no padding, no masked-out square computed.

    Each row is ``prompt + first [+ second]``: the first part runs causal; the second part's
    queries attend to the prompt keys and causally to themselves, as in its own sequence.
    ``winnow_rows``: per row ``(start, prompt length, split, end, second-part mask or None)``;
    a second part exists when ``end > split``, and without a mask it is lower-right causal
    (query ``i`` of the second part sees the ``p`` prompt keys and second-part keys ``<= i``).
    ``winnow_varlen``: run all rows as one varlen FlashAttention call (CUDA, flash-attn).
    """
    if winnow_rows is None:
        raise RuntimeError("winnow packed attention called without its row layout")
    dropout = dropout if module.training else 0.0
    if winnow_varlen:
        return _varlen_flash(query, key, value, winnow_rows, scaling, dropout), None
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        key = key.repeat_interleave(n_rep, dim=1)
        value = value.repeat_interleave(n_rep, dim=1)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    out = torch.empty_like(query)
    for start, p, split, end, second in winnow_rows:
        a, b = start, start + split
        if split > 0:
            out[:, :, a:b] = sdpa(
                query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling, dropout_p=dropout
            )
        if end > split:
            c = start + end
            if p == 0:  # no prompt keys: a sequence of its own
                out[:, :, b:c] = sdpa(
                    query[:, :, b:c], key[:, :, b:c], value[:, :, b:c], is_causal=True, scale=scaling,
                    dropout_p=dropout,
                )
                continue
            if second is None:
                r = end - split
                second = torch.ones(r, p + r, dtype=torch.bool, device=query.device).tril(p)
            k2 = torch.cat([key[:, :, a : a + p], key[:, :, b:c]], dim=2)
            v2 = torch.cat([value[:, :, a : a + p], value[:, :, b:c]], dim=2)
            out[:, :, b:c] = sdpa(query[:, :, b:c], k2, v2, attn_mask=second, scale=scaling, dropout_p=dropout)
    return out.transpose(1, 2).contiguous(), None


def flash_varlen_available() -> bool:
    """Whether varlen FlashAttention can run here (CUDA and the ``flash-attn`` package)."""
    if not torch.cuda.is_available():
        return False
    try:
        from flash_attn import flash_attn_varlen_func  # noqa: F401
    except ImportError:
        return False
    return True


def _varlen_flash(query, key, value, rows: list, scaling: float | None, dropout: float) -> torch.Tensor:  # noqa: ANN001
    """All rows in one ``flash_attn_varlen_func`` call: queries in packed order, keys per segment.

    Segments: each row's first part (keys: itself) and second part (keys: the row's first ``p``
    tokens, then itself). FlashAttention's causal mask is aligned to the bottom right when a
    segment has more keys than queries, which is exactly "all prompt keys, causal after".
    """
    from flash_attn import flash_attn_varlen_func

    dev = query.device
    q_lens, k_index, k_lens = [], [], []
    for start, p, split, end, _ in rows:
        if split > 0:
            q_lens.append(split)
            k_index.append(torch.arange(start, start + split, device=dev))
            k_lens.append(split)
        if end > split:
            q_lens.append(end - split)
            k_index.append(torch.arange(start, start + p, device=dev))
            k_index.append(torch.arange(start + split, start + end, device=dev))
            k_lens.append(p + end - split)
    idx = torch.cat(k_index)
    cu_q = torch.tensor([0, *q_lens], device=dev, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    cu_k = torch.tensor([0, *k_lens], device=dev, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    dtype = query.dtype if query.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    q = query[0].transpose(0, 1).to(dtype)  # [T, heads, dim]
    k = key[0].transpose(0, 1)[idx].to(dtype)
    v = value[0].transpose(0, 1)[idx].to(dtype)
    out = flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(q_lens), max(k_lens), dropout_p=dropout, softmax_scale=scaling, causal=True
    )
    return out.to(query.dtype)[None]


# Model types whose attention is more than causal softmax(QK^T)V (attention sinks)
_NON_PLAIN_ATTENTION = ("gpt_oss",)


def packing_blockers(model, longest: int) -> list[str]:  # noqa: ANN001
    """Why ``model``'s attention cannot run packed exactly (empty: it can).

    Packed attention is plain causal softmax within each sequence. ``longest``: the longest
    sequence that will run; a sliding window at least that long never slides, so it is plain.
    (Same rules as :func:`curation.lm.logprobs._shared_blockers`, less its backend check:
    packing replaces the backend.)
    """
    cfg = model.config.get_text_config()
    why = []
    window = getattr(cfg, "sliding_window", None)
    if sliding_window_shorter_than(cfg, longest):
        why.append(f"sliding-window attention ({window}) shorter than the sequences ({longest})")
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        why.append("attention logit soft-capping")
    if getattr(cfg, "model_type", None) in _NON_PLAIN_ATTENTION:
        why.append(f"{cfg.model_type} attention (sinks)")
    return why


@contextmanager
def _registered() -> Iterator[None]:
    """``NAME`` is in transformers' attention registry inside the block, and only there."""
    global _users
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    with _lock:
        if _users == 0:
            if NAME in ALL_ATTENTION_FUNCTIONS:
                raise RuntimeError(f"an attention function named {NAME!r} is already registered")
            ALL_ATTENTION_FUNCTIONS[NAME] = packed_sdpa  # the registry's own (instance) mapping
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                del ALL_ATTENTION_FUNCTIONS[NAME]


def _pretrained(model):  # noqa: ANN001, ANN202 - a PreTrainedModel, possibly wrapped (PEFT, DDP)
    from transformers import PreTrainedModel

    if isinstance(model, PreTrainedModel):
        return model
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            return module
    raise ValueError("layout='packed' needs a transformers PreTrainedModel")


def _implementations(model) -> dict[int, tuple[object, str | None]]:  # noqa: ANN001
    """Every config of the model and its sub-models (and their sub-configs): id -> (config, attention)."""
    configs: dict[int, object] = {}
    pending = [m.config for m in model.modules() if hasattr(m, "config")]
    while pending:
        config = pending.pop()
        if id(config) in configs or not hasattr(config, "_attn_implementation"):
            continue
        configs[id(config)] = config
        pending.extend(
            sub for key in getattr(config, "sub_configs", {}) if (sub := getattr(config, key, None)) is not None
        )
    return {k: (c, c._attn_implementation) for k, c in configs.items()}


def _as_requested(config, saved: dict[int, tuple[object, str | None]]):  # noqa: ANN001, ANN202
    """The ``set_attn_implementation`` argument that puts ``config`` and its sub-configs back as saved."""
    subs = {
        key: _as_requested(sub, saved)
        for key in getattr(config, "sub_configs", {})
        if (sub := getattr(config, key, None)) is not None and id(sub) in saved
    }
    own = saved[id(config)][1]
    return {"": own, **subs} if subs else own


@contextmanager
def packed_attention(model) -> Iterator[None]:  # noqa: ANN001
    """Run ``model``'s attention through :func:`packed_sdpa` inside the block; everything restored after.

    Raises ValueError when the model does not dispatch attention through transformers'
    registry (it would silently ignore the packed layout).
    """
    target = _pretrained(model)
    with _registered():
        saved = _implementations(model)
        try:
            target.set_attn_implementation(NAME)
            if target.config._attn_implementation != NAME:
                raise ValueError(
                    f"layout='packed' is not possible here: {type(target).__name__} does not dispatch "
                    "attention through transformers' AttentionInterface"
                )
            yield
        finally:
            _restore(target, saved)


def _restore(target, saved: dict[int, tuple[object, str | None]]) -> None:  # noqa: ANN001
    if any(config._attn_implementation != impl for config, impl in saved.values()):
        target.set_attn_implementation(_as_requested(target.config, saved))
    for config, impl in saved.values():
        if config._attn_implementation != impl:
            # a config set_attn_implementation does not reach (no sub-model declares it):
            # what it was is known, so put it back as it was
            config._attn_implementation_internal = impl
