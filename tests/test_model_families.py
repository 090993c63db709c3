"""Real model families: TRL-exact conversational tokens and reference log-probs, fast paths, one training step.

For each family (Llama, Qwen2, Gemma 2, Gemma 3, Mistral, Phi-3, GPT-NeoX) a tiny randomly
initialised model is built from the family's transformers config, with a tokenizer trained
here and the family's chat template (tests/chat_families.py). Checked against TRL 1.16 run on
the same rows: the token ids of ``_prepare_dataset`` and the log-probs of its precompute pass
(1e-4); each fast path (shared-prompt rows, the packed layout) either gives the same numbers or
is switched off for that family with its reason said; and one real training step through
``training.stages.train_stage`` reusing those log-probs starts exactly at TRL's loss log(2).
"""

from __future__ import annotations

import json
import logging
import math
import os

import numpy as np
import polars as pl
import pytest

os.environ.setdefault("TQDM_DISABLE", "1")

from curation.lm.logprobs import fast_path_blockers, score_tokenized  # noqa: E402
from curation.lm.tokenization import tokenize_conversations  # noqa: E402
from tests.chat_families import (  # noqa: E402
    FAMILIES,
    TOOLS,
    build_family,
    conversations,
    corpus,
    tool_conversations,
    trl_prepared,
)

# What each family's config makes of the fast paths on these conversations (and why)
EXPECTED_OFF = {
    "gemma2": {"shared": [], "packed": ["attention logit soft-capping"]},
    "mistral": {"shared": ["sliding-window attention shorter than the sequences"],
                "packed": ["sliding-window attention shorter than the sequences"]},
}


def _rows(family) -> list[dict]:  # noqa: ANN001
    rows = conversations(family)
    if family.tools:
        return [{**r, "tools": None} for r in rows] + [{**r, "tools": json.dumps(TOOLS)} for r in tool_conversations()]
    return rows


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_run(request, tmp_path_factory, one_torch_thread):  # noqa: ANN001, ANN201
    """(family, model, tokenizer, rows as polars, TRL's prepared dataset with its log-probs, the model's folder)."""
    from datasets import Dataset

    family = FAMILIES[request.param]
    folder = tmp_path_factory.mktemp(family.name)
    model, tokenizer = build_family(family, corpus(family), folder=folder / "model")
    frame = pl.DataFrame(_rows(family), infer_schema_length=None)
    trl_ds, _ = trl_prepared(model, tokenizer, Dataset.from_polars(frame), folder)
    return family, model, tokenizer, frame, trl_ds, folder / "model"


def _tokens(tokenizer, frame: pl.DataFrame):  # noqa: ANN001, ANN202
    tools = frame["tools"].to_list() if "tools" in frame.columns else None
    return tokenize_conversations(tokenizer, frame["prompt"].to_list(), frame["chosen"].to_list(),
                                  frame["rejected"].to_list(), tools)


def test_tokens_equal_trl(family_run) -> None:  # noqa: ANN001
    family, _, tokenizer, frame, trl_ds, _ = family_run
    tp = _tokens(tokenizer, frame)
    assert tp.prompt_ids == trl_ds["prompt_ids"], family.name
    assert tp.chosen_ids == trl_ds["chosen_ids"], family.name
    assert tp.rejected_ids == trl_ds["rejected_ids"], family.name


def test_fast_paths_equal_trl_or_say_why_not(family_run, caplog) -> None:  # noqa: ANN001
    family, model, tokenizer, frame, trl_ds, _ = family_run
    tp = _tokens(tokenizer, frame)
    expected = {"chosen": np.array(trl_ds["ref_chosen_logps"]), "rejected": np.array(trl_ds["ref_rejected_logps"])}
    blockers = fast_path_blockers(model, tp)
    for path, wants in EXPECTED_OFF.get(family.name, {"shared": [], "packed": []}).items():
        assert len(blockers[path]) == len(wants), (family.name, blockers)
        assert all(want in got for want, got in zip(wants, blockers[path], strict=True)), (family.name, blockers)

    def check(frame_: pl.DataFrame) -> None:
        for side in ("chosen", "rejected"):
            np.testing.assert_allclose(frame_[f"ref_{side}_logps"].to_numpy(), expected[side], atol=1e-4,
                                       err_msg=family.name)

    with caplog.at_level(logging.INFO, logger="curation.lm.logprobs"):
        check(score_tokenized(model, tp, progress=False))  # the default: shared-prompt rows where possible
    logged = [r.getMessage() for r in caplog.records if "shared-prompt rows off" in r.getMessage()]
    if blockers["shared"]:
        assert logged and family.name in logged[0] and blockers["shared"][0] in logged[0]
    else:
        assert not logged
    check(score_tokenized(model, tp, progress=False, share_prompt=False))
    if blockers["packed"]:
        with pytest.raises(ValueError, match="layout='packed' is not possible here"):
            score_tokenized(model, tp, progress=False, layout="packed")
    else:
        check(score_tokenized(model, tp, progress=False, layout="packed"))


def test_one_training_step_reuses_the_reference_logps(family_run, tmp_path) -> None:  # noqa: ANN001
    from training.config import TrainConfig
    from training.stages import train_stage

    family, model, tokenizer, frame, _, start = family_run
    ref = score_tokenized(model, _tokens(tokenizer, frame), progress=False)
    shard = frame.with_columns(ref.select("ref_chosen_logps", "ref_rejected_logps"),
                               pair_id=pl.Series([f"{i:064x}" for i in range(frame.height)]))
    logged: list[dict] = []
    config = TrainConfig(objective="dpo", batch_size=16, logging_steps=1, learning_rate=1e-3, warmup_ratio=0)
    result = train_stage(1, shard, start, tmp_path / "stage-1", config, None, reference_source="curation",
                         metrics_sink=lambda stage, rows: logged.extend(rows), progress=False)
    assert result.reference_source == "curation" and (tmp_path / "stage-1" / "model").is_dir()
    first = logged[0]
    # the policy is the reference at step 1, so with the reused log-probs right the loss is exactly TRL's log 2
    assert abs(first["loss"] - math.log(2)) < 1e-4, (family.name, first)
    assert abs(first["rewards_margins"]) < 1e-5, (family.name, first)
    assert math.isfinite(first["grad_norm"]) and first["grad_norm"] > 0
