"""The `winnow` command line. Thin: every command calls a library function or a flow.

Heavy imports (torch, prefect) happen inside the commands that need them, so
`winnow query` answers in well under a second.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from curation.errors import WinnowError
from curation.schema import Format

app = typer.Typer(
    name="winnow",
    help="Measure, curate and stage preference pairs, then train DPO variants on them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

Workdir = Annotated[Path, typer.Option("--workdir", "-w", help="Workspace holding catalog.duckdb and run folders.")]
DEFAULT_WORKDIR = Path("runs")


def print_frame(frame, title: str | None = None, csv: bool = False) -> None:  # noqa: ANN001 - polars frame
    """Render a polars frame as a rich table (or CSV for scripts)."""
    if csv:
        sys.stdout.write(frame.write_csv())
        return
    table = Table(title=title, show_lines=False)
    for name in frame.columns:
        table.add_column(name, justify="right" if frame[name].dtype.is_numeric() else "left")
    for row in frame.iter_rows():
        table.add_row(*("" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    console.print(table)


@app.command()
def ingest(
    sources: Annotated[list[str], typer.Argument(help="Files, folders, globs, or hf:DATASET[:SPLIT].")],
    format: Annotated[Format, typer.Option("--format", "-f", help="Input layout; auto-detected by default.")] = Format.AUTO,
    workdir: Workdir = DEFAULT_WORKDIR,
    run_id: Annotated[str | None, typer.Option(help="Run id; default: a hash of the inputs and settings.")] = None,
    max_bad_fraction: Annotated[float, typer.Option(help="Fail when a larger share of rows is quarantined.")] = 0.5,
    max_bytes: Annotated[int, typer.Option(help="Quarantine rows whose texts exceed this many bytes.")] = 200_000,
) -> None:
    """Read preference pairs into the catalog and print the accounting table."""
    from curation.ingest import IngestOptions
    from curation.ingest import ingest as run_ingest
    from curation.store import Catalog

    options = IngestOptions(format=format, max_bad_fraction=max_bad_fraction, max_bytes=max_bytes)
    result = run_ingest(sources, Catalog(workdir), options, run_id=run_id)
    print_accounting(result)


def print_accounting(result) -> None:  # noqa: ANN001 - IngestResult
    import polars as pl

    print_frame(result.accounting, title=f"run {result.run_id}: rows read = pairs + quarantined")
    if result.reasons.height:
        print_frame(result.reasons.sort("rows", descending=True), title="quarantined, by reason")
    total = result.accounting.select(pl.col("rows_read", "pairs", "quarantined").sum()).row(0)
    console.print(f"[bold]{total[0]}[/] rows read = [green]{total[1]}[/] pairs + [yellow]{total[2]}[/] quarantined")


@app.command()
def query(
    sql: Annotated[str, typer.Argument(help="SQL over the catalog tables (read-only).")],
    workdir: Workdir = DEFAULT_WORKDIR,
    csv: Annotated[bool, typer.Option("--csv", help="Print CSV instead of a table.")] = False,
) -> None:
    """Run read-only SQL against the catalog and print the result."""
    from curation.store import Catalog

    print_frame(Catalog(workdir).query(sql), csv=csv)


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    try:
        app()
    except WinnowError as exc:
        err_console.print(f"[red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
