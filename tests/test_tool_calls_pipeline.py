"""Tool-calling conversations end to end: ingest keeps tool calls, tool names and the `tools` column,
scoring renders them with the model's chat template (tools passed to it, as TRL does), and the shard's
reference log-probs equal TRL's own precompute pass on that shard.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl

os.environ.setdefault("TQDM_DISABLE", "1")

from curation.store import Catalog  # noqa: E402
from tests.chat_families import FAMILIES, build_family, trl_prepared  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "datasets" / "tool_calls.jsonl"


def test_tool_calls_reach_the_shard_and_their_logps_equal_trl(tmp_path: Path, one_torch_thread) -> None:  # noqa: ANN001
    from datasets import Dataset

    from curation.beta_filter import BetaFilterConfig
    from curation.decide import CurateConfig, curate
    from curation.filter import RuleFilterConfig, RulesConfig
    from curation.heldout import HeldoutConfig
    from curation.ingest import ingest
    from curation.score.scoring import ScoreOptions, ScoringModels, score_run
    from curation.stage import StageConfig

    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    family = FAMILIES["qwen2"]  # the Qwen2.5 template renders tools and tool calls
    texts = [json.dumps(r) for r in rows] * 20 + [family.template]
    model, tokenizer = build_family(family, texts, folder=tmp_path / "model")
    catalog = Catalog(tmp_path / "runs")
    run_id = ingest([str(FIXTURE)], catalog, progress=False).run_id
    models = ScoringModels(tokenizer, str(tmp_path / "model"), reference=model, reference_name=str(tmp_path / "model"))
    score_run(catalog, run_id, models, ScoreOptions(max_length=None, margin="reference"), progress=False)
    keep_all = RulesConfig(length_ratio=RuleFilterConfig("length_ratio_max", "max", None))  # "No." vs a tool chain
    result = curate(catalog, run_id, CurateConfig(rules=keep_all, heldout=HeldoutConfig(share=0.0),
                                                  stages=StageConfig(k=1), beta=BetaFilterConfig(enabled=False),
                                                  report=False))
    assert result.kept == len(rows)

    shard = pl.read_parquet(result.shard_dir / "stage-1.parquet")
    assert {"tools", "ref_chosen_logps", "ref_rejected_logps"} <= set(shard.columns)
    chosen = shard["chosen"].to_list()
    assert all(any(m.get("tool_calls") for m in turns) for turns in chosen)
    assert all(any(m.get("role") == "tool" and m.get("name") == "get_weather" for m in turns) for turns in chosen)

    trl_ds, _ = trl_prepared(model, tokenizer, Dataset.from_polars(
        shard.drop("pair_id", "ref_chosen_logps", "ref_rejected_logps")), tmp_path / "trl")
    np.testing.assert_allclose(shard["ref_chosen_logps"].to_numpy(), np.array(trl_ds["ref_chosen_logps"]), atol=1e-4)
    np.testing.assert_allclose(shard["ref_rejected_logps"].to_numpy(), np.array(trl_ds["ref_rejected_logps"]),
                               atol=1e-4)
    # the tools really were rendered: the tool's description is in the prompt TRL tokenized
    assert "Current weather" in tokenizer.decode(trl_ds[0]["prompt_ids"])
