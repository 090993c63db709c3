"""Which fast paths of the reference scorer a model allows, and why not when it does not.

Why a module of its own: the scorer's two fast paths (:mod:`curation.lm.logprobs`) change how
attention is laid out, so each is only exact for attention that is plain causal softmax:
* shared-prompt rows (``prompt + chosen + rejected`` in one row under a 4D mask) need an
  attention backend that takes a ready mask (sdpa, eager) and no sliding window shorter than
  the sequences (the window would cut across the row's two parts);
* the packed layout replaces attention itself with plain SDPA per row, so anything more
  (logit soft-capping, sinks, windows, another backend) would be silently dropped.
Checked per family on tiny Llama, Qwen2, Gemma 2/3, Mistral, Phi-3 and GPT-NeoX models
(tests/test_model_families.py). A path the scorer switches off by itself is logged with its reason.
"""

from __future__ import annotations

import logging

import numpy as np

from curation.lm.tokenization import TokenizedPairs


def sliding_window_shorter_than(cfg, longest: int) -> bool:  # noqa: ANN001 - a transformers text config
    """Whether some layer attends through a sliding window shorter than ``longest`` tokens.

    Such layers see less than the whole sequence, which the fast layouts (one row holding
    several sequences, or a shared prompt) would change; plain padded batches are exact.
    """
    layer_types = getattr(cfg, "layer_types", None) or []
    window = getattr(cfg, "sliding_window", None)
    if layer_types:
        sliding = any("sliding" in str(t) for t in layer_types)
    else:
        sliding = window is not None and getattr(cfg, "use_sliding_window", True)
    return bool(sliding) and (window is None or longest > window)


logger = logging.getLogger("curation.lm.logprobs")  # the scorer's logger: one place to watch

# Attention backends that are plain causal SDPA math and accept a ready 4D boolean mask
_MASK4D_ATTENTION = ("sdpa", "eager")

# Model types whose attention is more than causal softmax(QK^T)V (attention sinks)
_NON_PLAIN_ATTENTION = ("gpt_oss",)


def _shared_blockers(model, longest: int) -> list[str]:
    """Why the model cannot run rows whose attention differs from plain causal (empty: it can).

    ``longest``: the longest sequence TRL would build; a sliding window at least that long
    never slides, so it is plain causal attention. Attention logit soft-capping does not
    block these rows: the model applies its own attention to them and adds the mask after
    capping (eager), so only the mask differs from TRL's rows (checked on Gemma 2).
    """
    cfg = model.config.get_text_config()
    why = []
    attn = getattr(cfg, "_attn_implementation", None) or "eager"
    if attn not in _MASK4D_ATTENTION:
        why.append(f"attention backend {attn!r} (needs sdpa or eager)")
    if sliding_window_shorter_than(cfg, longest):
        why.append("sliding-window attention shorter than the sequences")
    if getattr(cfg, "model_type", None) in _NON_PLAIN_ATTENTION:
        why.append(f"{cfg.model_type} attention (sinks)")
    return why


def _packed_blockers(model, longest: int) -> list[str]:
    """Why the packed layout cannot run: its attention is plain SDPA per row, so anything more
    (soft-capping, sinks, windows, another backend) would be silently dropped."""
    why = _shared_blockers(model, longest)
    if getattr(model.config.get_text_config(), "attn_logit_softcapping", None) is not None:
        why.append("attention logit soft-capping (the packed rows run plain SDPA)")
    return why


def fast_path_blockers(model, tokenized: TokenizedPairs) -> dict[str, list[str]]:
    """Why each fast path is off for this model and these pairs: ``{"shared": [...], "packed": [...]}``.

    Empty lists: the path gives TRL's numbers here. :func:`score_tokenized` logs the reasons
    when it switches a path off by itself.
    """
    longest = _longest(tokenized)
    return {"shared": _shared_blockers(model, longest), "packed": _packed_blockers(model, longest)}


def _longest(tokenized: TokenizedPairs) -> int:
    sequence = tokenized.prompt_lengths + np.maximum(tokenized.chosen_lengths, tokenized.rejected_lengths)
    return int(np.where(tokenized.keep, sequence, 0).max(initial=0))


def _log_off(path: str, model, reasons: list[str]) -> None:  # noqa: ANN001
    """One log line per switched-off fast path, naming the model type and why (the numbers stay TRL's)."""
    kind = getattr(model.config.get_text_config(), "model_type", type(model).__name__)
    logger.info("reference log-probs: %s off for %s (%s); scoring chosen and rejected as separate rows",
                path, kind, "; ".join(reasons))
