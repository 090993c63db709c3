"""A conversational set end to end in the library: ingest, score on the chat template, held-out split,
shards with reference log-probs, stage 1 reusing them, and every number equal to TRL's own.

The set has the exact row shape of trl-lib/ultrafeedback_binarized (``chosen``/``rejected`` message
lists with the user turn first, ``score_chosen``/``score_rejected``, no prompt column); the model is
a tiny Qwen2 with the Qwen2.5 chat template, saved to a folder and loaded back as a run loads it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest

os.environ.setdefault("TQDM_DISABLE", "1")

from curation.store import Catalog  # noqa: E402
from tests.chat_families import FAMILIES, build_family, datasets_cache, trl_prepared, ultrafeedback_rows  # noqa: E402

MAX_LENGTH = 128  # the Qwen system prompt takes ~90 tokens: the two-turn pairs are cut


@pytest.fixture(scope="module")
def curated(tmp_path_factory, one_torch_thread):  # noqa: ANN001, ANN201
    """(catalog, run_id, curate result, model, tokenizer, model folder) of the fixture set."""
    from curation.decide import CurateConfig, curate
    from curation.heldout import HeldoutConfig
    from curation.ingest import ingest
    from curation.near_dup import NearDupConfig
    from curation.score.scoring import ScoreOptions, ScoringModels, score_run
    from curation.stage import StageConfig

    root = tmp_path_factory.mktemp("uf")
    source = root / "ultrafeedback.jsonl"
    rows = ultrafeedback_rows(60)
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    family = FAMILIES["qwen2"]
    texts = [m["content"] for r in rows for m in r["chosen"] + r["rejected"]] * 3 + [family.template]
    model, tokenizer = build_family(family, texts, folder=root / "model")
    catalog = Catalog(root / "runs")
    run_id = ingest([str(source)], catalog, progress=False).run_id
    models = ScoringModels(tokenizer, str(root / "model"), reference=model, reference_name=str(root / "model"))
    score_run(catalog, run_id, models, ScoreOptions(max_length=MAX_LENGTH), progress=False)
    # the generated prompts differ by one topic word, which the near-duplicate step rightly clusters; here the
    # subject is the chat template, so every pair stays in
    result = curate(catalog, run_id, CurateConfig(heldout=HeldoutConfig(share=0.1, seed=1), stages=StageConfig(k=2),
                                                  near_dup=NearDupConfig(enabled=False)))
    return catalog, run_id, result, model, tokenizer, root / "model"


def _shard_dataset(path: Path, drop_ref: bool):  # noqa: ANN202
    from datasets import Dataset

    frame = pl.read_parquet(path).drop("pair_id")
    return Dataset.from_polars(frame.drop("ref_chosen_logps", "ref_rejected_logps") if drop_ref else frame)


def test_conversational_shards_carry_template_logps(curated) -> None:  # noqa: ANN001
    _, _, result, _, _, _ = curated
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["conversational"] is True and manifest["ref_logps_included"] is True
    assert "chat template" in manifest["ref_logps_note"]
    table = pl.read_parquet(result.shard_dir / "stage-1.parquet")
    assert table.columns == ["prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps", "pair_id"]
    assert table.schema["prompt"] != pl.String  # message lists, as TRL reads them


def test_scores_and_shard_logps_equal_trl_on_the_shard(curated, tmp_path) -> None:  # noqa: ANN001
    """TRL's own _prepare_dataset and precompute pass on each shard: our token counts and log-probs are its."""
    catalog, run_id, result, model, tokenizer, _ = curated
    scores = catalog.query("SELECT pair_id, prompt_tokens, chosen_tokens, rejected_tokens, chosen_truncated "
                           "FROM scores WHERE run_id = ?", [run_id])
    checked = truncated = 0
    for shard in sorted(result.shard_dir.glob("stage-*.parquet")):
        frame = pl.read_parquet(shard)
        trl_ds, collator = trl_prepared(model, tokenizer, _shard_dataset(shard, drop_ref=True), tmp_path / shard.stem,
                                        max_length=MAX_LENGTH)
        assert len(trl_ds) == frame.height
        np.testing.assert_allclose(frame["ref_chosen_logps"].to_numpy(), np.array(trl_ds["ref_chosen_logps"]), atol=1e-4)
        np.testing.assert_allclose(frame["ref_rejected_logps"].to_numpy(), np.array(trl_ds["ref_rejected_logps"]),
                                   atol=1e-4)
        ours = frame.select("pair_id").join(scores, on="pair_id", how="left", maintain_order="left")
        assert ours["prompt_tokens"].to_list() == [len(p) for p in trl_ds["prompt_ids"]]
        assert ours["chosen_tokens"].to_list() == [len(c) for c in trl_ds["chosen_ids"]]
        assert ours["rejected_tokens"].to_list() == [len(r) for r in trl_ds["rejected_ids"]]
        batch = collator([{k: trl_ds[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                          for i in range(len(trl_ds))])
        kept = batch["completion_mask"].chunk(2)[0].sum(1).numpy()
        np.testing.assert_array_equal(ours["chosen_truncated"].to_numpy(),
                                      kept < np.array([len(c) for c in trl_ds["chosen_ids"]]))
        checked += frame.height
        truncated += int(ours["chosen_truncated"].sum())
    assert checked == result.kept and truncated > 0  # max_length cuts some pairs: the flags are exercised


def test_heldout_prompts_never_reach_a_shard(curated) -> None:  # noqa: ANN001
    catalog, run_id, result, _, _, _ = curated
    held = catalog.query("SELECT d.pair_id, p.prompt FROM decisions d JOIN pairs p USING (run_id, pair_id) "
                         "WHERE d.run_id = ? AND d.reason = 'heldout'", [run_id])
    assert held.height >= 6  # ceil(10% of the prompts), some of them with several pairs
    shards = pl.concat([pl.read_parquet(p).select("pair_id") for p in result.shard_dir.glob("stage-*.parquet")])
    assert not set(held["pair_id"]) & set(shards["pair_id"])
    trained = catalog.query("SELECT p.prompt FROM decisions d JOIN pairs p USING (run_id, pair_id) "
                            "WHERE d.run_id = ? AND d.reason != 'heldout'", [run_id])
    assert not set(held["prompt"]) & set(trained["prompt"])  # grouped by prompt: none on both sides
    assert result.dropped["heldout"] == held.height


def test_stage_one_reuses_curation_logps_and_matches_trls_own_run(curated, tmp_path) -> None:  # noqa: ANN001
    """Stage 1 trains on curation's log-probs (no reference pass); its loss curve is TRL's with its own pass."""
    from dataclasses import replace

    from trl import DPOTrainer

    from curation.lm.loading import load_model, load_tokenizer, torch_threads
    from curation.manifest import ShardManifest
    from training.config import TrainConfig
    from training.stages import dpo_config, train_stages, training_lengths

    _, _, result, _, _, model_dir = curated
    config = TrainConfig(objective="dpo", batch_size=4, logging_steps=1, max_stages=1, learning_rate=1e-3,
                         warmup_ratio=0.0)
    logged: list[dict] = []
    stages = train_stages(result.shard_dir, str(model_dir), tmp_path / "train", config,
                          metrics_sink=lambda stage, rows: logged.extend(rows), progress=False)
    assert [s.reference_source for s in stages] == ["curation"]

    manifest = ShardManifest.load(result.shard_dir)
    lengths = training_lengths(config, manifest)
    args = dpo_config(replace(config, max_length=lengths.max_length, truncation_mode=lengths.truncation_mode),
                      tmp_path / "trl", beta=0.1)
    with datasets_cache(tmp_path / "hf"), torch_threads(1):
        trainer = DPOTrainer(model=load_model(model_dir, device="cpu"), args=args,
                             train_dataset=_shard_dataset(result.shard_dir / "stage-1.parquet", drop_ref=True),
                             processing_class=load_tokenizer(model_dir))
        trainer.train()
    trl_losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(trl_losses) == len(logged) >= 3
    assert len(set(np.round(trl_losses, 4))) > 1  # the policy moved: later losses test the reused log-probs too
    np.testing.assert_allclose([r["loss"] for r in logged], trl_losses, atol=1e-4)
