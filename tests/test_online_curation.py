"""Online curation between sDPO stages (training/online.py), against an independent computation.

A real pipeline slice: generated sorting pairs (20% flipped labels, ratings) ingested into a
catalog, scored with a 1-layer winnow-tiny reference, curated into 3 stages; then train_stages
with ``online_curation`` on. Each round's pool, margins, kept set and stages are recomputed
here from first principles: log-probs of the stage's model by the fast scorer, the implicit
reward gap written out, the median/MAD Gaussian weights and the top-k cut written out.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

from curation.decide import CurateConfig, curate
from curation.errors import WinnowError
from curation.lm.loading import load_model, load_tokenizer
from curation.manifest import ShardManifest
from curation.reads import PAIR_ROUNDS_SQL, pair_rounds, round_summary
from curation.stage import StageConfig
from curation.store import Catalog
from tests.test_trainer import MAX_LENGTH, tiny_model, with_reference
from training.config import TrainConfig
from training.online import OnlineContext
from training.sorting import TRUTH_COLUMNS, PreferenceSetConfig, generate_preferences
from training.stages import REFERENCE_LOGPS_FILE, train_stages

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_torch_thread")
STAGES = 3


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Ingest, score and curate 150 pairs into 3 stages, as the pipeline does, then train with online rounds."""
    from curation.ingest import ingest
    from curation.score.scoring import ScoreOptions, ScoringModels, score_run

    root = tmp_path_factory.mktemp("online")
    model_dir = tiny_model(root / "tiny")
    source = root / "pairs.jsonl"
    generate_preferences(PreferenceSetConfig(size=150, seed=8, label_noise=0.2)).drop(TRUTH_COLUMNS).write_ndjson(source)
    catalog = Catalog(root)
    run_id = ingest([str(source)], catalog, progress=False).run_id
    models = ScoringModels(load_tokenizer(model_dir), str(model_dir), reference=load_model(model_dir, device="cpu"),
                           reference_name=str(model_dir))
    score_run(catalog, run_id, models, ScoreOptions(max_length=MAX_LENGTH), progress=False)
    curated = curate(catalog, run_id, CurateConfig(stages=StageConfig(k=STAGES), report=False))
    config = TrainConfig(objective="dpo", batch_size=8, logging_steps=2, learning_rate=1e-3, online_curation=True)
    out = root / "train"
    results = train_stages(curated.shard_dir, model_dir, out, config, progress=False,
                           online=OnlineContext(catalog, run_id))
    return {"catalog": catalog, "run_id": run_id, "model_dir": model_dir, "shard_dir": curated.shard_dir,
            "out": out, "results": results, "config": config}


def _rounds(run: dict[str, Any]) -> pl.DataFrame:
    return run["catalog"].query("SELECT * FROM decision_rounds WHERE run_id = ? ORDER BY round, pair_id",
                                [run["run_id"]])


def _stage_ids(run: dict[str, Any], stage: int) -> list[str]:
    return pl.read_parquet(run["out"] / f"stage-{stage}" / REFERENCE_LOGPS_FILE)["pair_id"].to_list()


def _expected_round(run: dict[str, Any], round_no: int, pool_ids: list[str], places: list[int]) -> pl.DataFrame:
    """The round recomputed by hand: margins of the stage-`round_no` model against the base reference, the
    beta-guided filter (median/MAD weights, the `sum(places)` heaviest kept), stages by margin, largest first."""
    catalog, run_id = run["catalog"], run["run_id"]
    pool = catalog.query("SELECT p.pair_id, p.prompt, p.chosen, p.rejected, s.ref_chosen_logps, s.ref_rejected_logps "
                         "FROM pairs p JOIN scores s USING (run_id, pair_id) WHERE p.run_id = ?", [run_id])
    pool = pool.filter(pl.col("pair_id").is_in(pool_ids)).sort("pair_id")
    stage_model = run["out"] / f"stage-{round_no}" / "model"
    policy = with_reference(pool.select("pair_id", "prompt", "chosen", "rejected"), load_model(stage_model, device="cpu"),
                            load_tokenizer(stage_model))
    beta = 0.1  # objective dpo
    margin = beta * ((policy["ref_chosen_logps"] - pool["ref_chosen_logps"])
                     - (policy["ref_rejected_logps"] - pool["ref_rejected_logps"])).to_numpy()
    centre = float(np.median(margin))
    scale = 1.4826 * float(np.median(np.abs(margin - centre)))
    weight = np.exp(-0.5 * ((margin - centre) / scale) ** 2)
    keep = np.zeros(margin.size, bool)
    keep[np.argsort(-weight, kind="stable")[: sum(places)]] = True
    frame = pool.select("pair_id").with_columns(margin=pl.Series(margin), weight=pl.Series(weight),
                                                kept=pl.Series(keep), policy_chosen=policy["ref_chosen_logps"])
    order = frame.filter(pl.col("kept")).sort(["margin", "pair_id"], descending=[True, False])
    stages = np.repeat(np.arange(round_no + 1, round_no + 1 + len(places)), places)
    return frame.join(order.select("pair_id").with_columns(stage=pl.Series(stages, dtype=pl.Int32)),
                      on="pair_id", how="left")


def test_each_round_is_the_policy_margin_and_the_beta_filter_written_out(run: dict[str, Any]) -> None:
    catalog, run_id = run["catalog"], run["run_id"]
    manifest = ShardManifest.load(run["shard_dir"])
    sizes = {s.stage: s.rows for s in manifest.stages}
    rounds = _rounds(run)
    assert sorted(rounds["round"].unique().to_list()) == [1, 2]
    beta_dropped = catalog.query("SELECT pair_id FROM decisions WHERE run_id = ? AND reason LIKE 'beta_outlier%'",
                                 [run_id])["pair_id"].to_list()
    assert beta_dropped  # the offline filter dropped pairs the rounds may bring back
    stage1 = set(_stage_ids(run, 1))
    shard_ids = {s: pl.read_parquet(manifest.shard_path(e))["pair_id"].to_list() for s, e in
                 ((e.stage, e) for e in manifest.stages)}
    assert set(shard_ids[1]) == stage1  # stage 1 is curation's
    pool = sorted({*shard_ids[2], *shard_ids[3], *beta_dropped})
    for round_no, places in ((1, [sizes[2], sizes[3]]), (2, [sizes[3]])):
        got = rounds.filter(pl.col("round") == round_no).sort("pair_id")
        taught = set().union(*(set(_stage_ids(run, s)) for s in range(1, round_no + 1)))
        ids = [p for p in pool if p not in taught]
        assert got["pair_id"].to_list() == ids  # every untaught candidate, and only those
        want = _expected_round(run, round_no, ids, places)
        np.testing.assert_allclose(got["margin"].to_numpy(), want["margin"].to_numpy(), atol=2e-4)
        np.testing.assert_allclose(got["weight"].to_numpy(), want["weight"].to_numpy(), atol=1e-3)
        assert got["kept"].to_list() == want["kept"].to_list()
        assert got["stage"].to_list() == want["stage"].to_list()
        assert got["kept"].sum() == sum(places)  # the share dropped does not grow
        assert set(got.filter(~pl.col("kept"))["reason"]) <= {"beta_outlier_low", "beta_outlier_high"}
        assert set(got["scoring_model"]) == {str(run["out"] / f"stage-{round_no}" / "model")}
        assert set(got["margin_source"]) == {"policy"}
        # the stage after the round trains on exactly the round's choice, in its order
        trained = _stage_ids(run, round_no + 1)
        assert trained == got.filter(pl.col("stage") == round_no + 1).sort("stage_position")["pair_id"].to_list()
        # ... against the stage-k model's log-probs, which the round computed (no second reference pass)
        ref = pl.read_parquet(run["out"] / f"stage-{round_no + 1}" / REFERENCE_LOGPS_FILE)
        by_id = dict(zip(want["pair_id"], want["policy_chosen"], strict=True))
        assert max(abs(a - by_id[p]) for p, a in zip(ref["pair_id"], ref["ref_chosen_logps"], strict=True)) < 1e-4
    assert [r.reference_source for r in run["results"]] == ["curation", "online", "online"]
    # previous_kept: round 1 compares with curation, round 2 with round 1
    r1 = rounds.filter(pl.col("round") == 1)
    assert r1["previous_kept"].to_list() == r1["pair_id"].is_in(shard_ids[2] + shard_ids[3]).to_list()
    r2 = rounds.filter(pl.col("round") == 2)
    later = r1.filter(pl.col("stage") == 3)["pair_id"].to_list()
    assert r2["previous_kept"].to_list() == r2["pair_id"].is_in(later).to_list()


def test_a_pairs_margin_and_fate_over_the_rounds_is_one_query(run: dict[str, Any]) -> None:
    catalog, run_id = run["catalog"], run["run_id"]
    rounds = _rounds(run)
    moved = rounds.filter(pl.col("round") == 2)["pair_id"][0]
    history = pair_rounds(catalog, run_id, moved[:12])
    assert history["round"].to_list() == [0, 1, 2] and set(history["pair_id"]) == {moved}
    assert history["margin_source"].to_list() == ["scores", "policy", "policy"]
    assert history["margin"][1] == pytest.approx(rounds.filter((pl.col("round") == 1) & (pl.col("pair_id") == moved))
                                                 ["margin"].item())
    # the same SQL a user types (README), through the read-only query path
    user = catalog.query(PAIR_ROUNDS_SQL.replace("?", f"'{run_id}'", 1).replace("?", f"'{moved[:8]}'", 1)
                         .replace("?", f"'{run_id}'", 1).replace("?", f"'{moved[:8]}'", 1))
    assert user["round"].to_list() == [0, 1, 2]
    summary = round_summary(catalog, run_id)
    for row in summary.iter_rows(named=True):
        got = rounds.filter(pl.col("round") == row["round"])
        assert row["pairs"] == got.height and row["kept"] == got["kept"].sum()
        assert row["readmitted"] == (got["kept"] & ~got["previous_kept"]).sum()
        assert row["newly_dropped"] == (~got["kept"] & got["previous_kept"]).sum()
    assert summary["readmitted"].sum() + summary["newly_dropped"].sum() > 0  # the policy changed some fates


def test_resume_keeps_the_rounds_and_off_means_no_rounds(run: dict[str, Any], tmp_path: Path) -> None:
    before = _rounds(run)
    again = train_stages(run["shard_dir"], run["model_dir"], run["out"], run["config"], progress=False,
                         online=OnlineContext(run["catalog"], run["run_id"]))
    assert [r.resumed for r in again] == [True, True, True]
    assert _rounds(run).equals(before)
    with pytest.raises(WinnowError, match="online curation cannot run: it needs the run's catalog") as err:
        train_stages(run["shard_dir"], run["model_dir"], tmp_path / "no-catalog", run["config"], progress=False)
    assert "\n" not in str(err.value)


def test_auto_runs_where_it_can_and_is_the_default(run: dict[str, Any], tmp_path: Path) -> None:
    """The gym made online curation the default ("auto"): on with the run's catalog, skipped with a warning
    (training as curated) without one, or when the catalog does not know the run."""
    assert TrainConfig().online_curation == "auto"
    auto = TrainConfig(objective="dpo", batch_size=8, logging_steps=2, learning_rate=1e-3, max_stages=2)
    with pytest.warns(UserWarning, match="online curation skipped: it needs the run's catalog"):
        alone = train_stages(run["shard_dir"], run["model_dir"], tmp_path / "alone", auto, progress=False)
    assert [r.reference_source for r in alone] == ["curation", "recomputed"]
    stranger = OnlineContext(Catalog(tmp_path / "other-workspace"), run["run_id"])
    with pytest.warns(UserWarning, match="holds no curation decisions"):
        train_stages(run["shard_dir"], run["model_dir"], tmp_path / "stranger", auto, progress=False, online=stranger)
    with_catalog = train_stages(run["shard_dir"], run["model_dir"], tmp_path / "auto", auto, progress=False,
                                online=OnlineContext(run["catalog"], run["run_id"]))
    assert [r.reference_source for r in with_catalog] == ["curation", "online"]


def test_the_pipeline_task_passes_the_catalog(run: dict[str, Any], tmp_path: Path) -> None:
    """flows.tasks.train_task hands train_stages the run's catalog, so online rounds land in it."""
    from flows.config import PipelineConfig
    from flows.tasks import train_task

    catalog, run_id = run["catalog"], run["run_id"]
    with catalog.transaction() as con:  # start from no rounds, so the task's own rows are what we see
        con.execute("DELETE FROM decision_rounds WHERE run_id = ?", [run_id])
    config = PipelineConfig(workdir=str(catalog.workdir), train=TrainConfig(  # online curation: the default
        objective="dpo", batch_size=8, logging_steps=2, learning_rate=1e-3, max_stages=2))
    out = train_task.fn(config, run_id, str(run["shard_dir"]), str(run["model_dir"]))
    assert [s["reference_source"] for s in out["stages"]] == ["curation", "online"]
    rounds = _rounds(run)
    assert set(rounds["round"]) == {1} and rounds["kept"].sum() > 0
    stored = json.loads(catalog.query("SELECT config FROM runs WHERE run_id = ?", [run_id]).item())
    assert stored["train"]["online_curation"] == "auto"


def test_report_shows_the_total_share_dropped_and_where(run: dict[str, Any]) -> None:
    from curation.reads import report_tables
    from curation.report_doc import Report, render_markdown
    from curation.report_filtering import filtering_section

    catalog, run_id = run["catalog"], run["run_id"]
    section = render_markdown(Report("r", "", [filtering_section(run_id, report_tables(catalog, run_id))]))
    assert "## What was dropped, and where" in section  # the report's section (plots skipped)
    decisions = catalog.query("SELECT kept, reason FROM decisions WHERE run_id = ?", [run_id])
    total = decisions.height
    beta = decisions["reason"].str.starts_with("beta_outlier").sum()
    heldout = (decisions["reason"] == "heldout").sum()
    screened = decisions["reason"].is_in(["near_duplicate", "near_contradiction", "contaminated"]).sum()
    ruled = (~decisions["kept"]).sum() - beta - heldout - screened
    advice = json.loads(catalog.query("SELECT evidence FROM advice WHERE run_id = ?", [run_id]).item())["filtering"]
    in_batch = decisions["kept"].sum() * (1 - (advice["in_batch_keep"] if advice["in_batch_keep"] is not None else 1))
    assert f"| beta-guided filter (offline) | {beta} | {beta / total:.1%} |" in section
    assert f"| rule filters (offline) | {ruled} | {ruled / total:.1%} |" in section
    assert f"| held out for evaluation | {heldout} | {heldout / total:.1%} |" in section
    assert f"**{(ruled + beta + heldout + screened + in_batch) / total:.1%}**" in section
    rounds = round_summary(catalog, run_id)
    assert rounds.height >= 1
    for r in rounds.to_dicts():
        assert (f"| online round {r['round']} (after stage {r['round']}) | 0 | 0.0% | re-decided {r['pairs']} pairs: "
                f"{r['readmitted']} re-admitted, {r['newly_dropped']} newly dropped") in section
    assert f"Policy `{advice['policy']}`" in section
