"""Progress of long work, through one small protocol that knows nothing about terminals.

Why a protocol: the libraries (curation, training) report progress, but what shows it is the
caller's business: the CLI draws one live display (flows/display.py, rich), a script may want
nothing, a notebook tqdm. So the libraries only call :func:`progress_bar` (a bar per long
loop) and the flows :func:`report_step` (a pipeline step started or finished); whoever shows
progress installs a :class:`ProgressSink` for the process with :func:`use_sink`. With no sink
installed, bars are tqdm bars on stderr, as TRL and ``datasets`` draw theirs, and steps go
nowhere. ``WINNOW_NO_PROGRESS`` / ``TQDM_DISABLE`` turn every bar off either way.

The sink is process-wide (not a context variable) on purpose: Prefect runs tasks in worker
threads, and a terminal has one display, whichever thread the work runs in. Sinks must be
thread-safe (scoring shards report from several threads at once).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from curation.env import environment

StepStatus = Literal["started", "finished", "cached", "failed"]


@runtime_checkable
class Bar(Protocol):
    """One bar: a count of done units towards an optional total."""

    def update(self, n: int = 1) -> None:
        """n more units done."""

    def set_postfix(self, **values: Any) -> None:
        """Short live numbers shown beside the bar (loss=0.41)."""

    def close(self) -> None:
        """The loop is over (also on error); the bar disappears or freezes."""


@dataclass(frozen=True)
class StepEvent:
    """A pipeline step (a Prefect task, or a group of them) started, finished, came from cache or failed."""

    name: str
    status: StepStatus
    seconds: float | None = None
    result: Any = None  # the step's (small, JSON-like) result, for the display to summarise
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class ProgressSink(Protocol):
    """What shows progress: opens bars for the libraries and hears step events from the flows."""

    def open_bar(self, description: str, total: int | None, unit: str) -> Bar:
        """A new bar; called from any thread."""

    def step(self, event: StepEvent) -> None:
        """A pipeline step changed state; called from any thread."""


class NullBar:
    """A bar that shows nothing (progress off)."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


class _TqdmBar:
    """tqdm behind the :class:`Bar` protocol: what a library user without a sink sees."""

    def __init__(self, description: str, total: int | None, unit: str) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=description, unit=unit, dynamic_ncols=True, leave=False)

    def update(self, n: int = 1) -> None:
        self._bar.update(n)

    def set_postfix(self, **values: Any) -> None:
        self._bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        self._bar.close()


_lock = threading.Lock()
_sink: ProgressSink | None = None


def current_sink() -> ProgressSink | None:
    """The installed sink (None: bars are tqdm's, step events are dropped)."""
    return _sink


@contextmanager
def use_sink(sink: ProgressSink) -> Iterator[ProgressSink]:
    """Route every bar and step event of the process to ``sink`` inside the block; nests."""
    global _sink
    with _lock:
        previous, _sink = _sink, sink
    try:
        yield sink
    finally:
        with _lock:
            _sink = previous


def progress_enabled(requested: bool = True) -> bool:
    """Whether a bar asked for with ``enabled=requested`` is shown (the environment can veto)."""
    return requested and not environment().progress_disabled


def open_bar(desc: str, total: int | None = None, unit: str = "it", enabled: bool = True) -> Bar:
    """A bar the caller closes (for callbacks that open and close in different methods)."""
    if not progress_enabled(enabled):
        return NullBar()
    sink = _sink
    return sink.open_bar(desc, total, unit) if sink is not None else _TqdmBar(desc, total, unit)


@contextmanager
def progress_bar(desc: str, total: int | None = None, unit: str = "it", enabled: bool = True) -> Iterator[Bar]:
    """A bar for one long loop, closed on exit; shown by the installed sink, else by tqdm."""
    bar = open_bar(desc, total, unit, enabled)
    try:
        yield bar
    finally:
        bar.close()


def report_step(name: str, status: StepStatus, seconds: float | None = None, result: Any = None,
                **info: Any) -> None:
    """Tell the installed sink that a pipeline step changed state (nothing happens without one)."""
    sink = _sink
    if sink is not None:
        sink.step(StepEvent(name, status, seconds, result, info))
