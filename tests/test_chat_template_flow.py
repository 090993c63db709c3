"""`winnow run curate-and-train` on a set in the shape of trl-lib/ultrafeedback_binarized.

The done-when of conversational data: the whole flow (ingest, the default winnow-tiny model with
its chat template, scoring on the template, held-out split, shards, two sDPO stages, evaluation)
with stage 1 reusing curation's reference log-probs, the shards' numbers equal to TRL's own
precompute pass on them, stage 2's recomputed ones equal to TRL's with the stage-1 model, and
evaluation on the held-out prompts. Marked slow (about a minute of CPU); tests/test_chat_template_pipeline.py
checks the same numbers in the library, in the default suite.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from curation.store import Catalog
from tests.chat_families import trl_prepared, ultrafeedback_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def prefect_api():  # noqa: ANN201
    from prefect.testing.utilities import prefect_test_harness

    from flows.prefect_env import configure_prefect

    configure_prefect()
    os.environ["WINNOW_NO_PROGRESS"] = "1"
    with prefect_test_harness(server_startup_timeout=120):
        yield


def test_ultrafeedback_shaped_set_through_curate_and_train(tmp_path: Path) -> None:
    from datasets import Dataset

    from curation.lm.loading import load_model, load_tokenizer
    from flows.pipeline import run_flow

    source = tmp_path / "ultrafeedback_binarized.jsonl"
    rows = ultrafeedback_rows(160, seed=3)
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = {
        "sources": [str(source)], "workdir": str(tmp_path / "runs"),
        "tiny": {"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "sft_steps": 15, "sft_batch_size": 32},
        "train": {"batch_size": 16, "logging_steps": 2},
        "score": {"max_length": 128},
        "curate": {"heldout": {"share": 0.1}},
        "eval": {"prompts": 6, "heldout_pairs": 12, "max_new_tokens": 8},
    }
    summary = run_flow("curate-and-train", None, overrides)
    assert [s["reference_source"] for s in summary["stages"]] == ["curation", "recomputed"]
    catalog = Catalog(tmp_path / "runs")
    run_id = summary["run_id"]
    pairs, quarantined = (catalog.query(f"SELECT count(*) FROM {t} WHERE run_id = ?", [run_id]).item()
                          for t in ("pairs", "quarantine"))
    assert pairs + quarantined == len(rows)  # every row accounted for (duplicates quarantined)

    manifest = json.loads((Path(summary["shard_dir"]) / "manifest.json").read_text())
    assert manifest["conversational"] and manifest["ref_logps_included"]
    model_path = summary["model_path"]
    base, tokenizer = load_model(model_path, device="cpu"), load_tokenizer(model_path)
    stage_models = [Path(s["model_dir"]) for s in summary["stages"]]
    for stage, reference in ((1, base), (2, load_model(stage_models[0], device="cpu"))):
        shard = pl.read_parquet(Path(summary["shard_dir"]) / f"stage-{stage}.parquet")
        trl_ds, _ = trl_prepared(reference, tokenizer, Dataset.from_polars(
            shard.drop("pair_id", "ref_chosen_logps", "ref_rejected_logps")), tmp_path / f"trl-{stage}", 128)
        used = shard if stage == 1 else pl.read_parquet(stage_models[1].parent / "reference_logps.parquet")
        assert used["pair_id"].to_list() == shard["pair_id"].to_list()
        for side in ("chosen", "rejected"):
            np.testing.assert_allclose(used[f"ref_{side}_logps"].to_numpy(), np.array(trl_ds[f"ref_{side}_logps"]),
                                       atol=1e-4)

    evals = catalog.query("SELECT metric, details FROM evals WHERE run_id = ?", [run_id])
    assert {"implicit_acc", "kl", "len_tokens"} <= set(evals["metric"])
    assert all(json.loads(d)["heldout"] is True for d in evals["details"])
    held = catalog.query("SELECT count(*) FROM decisions WHERE run_id = ? AND reason = 'heldout'", [run_id]).item()
    assert held > 0
    report = Path(summary["report"]).read_text()
    assert "## Lengths" in report and "Held out for evaluation" in report
