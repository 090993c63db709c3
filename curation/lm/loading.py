"""Causal LMs and their tokenizers, from a local directory or the hub, on the right device.

Why here, at the bottom: curation loads the reference (and reward or policy) models it scores
with, and training loads the models it trains; both must resolve names, fail on a missing
model and pick devices and CPU threads the same way. Building the default "winnow-tiny" model
is training's business (:mod:`training.models`); loading any model, that one included, is this
module's.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from curation.env import environment
from curation.errors import WinnowError
from curation.lm.hub import hub_offline, hub_reachable


class ModelNotFoundError(WinnowError, ValueError):
    """A model (or tokenizer) is neither a local directory nor loadable from the hub or its cache.

    A WinnowError, so the CLI prints it as one line; still a ValueError for callers that catch that.
    """


# --------------------------------------------------------------------------------------------------
# Device


def pick_device() -> tuple[torch.device, torch.dtype]:
    """Best device and matching compute dtype: CUDA with bf16 when available, else CPU with float32.

    bf16 halves memory and is safe for training without loss scaling; CPUs get float32 because bf16
    matmuls there are slow and lossy.
    """
    if torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        return torch.device("cuda"), dtype
    return torch.device("cpu"), torch.float32


def _available_cpus() -> int:
    """CPUs this process may run on (cgroup/affinity aware, unlike os.cpu_count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _threads_for_width(hidden_size: int) -> int:
    """Intra-op CPU threads for a model this wide: 1 for small widths, else all available CPUs.

    At hidden_size <= 256 the matmuls are too small for a second thread to pay off (measured: same
    time per step on 2 cores), and when other processes compete for the cores, OpenMP spin-waiting
    made 2-thread steps 10-30x slower than 1-thread ones. WINNOW_SFT_THREADS overrides.
    """
    override = environment().sft_threads
    if override is not None:
        return override
    return 1 if hidden_size <= 256 else _available_cpus()


def cpu_threads_for(model: PreTrainedModel) -> int:
    """Intra-op threads worth using for this model on the CPU (SFT warm-up and DPO stages alike)."""
    return _threads_for_width(getattr(model.config.get_text_config(), "hidden_size", 1024))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Use n intra-op threads inside the block and restore the caller's setting afterwards."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------------------------------
# Loading

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def _resolve_source(name_or_path: str | Path, what: str) -> tuple[str, bool]:
    """Where to load `name_or_path` from: (local path or hub id, whether the hub is out of reach).

    A missing local path, or a hub id while the hub is offline or unreachable, would otherwise end in
    long network retries (about 50 s when DNS fails) and a multi-page traceback, so both fail here at
    once with a one-line ModelNotFoundError. Offline hub ids still load from the local HF cache: the
    cached snapshot is located first and loaded as a plain directory (passing local_files_only to
    from_pretrained is not enough: transformers' PEFT adapter probe still goes to the network).
    """
    s = str(name_or_path)
    if Path(s).expanduser().exists():
        return str(Path(s).expanduser()), False
    looks_like_path = s.startswith((".", "/", "~")) or s.count("/") > 1 or "\\" in s
    if looks_like_path or not _HUB_ID.match(s):
        raise ModelNotFoundError(f"{what} {s!r} not found: no such local directory")
    if not hub_offline() and hub_reachable():
        return s, False
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo_id=s, local_files_only=True), True
    except Exception:  # noqa: BLE001 - any failure here means "not in the cache"
        raise ModelNotFoundError(
            f"{what} {s!r} not found: no such local directory, the hub is offline or unreachable, "
            "and it is not in the local Hugging Face cache"
        ) from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] + ("..." if len(text) > 200 else "")


def load_model(
    name_or_path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """Load a causal LM from a local directory or hub id onto `device` in `dtype` (default: pick_device()).

    Raises ModelNotFoundError with a one-line message when it is neither a local model nor reachable.
    """
    from transformers import AutoModelForCausalLM

    source, cached = _resolve_source(name_or_path, "model")
    default_device, default_dtype = pick_device()
    device = torch.device(device) if device is not None else default_device
    dtype = dtype or default_dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as exc:
        where = " (from the local Hugging Face cache, hub offline)" if cached else ""
        raise ModelNotFoundError(f"cannot load model {str(name_or_path)!r}{where}: {_one_line(exc)}") from None
    return model.to(device)


def load_tokenizer(name_or_path: str | Path) -> PreTrainedTokenizerBase:
    """Load the tokenizer of a local directory or hub id; sets pad = eos when it has no pad token
    (DPO batches need padding). Raises ModelNotFoundError like load_model."""
    from transformers import AutoTokenizer

    source, cached = _resolve_source(name_or_path, "tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as exc:
        where = " (from the local Hugging Face cache, hub offline)" if cached else ""
        raise ModelNotFoundError(f"cannot load tokenizer {str(name_or_path)!r}{where}: {_one_line(exc)}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
