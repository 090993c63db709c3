"""The environment variables Winnow reads, in one place, read once.

Why: knobs read with ``os.environ.get`` deep inside the code are invisible (nobody can list
them) and can change under a running process. Every variable the libraries and flows read is
a field of :class:`Environment`, documented here, read from ``os.environ`` the first time
:func:`environment` is called and then fixed for the process. Tests that change a variable
call :func:`reset_environment` afterwards, or use :func:`override_environment`
(tests/conftest.py resets it around every test and after every ``monkeypatch.setenv``).

Writes are not here: the Prefect settings Winnow defaults are set by
:func:`flows.prefect_env.configure_prefect`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

_TRUE = {"1", "true", "yes", "on"}
DEFAULT_DUCKDB_MEMORY = "1GB"
DEFAULT_HF_ENDPOINT = "https://huggingface.co"
DEFAULT_CATALOG_WAIT_S = 30.0
DEFAULT_RUN_LOCK_WAIT_S = 30.0


@dataclass(frozen=True)
class Environment:
    """One field per environment variable Winnow reads."""

    duckdb_memory: str = DEFAULT_DUCKDB_MEMORY
    """WINNOW_DUCKDB_MEMORY: DuckDB's memory cap during bulk catalog steps (default 1GB)."""
    sft_threads: int | None = None
    """WINNOW_SFT_THREADS: intra-op CPU threads for SFT warm-up and DPO stages (a positive
    integer; anything else means: pick by model width)."""
    no_progress: bool = False
    """WINNOW_NO_PROGRESS: any non-empty value turns Winnow's progress bars off."""
    tqdm_disable: bool = False
    """TQDM_DISABLE: any non-empty value turns Winnow's progress bars off too (tqdm's own switch)."""
    hf_hub_offline: bool = False
    """HF_HUB_OFFLINE: 1/true/yes/on: never contact the Hugging Face hub, use the local cache."""
    hf_endpoint: str = DEFAULT_HF_ENDPOINT
    """HF_ENDPOINT: the hub address probed before loading from it."""
    fail_after: str | None = None
    """WINNOW_FAIL_AFTER: a testing aid: the flow raises after the pipeline step of this name."""
    catalog_wait_s: float = DEFAULT_CATALOG_WAIT_S
    """WINNOW_CATALOG_WAIT: seconds a catalog reader or writer waits while another process holds the
    catalog (a run writing), before it fails in one line (default 30; 0: do not wait)."""
    run_lock_wait_s: float = DEFAULT_RUN_LOCK_WAIT_S
    """WINNOW_RUN_LOCK_WAIT: seconds a run waits for another process working on the same run folder
    (same run id) before it fails in one line (default 30; 0: do not wait)."""

    @property
    def progress_disabled(self) -> bool:
        """Whether progress bars are off (WINNOW_NO_PROGRESS or TQDM_DISABLE)."""
        return self.no_progress or self.tqdm_disable

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Environment:
        """Read every field from ``environ`` (default: ``os.environ``)."""
        env = os.environ if environ is None else environ
        threads = env.get("WINNOW_SFT_THREADS", "").strip()
        return cls(
            duckdb_memory=env.get("WINNOW_DUCKDB_MEMORY", DEFAULT_DUCKDB_MEMORY).strip().replace("'", ""),
            sft_threads=int(threads) if threads.isdigit() and int(threads) > 0 else None,
            no_progress=bool(env.get("WINNOW_NO_PROGRESS")),
            tqdm_disable=bool(env.get("TQDM_DISABLE")),
            hf_hub_offline=env.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE,
            hf_endpoint=env.get("HF_ENDPOINT", DEFAULT_HF_ENDPOINT),
            fail_after=env.get("WINNOW_FAIL_AFTER"),
            catalog_wait_s=_seconds(env.get("WINNOW_CATALOG_WAIT"), DEFAULT_CATALOG_WAIT_S),
            run_lock_wait_s=_seconds(env.get("WINNOW_RUN_LOCK_WAIT"), DEFAULT_RUN_LOCK_WAIT_S),
        )


def _seconds(raw: str | None, default: float) -> float:
    """A finite, non-negative number of seconds; anything else (unset, text, nan, -1) means the default."""
    try:
        value = float((raw or "").strip())
    except ValueError:
        return default
    return value if 0 <= value < float("inf") else default


_current: Environment | None = None


def environment() -> Environment:
    """The process's environment knobs, read from ``os.environ`` on the first call and kept."""
    global _current
    current = _current
    if current is None:  # two threads racing here read the same values: harmless
        current = _current = Environment.from_environ()
    return current


def reset_environment() -> None:
    """Forget the knobs read so far: the next :func:`environment` call reads ``os.environ`` again."""
    global _current
    _current = None


@contextmanager
def override_environment(**changes: object) -> Iterator[Environment]:
    """Inside the block, :func:`environment` returns the current knobs with ``changes`` applied.

    For tests: ``with override_environment(hf_hub_offline=True): ...``; afterwards it returns
    what it returned before the block.
    """
    global _current
    saved = _current
    patched = _current = dataclasses.replace(environment(), **changes)
    try:
        yield patched
    finally:
        _current = saved
