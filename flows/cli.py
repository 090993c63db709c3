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

from curation.config_fields import default_of, help_of
from curation.errors import WinnowError
from curation.ingest import IngestOptions
from curation.schema import Format
from curation.score.scoring import ScoreOptions
from training.config import TrainConfig
from training.tiny_config import DEFAULT_MODEL

app = typer.Typer(
    name="winnow",
    help="Measure, curate and stage preference pairs, then train DPO variants on them.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

MODEL_HELP = "Reference/start model: winnow-tiny (built locally from the run's pairs), a local path or a hub id."
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
    format: Annotated[Format, typer.Option("--format", "-f", help=help_of(IngestOptions, "format"))] = default_of(
        IngestOptions, "format"),
    workdir: Workdir = DEFAULT_WORKDIR,
    run_id: Annotated[str | None, typer.Option(help="Run id; default: a hash of the inputs and settings.")] = None,
    max_bad_fraction: Annotated[float, typer.Option(help=help_of(IngestOptions, "max_bad_fraction"))] = default_of(
        IngestOptions, "max_bad_fraction"),
    max_bytes: Annotated[int, typer.Option(help=help_of(IngestOptions, "max_bytes"))] = default_of(
        IngestOptions, "max_bytes"),
) -> None:
    """Read preference pairs into the catalog and print the accounting table."""
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


def _latest_run(workdir: Path) -> str:
    from curation.reads import latest_run_id
    from curation.store import Catalog

    run_id = latest_run_id(Catalog(workdir))
    if run_id is None:
        raise WinnowError(f"no runs in {workdir}: run `winnow ingest` or `winnow curate` first")
    return run_id


@app.command()
def score(
    run_id: Annotated[str | None, typer.Argument(help="Run to score; default: the latest run.")] = None,
    workdir: Workdir = DEFAULT_WORKDIR,
    model: Annotated[str, typer.Option(help=MODEL_HELP)] = DEFAULT_MODEL,
    margin: Annotated[str, typer.Option(help=help_of(ScoreOptions, "margin"))] = default_of(ScoreOptions, "margin"),
    reward_model: Annotated[str | None, typer.Option(help="AutoModelForSequenceClassification path (margin reward-model).")] = None,
    policy: Annotated[str | None, typer.Option(help="Trained policy path (margin policy).")] = None,
    max_length: Annotated[int, typer.Option(help=help_of(ScoreOptions, "max_length"))] = default_of(
        ScoreOptions, "max_length"),
    reference: Annotated[bool, typer.Option(help="Compute reference log-probs (reused by training).")] = True,
) -> None:
    """Score a run's pairs: edit distances, lengths, reward margin, reference log-probs."""
    from curation.lm.loading import load_model, load_tokenizer
    from curation.reads import run_pair_texts, score_summary
    from curation.score.scoring import ScoringModels, score_run
    from curation.store import Catalog
    from training.models import resolve_model

    catalog = Catalog(workdir)
    run_id = run_id or _latest_run(workdir)
    pairs = run_pair_texts(catalog, run_id)
    model_path = str(resolve_model(model, pairs["prompt"].to_list(), pairs["chosen"].to_list(), workdir))
    use_reference = reference or margin == "reference"
    models = ScoringModels(load_tokenizer(model_path), model_path,
                           reference=load_model(model_path) if use_reference else None,
                           reference_name=model_path if use_reference else None)
    if reward_model:
        from transformers import AutoModelForSequenceClassification

        models.reward_model = AutoModelForSequenceClassification.from_pretrained(reward_model)
        models.reward_tokenizer = load_tokenizer(reward_model)
    if policy:
        models.policy = load_model(policy)
    result = score_run(catalog, run_id, models, ScoreOptions(margin=margin, max_length=max_length))
    print_frame(score_summary(catalog, result.run_id), title=f"scores of run {result.run_id}")


def _overrides(config_sets: list[str] | None, **flags) -> dict:  # noqa: ANN003
    from flows.config import parse_set

    overrides = parse_set(config_sets or [])
    overrides.update({k: v for k, v in flags.items() if v is not None})
    return overrides


def _run(flow_name: str, recipe: Path | None, overrides: dict, task_runner: str | None, **params) -> dict:  # noqa: ANN003
    from flows.pipeline import run_flow

    return run_flow(flow_name, str(recipe) if recipe else None, overrides, task_runner, **params)


Recipe = Annotated[Path | None, typer.Option("--config", "-c", help="YAML recipe (see flows/recipes/).")]
Sets = Annotated[list[str] | None, typer.Option("--set", help="Override a setting: --set train.learning_rate=1e-4.")]
Runner = Annotated[str | None, typer.Option("--task-runner", help="threads, processes, dask or ray.")]
Refresh = Annotated[bool, typer.Option("--refresh", help="Recompute every step instead of using cached results.")]


@app.command()
def curate(
    sources: Annotated[list[str], typer.Argument(help="Files, folders, globs, or hf:DATASET[:SPLIT].")],
    recipe: Recipe = None,
    sets: Sets = None,
    workdir: Annotated[Path | None, typer.Option("--workdir", "-w", help="Workspace folder.")] = None,
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    task_runner: Runner = None,
    refresh: Refresh = False,
) -> None:
    """Ingest, score, filter, stage and shard in one go (the `curate` flow)."""
    overrides = _overrides(sets, sources=list(sources), workdir=str(workdir) if workdir else None, model=model,
                           refresh=refresh or None)
    summary = _run("curate", recipe, overrides, task_runner)
    print_curation(summary)


def print_curation(summary: dict) -> None:
    import polars as pl

    console.print(f"[bold]run {summary['run_id']}[/]: kept {summary['kept']} of {summary['pairs']} pairs; "
                  f"stages {summary['stage_sizes']}")
    if summary.get("dropped"):
        print_frame(pl.DataFrame({"reason": list(summary["dropped"]), "pairs": list(summary["dropped"].values())}),
                    title="dropped, by reason")
    advice = summary.get("advice") or {}
    console.print(f"advice: [bold]{advice.get('objective')}[/] {advice.get('params') or ''} - {advice.get('rationale', '')}")
    console.print(f"shards: {summary['shard_dir']}\nreport: {summary.get('report')}")
    if summary.get("cached_tasks"):
        console.print(f"[dim]from cache: {', '.join(sorted(set(summary['cached_tasks'])))}[/]")


@app.command()
def report(
    run_id: Annotated[str | None, typer.Argument(help="Run id; default: the latest run.")] = None,
    workdir: Workdir = DEFAULT_WORKDIR,
) -> None:
    """Rebuild a run's markdown report and plots from the catalog."""
    from curation.report import build_report
    from curation.store import Catalog

    path = build_report(Catalog(workdir), run_id or _latest_run(workdir))
    console.print(f"report: {path}")


@app.command()
def train(
    shards: Annotated[Path, typer.Option("--shards", help="A curated run folder (or its shards/ folder).")],
    objective: Annotated[str | None, typer.Option(help=help_of(TrainConfig, "objective"))] = None,
    recipe: Recipe = None,
    sets: Sets = None,
    model: Annotated[str | None, typer.Option(help="Start/reference model; default: the one curation scored with.")] = None,
    workdir: Annotated[Path | None, typer.Option("--workdir", "-w", help="Workspace folder.")] = None,
    refresh: Refresh = False,
) -> None:
    """Train every sDPO stage of curated shards with the chosen objective (the `train` flow)."""
    if not shards.exists():
        raise WinnowError(f"{shards}: no such folder; pass a run folder written by `winnow curate`")
    workdir = workdir or (shards.parent if (shards / "shards").is_dir() else shards.parent.parent)
    overrides = _overrides(sets, **{"train.objective": objective, "model": model, "workdir": str(workdir),
                                    "refresh": refresh or None})
    summary = _run("train", recipe, overrides, None, shards=str(shards))
    print_training(summary)


def print_training(summary: dict) -> None:
    import polars as pl

    print_frame(pl.DataFrame(summary["stages"]).select("stage", "objective", "pairs", "reference_source",
                                                       "train_loss", "resumed", "model_dir"), title="sDPO stages")
    if summary.get("eval"):
        metrics = summary["eval"]
        print_frame(pl.DataFrame({"metric": list(metrics), "value": [float(v) for v in metrics.values()]}),
                    title="held-out evaluation (policy vs reference)")


@app.command()
def run(
    flow_name: Annotated[str, typer.Argument(metavar="FLOW", help="curate-and-train, curate or train.")],
    recipe: Recipe = None,
    sets: Sets = None,
    sources: Annotated[list[str] | None, typer.Option("--source", help="Input source (repeatable); default: the demo.")] = None,
    workdir: Annotated[Path | None, typer.Option("--workdir", "-w", help="Workspace folder.")] = None,
    objective: Annotated[str | None, typer.Option(help=help_of(TrainConfig, "objective"))] = None,
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    task_runner: Runner = None,
    refresh: Refresh = False,
    shards: Annotated[Path | None, typer.Option("--shards", help="For the train flow: a curated run folder.")] = None,
) -> None:
    """Run a flow directly, no server needed; flags override the recipe. With no --config and no
    --source it runs the demo with the demo recipe (flows/recipes/demo.yaml)."""
    overrides = _overrides(sets, sources=list(sources) if sources else None,
                           workdir=str(workdir) if workdir else None, model=model, refresh=refresh or None,
                           **{"train.objective": objective})
    params = {"shards": str(shards)} if flow_name == "train" else {}
    if flow_name == "train" and shards is None:
        raise WinnowError("the train flow needs --shards RUN_DIR")
    summary = _run(flow_name, recipe, overrides, task_runner, **params)
    if "kept" in summary:
        print_curation(summary)
    if "stages" in summary:
        print_training(summary)


@app.command()
def serve(
    recipe: Recipe = None,
    cron: Annotated[str | None, typer.Option(help="Cron schedule of the nightly deployment.")] = None,
) -> None:
    """Serve the curate-and-train deployments (nightly on a cron, on-demand) without a work pool."""
    from flows.serve import serve_deployments

    serve_deployments(str(recipe) if recipe else None, cron)


@app.command()
def gym(
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds (one data set and reference each).")] = "0,1,2",
    arms: Annotated[str | None, typer.Option(help="Comma-separated arms; default: all of them.")] = None,
    size: Annotated[int | None, typer.Option(help="Pairs per generated preference set.")] = None,
    noise_levels: Annotated[str | None, typer.Option(help="Comma-separated label-noise levels (shares of flipped "
                                                          "pairs), one run each; default 0,0.2,0.4.")] = None,
    epochs: Annotated[float | None, typer.Option(help="Budget: passes over the raw set, in optimizer steps.")] = None,
    learning_rate: Annotated[float | None, typer.Option(help="Learning rate of every arm.")] = None,
    workers: Annotated[int | None, typer.Option(help="Worker processes (0: run in this process).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Cut-down gym: checks the plumbing, proves nothing.")] = False,
    fresh: Annotated[bool, typer.Option("--fresh/--reuse", help="Start clean (default) or reuse cached models.")] = True,
    workdir: Annotated[Path, typer.Option("--workdir", "-w", help="Folder for the gym's runs.")] = Path("runs/gym"),
    out: Annotated[Path | None, typer.Option(help="Markdown report; default benchmarks/GYM.md "
                                                  "(<workdir>/GYM.md with --quick).")] = None,
) -> None:
    """Preference gym: every method side by side on a task with a known gold reward; writes the report."""
    import shlex

    from training.gym import (
        GymConfig,
        effects_table,
        evaluate_claims,
        markdown_table,
        run_gym,
        with_overrides,
        write_report,
    )

    seed_list = tuple(int(s) for s in seeds.split(",") if s.strip())
    arm_list = tuple(a.strip() for a in arms.split(",") if a.strip()) if arms else None
    try:
        levels = tuple(float(n) for n in noise_levels.split(",") if n.strip()) if noise_levels else None
        base = GymConfig.quick() if quick else GymConfig()
        config = with_overrides(base, seeds=seed_list, arms=arm_list, size=size, noise_levels=levels,
                                epochs=epochs, learning_rate=learning_rate, workers=workers)
    except ValueError as exc:
        raise WinnowError(str(exc)) from None
    out = out or (workdir / "GYM.md" if quick else Path("benchmarks/GYM.md"))
    result = run_gym(config, workdir, log=lambda line: console.print(line, highlight=False, markup=False), fresh=fresh)
    command = shlex.join(["winnow", *sys.argv[1:]])
    report = write_report(result, out, out.parent / out.stem.lower(), command)
    console.print(markdown_table(result), highlight=False, markup=False)
    console.print(effects_table(result), highlight=False, markup=False)
    for claim in evaluate_claims(result):
        console.print(f"[bold]{claim.verdict}[/]: {claim.statement}\n  {claim.evidence}", highlight=False)
    console.print(f"wall time {result.wall_seconds / 60:.1f} min; report {report}; per-seed numbers and catalogs "
                  f"under {workdir}")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2."""
    from flows.prefect_env import configure_prefect

    configure_prefect()  # before any command imports Prefect
    message, code = None, 0
    try:
        app()
    except WinnowError as exc:
        message, code = str(exc), 2
    except KeyboardInterrupt:
        code = 130
    # Exit outside the except block: the failed frames (and the DuckDB handles they hold)
    # are released before interpreter shutdown.
    if message is not None:
        err_console.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
