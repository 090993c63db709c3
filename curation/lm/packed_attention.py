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
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

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
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """SDPA per row of a packed sequence: no padding, no masked-out square computed.

    Each row is ``prompt + first [+ second]``: the first part runs causal; the second part's
    queries attend to the prompt keys and causally to themselves, as in its own sequence.
    ``winnow_rows``: per row ``(start, prompt length, split, end, second-part mask or None)``.
    """
    if winnow_rows is None:
        raise RuntimeError("winnow packed attention called without its row layout")
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
                query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True, scale=scaling
            )
        if second is not None:
            c = start + end
            k2 = torch.cat([key[:, :, a : a + p], key[:, :, b:c]], dim=2)
            v2 = torch.cat([value[:, :, a : a + p], value[:, :, b:c]], dim=2)
            out[:, :, b:c] = sdpa(query[:, :, b:c], k2, v2, attn_mask=second, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


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
