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

from curation.config_fields import default_of, help_of
from curation.errors import WinnowError
from curation.export import ExportOptions
from curation.ingest import IngestOptions
from curation.ingest.multi_response import Pairing, PreferenceLabel, Rating
from curation.ingest.shapes import Format
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
Columns = Annotated[str | None, typer.Option("--columns", metavar="TARGET=COLUMN,...",
                                             help=help_of(IngestOptions, "columns"))]
DEFAULT_WORKDIR = Path("runs")


JsonFlag = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout (for scripts); "
                                                      "progress goes to stderr.")]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Show every library's output: Prefect INFO logs, "
                                                              "their progress bars, warnings.")]


def print_frame(frame, title: str | None = None, csv: bool = False) -> None:  # noqa: ANN001 - polars frame
    """Render a polars frame as a table that never cuts a value (or CSV for scripts)."""
    from flows.display import print_frame as show

    if csv:
        sys.stdout.write(frame.write_csv())
        return
    show(frame, console, title=title)


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
    columns: Columns = None,
    pairing: Annotated[Pairing, typer.Option(help=help_of(IngestOptions, "pairing"))] = default_of(
        IngestOptions, "pairing"),
    rating: Annotated[Rating, typer.Option(help=help_of(IngestOptions, "rating"))] = default_of(IngestOptions, "rating"),
    min_rating_gap: Annotated[float, typer.Option(help=help_of(IngestOptions, "min_rating_gap"))] = default_of(
        IngestOptions, "min_rating_gap"),
    preference_label: Annotated[PreferenceLabel, typer.Option(help=help_of(IngestOptions, "preference_label"))] = (
        default_of(IngestOptions, "preference_label")),
    as_json: JsonFlag = False,
) -> None:
    """Read preference pairs into the catalog and print the accounting table (shapes: docs/datasets.md)."""
    from curation.ingest import ingest as run_ingest
    from curation.ingest.mapping import parse_columns
    from curation.paths import check_run_id
    from curation.store import Catalog
    from flows.display import Output, accounting_document, render_accounting

    if run_id is not None:
        check_run_id(run_id)
    options = IngestOptions(format=format, max_bad_fraction=max_bad_fraction, max_bytes=max_bytes,
                            columns=parse_columns(columns), pairing=pairing, rating=rating,
                            min_rating_gap=min_rating_gap, preference_label=preference_label)
    out = Output(as_json, console=None if as_json else console)
    with out.work(steps=False):
        result = run_ingest(sources, Catalog(workdir), options, run_id=run_id)
    out.result(accounting_document(result), lambda c: render_accounting(result, c))


@app.command()
def query(
    sql: Annotated[str, typer.Argument(help="SQL over the catalog tables (read-only).")],
    workdir: Workdir = DEFAULT_WORKDIR,
    csv: Annotated[bool, typer.Option("--csv", help="Print CSV instead of a table.")] = False,
    as_json: JsonFlag = False,
) -> None:
    """Run read-only SQL against the catalog and print the result.

    DuckDB runs it with external access off and its configuration locked: it reads the catalog
    and nothing else (no files, no network, no extensions); a refused statement gets one line.
    """
    from curation.store import Catalog

    frame = Catalog(workdir).query(sql)
    if as_json:
        from flows.display import Output

        Output(True).result({"columns": frame.columns, "rows": frame.to_dicts()}, lambda c: None)
        return
    print_frame(frame, csv=csv)


def _latest_run(workdir: Path) -> str:
    from curation.reads import latest_run_id
    from curation.store import Catalog

    run_id = latest_run_id(Catalog(workdir))
    if run_id is None:
        raise WinnowError(f"no runs in {workdir}: run `winnow ingest` or `winnow curate` first")
    return run_id


def _existing_run(workdir: Path, run_id: str | None) -> str:
    """The named run (its id checked, and present in the catalog), or the latest one."""
    from curation.paths import check_run_id
    from curation.store import Catalog

    if run_id is None:
        return _latest_run(workdir)
    check_run_id(run_id)
    if not Catalog(workdir).run_exists(run_id):
        raise WinnowError(f"no run {run_id!r} in {workdir}: pass a run id from its `runs` table, or none for the "
                          "latest run")
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
    from curation.locks import run_lock
    from curation.paths import run_dir
    from curation.store import Catalog

    run_id = _existing_run(workdir, run_id)
    with run_lock(run_dir(workdir, run_id)):  # a run of the same id may be scoring it right now
        _score(Catalog(workdir), run_id, workdir, model, margin, reward_model, policy, max_length, reference)


def _score(catalog, run_id: str, workdir: Path, model: str, margin: str, reward_model: str | None,  # noqa: ANN001
           policy: str | None, max_length: int, reference: bool) -> None:
    from curation.lm.loading import load_model, load_tokenizer
    from curation.reads import run_pair_texts, score_summary
    from curation.score.scoring import ScoringModels, score_run
    from training.models import resolve_model

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


def _run(flow_name: str, recipe: Path | None, overrides: dict, task_runner: str | None, as_json: bool = False,
         verbose: bool = False, **params) -> dict:  # noqa: ANN003
    """Run a flow under the live display; prints its summary (or, with --json, its JSON document)."""
    from flows.display import Output, render_summary

    out = Output(as_json, verbose, console=None if as_json else console)
    with out.work():
        from flows.pipeline import run_flow

        summary = run_flow(flow_name, str(recipe) if recipe else None, overrides, task_runner, **params)
    out.result(summary, lambda c: render_summary(summary, c, catalog=_catalog_path(summary, overrides)))
    return summary


def _catalog_path(summary: dict, overrides: dict) -> str | None:
    workdir = overrides.get("workdir") or (Path(summary["shard_dir"]).parents[1] if summary.get("shard_dir") else None)
    return str(Path(workdir) / "catalog.duckdb") if workdir else None


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
    columns: Columns = None,
    task_runner: Runner = None,
    refresh: Refresh = False,
    as_json: JsonFlag = False,
    verbose: Verbose = False,
) -> None:
    """Ingest, score, filter, stage and shard in one go (the `curate` flow)."""
    overrides = _overrides(sets, sources=list(sources), workdir=str(workdir) if workdir else None, model=model,
                           refresh=refresh or None, **_columns_override(columns))
    _run("curate", recipe, overrides, task_runner, as_json, verbose)


def _columns_override(columns: str | None) -> dict:
    """--columns as the `ingest.columns` setting (a mapping), parsed and checked here."""
    from curation.ingest.mapping import parse_columns

    return {"ingest.columns": parse_columns(columns)} if columns else {}


@app.command()
def report(
    run_id: Annotated[str | None, typer.Argument(help="Run id; default: the latest run.")] = None,
    workdir: Workdir = DEFAULT_WORKDIR,
) -> None:
    """Rebuild a run's markdown report and plots from the catalog."""
    from curation.report import build_report
    from curation.store import Catalog

    path = build_report(Catalog(workdir), _existing_run(workdir, run_id))
    console.print(f"report: {path.with_suffix('.html')}\n        {path}", highlight=False, soft_wrap=True)


@app.command()
def export(
    run_id: Annotated[str | None, typer.Argument(help="Run id; default: the latest run.")] = None,
    to: Annotated[str, typer.Option("--to", help="A folder (a datasets folder and JSONL are written in it) or "
                                                 "hf:OWNER/NAME (push_to_hub).")] = "",
    stage: Annotated[int | None, typer.Option(help=help_of(ExportOptions, "stage"))] = None,
    per_stage: Annotated[bool, typer.Option("--per-stage", help=help_of(ExportOptions, "per_stage"))] = False,
    curation_columns: Annotated[bool, typer.Option("--curation-columns",
                                                   help=help_of(ExportOptions, "curation_columns"))] = False,
    public: Annotated[bool, typer.Option("--public", help="hf:NAME only: a public hub dataset (default private).")] = False,
    workdir: Workdir = DEFAULT_WORKDIR,
    as_json: JsonFlag = False,
) -> None:
    """Export a run's kept pairs (TRL's columns, teaching order) as a datasets folder and JSONL, or to the hub."""
    from curation.export import export_run
    from curation.store import Catalog
    from flows.display import Output, render_export

    if not to:
        raise WinnowError("export needs --to DIR or --to hf:OWNER/NAME")
    options = ExportOptions(stage=stage, per_stage=per_stage, curation_columns=curation_columns, private=not public)
    out = Output(as_json, console=None if as_json else console)
    with out.work(steps=False):
        result = export_run(Catalog(workdir), _existing_run(workdir, run_id), to, options)
    out.result(result.to_dict(), lambda c: render_export(result, c))


@app.command()
def train(
    shards: Annotated[Path, typer.Option("--shards", help="A curated run folder (or its shards/ folder).")],
    objective: Annotated[str | None, typer.Option(help=help_of(TrainConfig, "objective"))] = None,
    recipe: Recipe = None,
    sets: Sets = None,
    model: Annotated[str | None, typer.Option(help="Start/reference model; default: the one curation scored with.")] = None,
    workdir: Annotated[Path | None, typer.Option("--workdir", "-w", help="Workspace folder.")] = None,
    refresh: Refresh = False,
    as_json: JsonFlag = False,
    verbose: Verbose = False,
) -> None:
    """Train every sDPO stage of curated shards with the chosen objective (the `train` flow)."""
    if not shards.exists():
        raise WinnowError(f"{shards}: no such folder; pass a run folder written by `winnow curate`")
    workdir = workdir or (shards.parent if (shards / "shards").is_dir() else shards.parent.parent)
    overrides = _overrides(sets, **{"train.objective": objective, "model": model, "workdir": str(workdir),
                                    "refresh": refresh or None})
    _run("train", recipe, overrides, None, as_json, verbose, shards=str(shards))


@app.command()
def run(
    flow_name: Annotated[str, typer.Argument(metavar="FLOW", help="curate-and-train, curate or train.")],
    recipe: Recipe = None,
    sets: Sets = None,
    sources: Annotated[list[str] | None, typer.Option("--source", help="Input source (repeatable); default: the demo.")] = None,
    workdir: Annotated[Path | None, typer.Option("--workdir", "-w", help="Workspace folder.")] = None,
    objective: Annotated[str | None, typer.Option(help=help_of(TrainConfig, "objective"))] = None,
    model: Annotated[str | None, typer.Option(help=MODEL_HELP)] = None,
    columns: Columns = None,
    task_runner: Runner = None,
    refresh: Refresh = False,
    shards: Annotated[Path | None, typer.Option("--shards", help="For the train flow: a curated run folder.")] = None,
    as_json: JsonFlag = False,
    verbose: Verbose = False,
) -> None:
    """Run a flow directly, no server needed; flags override the recipe. With no --config and no
    --source it runs the demo with the demo recipe (flows/recipes/demo.yaml)."""
    overrides = _overrides(sets, sources=list(sources) if sources else None,
                           workdir=str(workdir) if workdir else None, model=model, refresh=refresh or None,
                           **{"train.objective": objective}, **_columns_override(columns))
    params = {"shards": str(shards)} if flow_name == "train" else {}
    if flow_name == "train" and shards is None:
        raise WinnowError("the train flow needs --shards RUN_DIR")
    _run(flow_name, recipe, overrides, task_runner, as_json, verbose, **params)


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
    """Entry point: user errors become one line on stderr and exit code 2.

    A full disk, a read-only or a forbidden folder is the user's to fix as well: one line
    (curation.paths.fault_message), not a traceback.
    """
    from curation.paths import fault_message
    from flows.prefect_env import configure_prefect

    configure_prefect()  # before any command imports Prefect
    message, code = None, 0
    try:
        app()
    except WinnowError as exc:
        message, code = str(exc), 2
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:
        message = fault_message(exc)
        if message is None:
            raise
        code = 2
    # Exit outside the except block: the failed frames (and the DuckDB handles they hold)
    # are released before interpreter shutdown.
    if message is not None:
        err_console.print(f"[red]error:[/] {message}", highlight=False, soft_wrap=True)
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    main()
