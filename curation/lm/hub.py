"""Is the Hugging Face hub there? Asked once, quickly, before anything waits on retries.

Without this, an unreachable hub costs ~25 s of HEAD retries per load before the error.
When the hub is offline (HF_HUB_OFFLINE) or unreachable, models load from the local HF
cache (:mod:`curation.lm.loading` locates the cached snapshot) and datasets from the local
`datasets` cache (:func:`load_hub_dataset`), per call: no library's offline switch is
flipped, so other threads and later calls see the settings the process started with.
"""

from __future__ import annotations

import socket
from typing import Any
from urllib.parse import urlparse

from curation.env import environment


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set: never contact the hub."""
    return environment().hf_hub_offline


def hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connect to the hub endpoint: seconds, not minutes, when there is no network."""
    url = urlparse(environment().hf_endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


def load_hub_dataset(name: str, split: str) -> tuple[Any, bool]:
    """(dataset, whether it came from the local cache) for the hub dataset ``name``.

    Hub there: streamed from it. Offline or unreachable: the prepared copy in the local
    `datasets` cache, memory-mapped, which is what ``datasets.load_dataset`` falls back to in
    offline mode; built here with the builder that fallback uses (its ``cache`` module), so
    ``datasets.config.HF_HUB_OFFLINE`` and ``huggingface_hub.constants.HF_HUB_OFFLINE`` stay
    as they are. (``DownloadConfig(local_files_only=True)`` would be the per-call switch, but
    ``datasets`` 5's loader never reads that field: it still asks the hub first.)
    """
    import datasets

    if not hub_offline() and hub_reachable():
        return datasets.load_dataset(name, split=split, streaming=True), False
    from datasets.packaged_modules.cache.cache import Cache

    try:
        builder = Cache(repo_id=name, dataset_name=name.split("/")[-1], version="auto", hash="auto")
    except ValueError as exc:  # not cached, or several cached configurations
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(
            f"the hub is offline or unreachable, and the local datasets cache has no usable copy ({reason})"
        ) from None
    builder.download_and_prepare()
    return builder.as_dataset(split=split), True
