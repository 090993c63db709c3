"""What a person at a terminal sees while a command runs, and what a script reads after it.

One live display per run (rich): the pipeline's steps as a list, a bar per long loop, then a
short summary with the paths a user opens next. It is the process's
:class:`curation.progress.ProgressSink`, so the libraries report bars without knowing rich,
and the flows report steps without knowing there is a terminal.

Three shapes, picked from where the output goes:
- a terminal: the live display (redraws in place), library bars and warnings silenced and
  Prefect's console logs at WARNING;
- not a terminal (a file, a pipe, CI): plain lines, one per finished step, no carriage
  return, no colour codes;
- ``-v``: plain step lines plus everything the libraries say (Prefect INFO, tqdm, warnings);
- ``--json``: all of the human output goes to stderr, stdout gets one JSON document.

Tables never cut a value: a table that does not fit the width becomes key/value lines that
the terminal wraps (:func:`print_frame`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from curation.jsonable import json_safe
from curation.progress import Bar, NullBar, StepEvent, use_sink
from curation.report_doc import cell_text

PREFECT_CONSOLE_LEVEL_ENV = "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL"
STARTING = "prefect"  # the pseudo-step before the first task: Prefect starting its temporary API

# Pipeline tasks shown as one row: scoring is export + shards + load, under the name of the last.
STEP_ROWS = {"export-pairs": "score", "score-shard": "score", "score": "score"}
STEP_LABELS = {"prefect": "start Prefect", "ingest": "ingest", "build-model": "build model", "score": "score",
               "curate": "curate", "train-stages": "train", "evaluate": "evaluate",
               "publish-artifacts": "publish artifacts"}
ICONS = {"finished": ("✓", "green"), "cached": ("✓", "blue"), "failed": ("✗", "red")}
SPINNER = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


# -- step details: one short phrase per step, from its result ------------------------------------


def _count(n: Any) -> str:
    return f"{n:,}" if isinstance(n, int) else str(n)


def step_detail(name: str, result: Any) -> str:
    """What a finished step did, in a few words (empty when there is nothing worth saying)."""
    if not isinstance(result, dict | str | int):
        return ""
    if name == "ingest" and isinstance(result, dict):
        return (f"{_count(result.get('rows_read'))} rows: {_count(result.get('pairs'))} pairs, "
                f"{_count(result.get('quarantined'))} quarantined")
    if name == "build-model":
        return shown_path(result) if isinstance(result, str) else ""
    if name == "score" and isinstance(result, int):
        return f"{_count(result)} pairs"
    if name == "curate" and isinstance(result, dict):
        sizes = result.get("stage_sizes") or []
        return f"kept {_count(result.get('kept'))} of {_count(result.get('pairs'))} in {len(sizes)} stage(s)"
    if name == "train-stages" and isinstance(result, dict):
        stages = result.get("stages") or []
        loss = stages[-1].get("train_loss") if stages else None
        return f"{len(stages)} stage(s)" + (f", last loss {loss:.4g}" if isinstance(loss, float) else "")
    if name == "evaluate" and isinstance(result, dict):
        for key in ("gold_reward", "implicit_acc"):
            if isinstance(result.get(key), float):
                return f"{key} {result[key]:.4g}"
    return ""


def shown_path(path: str | Path | None) -> str:
    """A path as a user types it: relative to the working directory when inside it."""
    if not path:
        return ""
    p = Path(path)
    try:
        return str(p.resolve().relative_to(Path.cwd().resolve()))
    except (ValueError, OSError):
        return str(p)


# -- the sink ------------------------------------------------------------------------------------


@dataclass
class _Row:
    label: str
    status: str = "running"
    started: float = field(default_factory=time.perf_counter)
    seconds: float | None = None
    detail: str = ""
    members_cached: bool = True


class _RichBar:
    """A task of the live display's rich Progress behind the :class:`curation.progress.Bar` protocol."""

    def __init__(self, progress: Progress, task: TaskID) -> None:
        self.progress, self.task = progress, task
        self.closed = False

    def update(self, n: int = 1) -> None:
        self.progress.update(self.task, advance=n)

    def set_postfix(self, **values: Any) -> None:
        self.progress.update(self.task, postfix=" ".join(f"{k}={v}" for k, v in values.items()))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.progress.remove_task(self.task)


class RunDisplay:
    """The live display (``live=True``) or plain step lines; a thread-safe ProgressSink."""

    def __init__(self, console: Console, live: bool, show_starting: bool = False) -> None:
        self.console, self.live = console, live
        self.rows: dict[str, _Row] = {}
        self.lock = threading.RLock()
        self.progress = Progress(TextColumn("  {task.description}"), BarColumn(bar_width=30), MofNCompleteColumn(),
                                 TextColumn("{task.fields[unit]}"), TimeElapsedColumn(),
                                 TextColumn("{task.fields[postfix]}"), console=console, auto_refresh=False)
        self._live: Live | None = None
        if show_starting:
            self.rows[STARTING] = _Row(STEP_LABELS[STARTING])

    # ProgressSink ---------------------------------------------------------------------------

    def open_bar(self, description: str, total: int | None, unit: str) -> Bar:
        if not self.live:
            return NullBar()  # plain output: one line per step, no redrawn bars
        return _RichBar(self.progress, self.progress.add_task(description, total=total, unit=unit, postfix=""))

    def step(self, event: StepEvent) -> None:
        with self.lock:
            self._close_starting()
            key = STEP_ROWS.get(event.name, event.name)
            row = self.rows.get(key)
            if event.status == "started":
                if row is None or row.status != "running":
                    self.rows[key] = _Row(STEP_LABELS.get(key, key))
                return
            if row is None:
                row = self.rows[key] = _Row(STEP_LABELS.get(key, key))
            row.members_cached &= event.status == "cached"
            if event.status == "failed":
                self._finish(row, "failed", "")
            elif event.name == key:  # the row's last member: the row is done
                self._finish(row, "cached" if row.members_cached else "finished", step_detail(event.name, event.result))

    def _close_starting(self) -> None:
        starting = self.rows.get(STARTING)
        if starting is not None and starting.status == "running":
            self._finish(starting, "finished", os.environ.get("PREFECT_API_URL") or "temporary local API")

    def _finish(self, row: _Row, status: str, detail: str) -> None:
        row.status, row.detail = status, detail
        row.seconds = time.perf_counter() - row.started
        if not self.live:
            self.console.print(self._line(row), highlight=False, soft_wrap=True)

    # rendering ------------------------------------------------------------------------------

    def _line(self, row: _Row) -> Text:
        seconds = row.seconds if row.seconds is not None else time.perf_counter() - row.started
        status = "from cache" if row.status == "cached" else row.detail
        if row.status == "running":  # only the live display draws running rows
            icon, style = SPINNER[int(time.monotonic() * 10) % len(SPINNER)], "cyan"
        else:
            icon, style = ICONS[row.status]
        text = Text(icon, style=style if self.live else "")
        text.append(f" {row.label:<18} {seconds:6.1f} s  ")
        text.append(status, style="dim" if row.status == "cached" else "")
        return text

    def __rich__(self) -> RenderableType:
        with self.lock:
            lines = [self._line(row) for row in self.rows.values()]
        parts: list[RenderableType] = [*lines]
        if self.progress.tasks:
            parts.append(self.progress.get_renderable())
        return Group(*parts)

    def __enter__(self) -> RunDisplay:
        if self.live:
            self._live = Live(self, console=self.console, refresh_per_second=8, transient=False,
                              redirect_stdout=True, redirect_stderr=True)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        with self.lock:
            starting = self.rows.get(STARTING)
            if exc[0] is not None and starting is not None and starting.status == "running":
                del self.rows[STARTING]  # failed before any step (bad settings): the error line says why
            for row in self.rows.values():
                if row.status == "running":
                    self._finish(row, "failed" if exc[0] is not None else "finished", "")
        if self._live is not None:
            self._live.refresh()
            self._live.__exit__(*exc)
            self._live = None


# -- silencing the libraries ---------------------------------------------------------------------


class _NoUserErrorEcho(logging.Filter):
    """Prefect logs a failed task and flow at ERROR; for a WinnowError the CLI's own line says it already."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "WinnowError" not in record.getMessage()


@contextlib.contextmanager
def quiet_libraries(prefect: bool = False) -> Iterator[None]:
    """Library bars, warnings and Prefect's INFO console lines off inside the block; restored after.

    transformers ("Loading weights", "Writing model shards"), datasets ("Adding EOS to train
    dataset") and huggingface_hub draw their own tqdm bars; Winnow's bars go through the
    display instead. Prefect's run logs still reach its API (the UI) at INFO: only the
    console handler is raised to WARNING (and keeps quiet about WinnowErrors, which the CLI
    prints as one line). A user's own PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL wins.
    ``prefect=True`` imports Prefect here (a flow is about to run), so its handlers exist.
    """
    import datasets.utils.logging as ds_logging
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as tf_logging

    saved_env = os.environ.get(PREFECT_CONSOLE_LEVEL_ENV)
    if saved_env is None:
        os.environ[PREFECT_CONSOLE_LEVEL_ENV] = "WARNING"  # for a Prefect imported later (and its server)
    if prefect:
        import prefect as _prefect  # noqa: F401 - sets up Prefect's logging (reads the variable above)
    handlers = _prefect_console_handlers() if saved_env is None else []
    levels = [h.level for h in handlers]
    echo = _NoUserErrorEcho()
    tf_bars, tf_level = tf_logging.is_progress_bar_enabled(), tf_logging.get_verbosity()
    ds_bars, ds_level = ds_logging.is_progress_bar_enabled(), ds_logging.get_verbosity()
    hub_bars = not hub_utils.are_progress_bars_disabled()
    try:
        for handler in handlers:
            handler.setLevel(logging.WARNING)
            handler.addFilter(echo)
        tf_logging.disable_progress_bar()
        tf_logging.set_verbosity_error()
        ds_logging.disable_progress_bar()
        ds_logging.set_verbosity_error()
        hub_utils.disable_progress_bars()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for handler, level in zip(handlers, levels, strict=True):
            handler.setLevel(level)
            handler.removeFilter(echo)
        if saved_env is None:
            os.environ.pop(PREFECT_CONSOLE_LEVEL_ENV, None)
        if tf_bars:
            tf_logging.enable_progress_bar()
        tf_logging.set_verbosity(tf_level)
        if ds_bars:
            ds_logging.enable_progress_bar()
        ds_logging.set_verbosity(ds_level)
        if hub_bars:
            hub_utils.enable_progress_bars()


def _prefect_console_handlers() -> list[logging.Handler]:
    """Prefect's console handlers, when Prefect is imported (its logging is set up then)."""
    if "prefect.logging.handlers" not in sys.modules:
        return []
    from prefect.logging.handlers import PrefectConsoleHandler

    found: list[logging.Handler] = []
    for logger in [logging.getLogger(), *(logging.getLogger(n) for n in logging.root.manager.loggerDict)]:
        for handler in getattr(logger, "handlers", []):
            if isinstance(handler, PrefectConsoleHandler) and handler not in found:
                found.append(handler)
    return found


# -- a command's output ---------------------------------------------------------------------------


class Output:
    """Where one command writes: the human console (stdout, or stderr under --json) and the JSON document."""

    def __init__(self, json_mode: bool = False, verbose: bool = False, console: Console | None = None) -> None:
        self.json_mode, self.verbose = json_mode, verbose
        self.console = console or Console(stderr=json_mode, highlight=False)
        self._stdout = sys.stdout  # the JSON document's stream, captured before any redirect

    @contextlib.contextmanager
    def work(self, steps: bool = True) -> Iterator[RunDisplay]:
        """The block that does the work: progress shown, libraries quiet, nothing stray on a JSON stdout."""
        live = self.console.is_terminal and not self.verbose
        display = RunDisplay(self.console, live=live, show_starting=steps)
        with contextlib.ExitStack() as stack:
            if self.json_mode:
                stack.enter_context(contextlib.redirect_stdout(sys.stderr))
            if not self.verbose:
                stack.enter_context(quiet_libraries(prefect=steps))
            stack.enter_context(use_sink(display))
            stack.enter_context(display)
            yield display

    def result(self, document: Any, render: Callable[[Console], None]) -> None:
        """The command's result: one JSON document on stdout (--json), else ``render`` on the console."""
        if self.json_mode:
            self._stdout.write(json.dumps(json_safe(document), indent=2, allow_nan=False) + "\n")
            self._stdout.flush()
        else:
            render(self.console)


# -- tables that never cut a value ----------------------------------------------------------------


def print_frame(frame, console: Console, title: str | None = None) -> None:  # noqa: ANN001 - polars frame
    """A polars frame as a table when it fits the console, else as key/value lines; no value is ever cut.

    Rich would shrink a wide table by cutting cells (``reference_…``, ``runs/run-0…``); instead
    the full width each column needs is measured, and when the table does not fit every row is
    printed as ``column: value`` lines the terminal wraps (copy-paste gives the whole value).
    """
    rows = [[cell_text(v) for v in row] for row in frame.iter_rows()]
    widths = [max([len(name), *(len(r[i]) for r in rows)]) for i, name in enumerate(frame.columns)]
    needed = sum(widths) + 3 * len(widths) + 1
    if needed <= console.width:
        table = Table(title=title, show_lines=False, title_justify="left")
        for name in frame.columns:
            table.add_column(name, justify="right" if frame[name].dtype.is_numeric() else "left", no_wrap=True,
                             min_width=len(name))
        for row in rows:
            table.add_row(*row)
        console.print(table, highlight=False, markup=False)
        return
    if title:
        console.print(Text(title, style="italic"))
    key_width = max(len(c) for c in frame.columns) if frame.columns else 0
    for i, row in enumerate(rows):
        if len(rows) > 1:
            console.print(Text(f"[{i + 1}]", style="dim"))
        for name, value in zip(frame.columns, row, strict=True):
            console.print(Text(f"  {name:<{key_width}}  {value}"), soft_wrap=True, highlight=False)


# -- summaries --------------------------------------------------------------------------------------


def _frame(rows: list[dict[str, Any]]):  # noqa: ANN202 - polars frame
    import polars as pl

    return pl.DataFrame(rows, infer_schema_length=None)


def render_accounting(result: Any, console: Console) -> None:
    """`winnow ingest`: rows read = pairs + quarantined (rows that made several pairs: candidates too)."""
    import polars as pl

    accounting = result.accounting
    multi = result.pairs != result.rows_paired  # some row made several pairs
    title = (f"run {result.run_id}: rows read = rows paired + rows quarantined; candidates = pairs + quarantined "
             "pairs" if multi else f"run {result.run_id}: rows read = pairs + quarantined")
    shown = accounting if multi else accounting.select("source", "shape", "rows_read", "pairs", "quarantined")
    print_frame(shown, console, title=title)
    if result.reasons.height:
        print_frame(result.reasons.sort("rows", descending=True), console, title="quarantined, by reason")
    total = accounting.select(pl.col("rows_read", "pairs", "quarantined", "rows_paired", "rows_quarantined").sum()).row(0)
    if multi:
        console.print(f"[bold]{total[0]}[/] rows read = [green]{total[3]}[/] rows that made [green]{total[1]}[/] pairs "
                      f"+ [yellow]{total[4]}[/] quarantined rows ({total[2]} quarantine rows in all)")
    else:
        console.print(f"[bold]{total[0]}[/] rows read = [green]{total[1]}[/] pairs + [yellow]{total[2]}[/] quarantined")


def accounting_document(result: Any) -> dict[str, Any]:
    """`winnow ingest --json`: the same accounting, for scripts."""
    return {"run_id": result.run_id, "rows_read": result.rows_read, "pairs": result.pairs,
            "quarantined": result.quarantined, "rows_paired": result.rows_paired,
            "rows_quarantined": result.rows_quarantined, "accounting": result.accounting.to_dicts(),
            "quarantined_by_reason": result.reasons.to_dicts(), "shapes": result.layouts}


def _eval_items(metrics: dict[str, Any]) -> list[str]:
    """Held-out metrics as short 'name value' items; `x` and `x_ref` side by side, `kl` with its error."""
    items = []
    for name, value in metrics.items():
        if name.endswith("_ref") or name == "kl_se" or not isinstance(value, int | float):
            continue
        text = f"{name} {value:.4g}"
        if isinstance(metrics.get(f"{name}_ref"), int | float):
            text += f" (ref {metrics[name + '_ref']:.4g})"
        if name == "kl" and isinstance(metrics.get("kl_se"), int | float):
            text += f" ± {metrics['kl_se']:.2g}"
        items.append(text)
    return items


def render_summary(summary: dict[str, Any], console: Console, catalog: str | Path | None = None) -> None:
    """The end of a run: what was kept, the advice, the stages, the evaluation, and the paths to open."""
    from rich.columns import Columns

    console.print()
    if "kept" in summary:
        dropped = dict(summary.get("dropped") or {})
        heldout = dropped.pop("heldout", 0)  # not dropped: kept aside for evaluation
        sizes = summary.get("stage_sizes") or []
        console.print(Text.from_markup(
            f"[bold]{summary['run_id']}[/]: {summary['pairs']:,} pairs, [green]{summary['kept']:,} kept[/] in "
            f"{len(sizes)} stage(s) ({', '.join(f'{s:,}' for s in sizes)}), "
            + (f"{heldout:,} held out for evaluation, " if heldout else "")
            + f"{sum(dropped.values()):,} dropped"
            + (f" ({', '.join(f'{k} {v:,}' for k, v in dropped.items())})" if dropped else "")), soft_wrap=False)
        advice = summary.get("advice") or {}
        if advice.get("objective"):
            params = ", ".join(f"{k}={v}" for k, v in (advice.get("params") or {}).items())
            console.print(Text.from_markup(f"advice: [bold]{advice['objective']}[/]" + (f" ({params})" if params else "")))
            if advice.get("rationale"):
                console.print(Text("  " + advice["rationale"], style="dim"))
    if summary.get("stages"):
        stages = [{"stage": s["stage"], "objective": s["objective"], "pairs": s["pairs"],
                   "reference": s["reference_source"], "train loss": s.get("train_loss"),
                   "seconds": s.get("seconds"), "resumed": s.get("resumed")} for s in summary["stages"]]
        print_frame(_frame(stages), console, title="sDPO stages")
    if summary.get("eval"):
        console.print(Text("held-out evaluation, policy vs reference:", style="italic"))
        console.print(Columns([Text(item) for item in _eval_items(summary["eval"])], padding=(0, 3)))
    report = summary.get("report")
    html = summary.get("report_html") or (str(Path(report).with_suffix(".html")) if report else None)
    paths = [("report", html if html and Path(html).is_file() else report), ("shards", summary.get("shard_dir")),
             ("model", summary.get("final_model")), ("catalog", catalog)]
    for key, value in paths:
        if value:  # one line each, wrapped by the terminal, never folded or cut: copy-paste gives the path
            console.print(Text.from_markup(f"[bold]{key:<8}[/]") + Text(shown_path(value)), soft_wrap=True)
    cached = sorted(set(summary.get("cached_tasks") or []))
    if cached:
        console.print(Text(f"from cache: {', '.join(cached)} (--refresh recomputes)", style="dim"))


def render_export(result: Any, console: Console) -> None:
    """`winnow export`: how many pairs went where."""
    stages = ", ".join(f"stage {k}: {v:,}" for k, v in result.rows_per_stage.items())
    console.print(Text.from_markup(f"[bold]{result.run_id}[/]: exported {result.rows:,} kept pairs ({stages})"))
    console.print(Text(f"columns: {', '.join(result.columns)}"), soft_wrap=True)
    if result.files:
        for name in result.files:
            console.print(Text.from_markup("[bold]wrote[/]   ") + Text(shown_path(Path(result.destination) / name)),
                          soft_wrap=True)
    else:
        console.print(Text.from_markup("[bold]pushed[/]  ") + Text(result.destination), soft_wrap=True)
