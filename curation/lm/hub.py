"""Is the Hugging Face hub there? Asked once, quickly, before anything waits on retries.

Without this, an unreachable hub costs ~25 s of HEAD retries per load before the error.
Offline mode still lets `datasets` and `transformers` use what is in the local cache.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlparse


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def hub_reachable(timeout: float = 3.0) -> bool:
    """A TCP connect to the hub endpoint: seconds, not minutes, when there is no network."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "huggingface.co", port), timeout=timeout):
            return True
    except OSError:
        return False


@contextmanager
def offline_unless_reachable() -> Iterator[bool]:
    """Run the block in hub offline mode when the hub cannot be reached; yields whether offline."""
    offline = hub_offline() or not hub_reachable()
    if not offline:
        yield False
        return
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = (hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE)
    hub_constants.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    try:
        yield True
    finally:
        hub_constants.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved
