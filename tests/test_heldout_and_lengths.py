"""Held-out prompts, the length policy and the report's lengths, and a reward model as judge.

* curation holds out a seeded share of prompts, grouped (no prompt on both sides), capped, the
  same whatever the input order; those pairs never reach a shard and evaluation uses them;
* ``length_policy: drop`` drops pairs over max_length with its own reason, ``truncate`` keeps
  them for TRL to cut; the report counts them and plots the lengths against max_length;
* ``eval.reward_model``: a tiny randomly initialised sequence-classification model saved here
  judges policy and reference samples; its rewards are checked against a direct forward.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import polars as pl
import pytest

os.environ.setdefault("TQDM_DISABLE", "1")

from curation.decide import CurateConfig, curate  # noqa: E402
from curation.errors import WinnowError  # noqa: E402
from curation.filter import RulesConfig  # noqa: E402
from curation.heldout import HeldoutConfig, split_heldout  # noqa: E402
from curation.schema import DecisionReason  # noqa: E402
from curation.store import Catalog  # noqa: E402
from tests.test_curation_decisions import make_catalog, synthetic_scores  # noqa: E402

# ----------------------------------------------------------------------------- the split


def test_heldout_count_is_a_capped_share_never_everything() -> None:
    config = HeldoutConfig()
    assert (config.share, config.max_prompts) == (0.03, 500)
    assert config.count(100) == 3 and config.count(10) == 1 and config.count(1) == 0
    assert config.count(1_000_000) == 500  # capped
    assert HeldoutConfig(share=0.0).count(1000) == 0
    assert HeldoutConfig(share=0.9).count(3) == 2  # never every prompt
    with pytest.raises(WinnowError, match="heldout.share"):
        HeldoutConfig(share=1.0)


def test_split_groups_by_prompt_and_ignores_input_order() -> None:
    keys = pl.Series([f"prompt-{i % 40}" for i in range(120)])  # 40 prompts, three pairs each
    config = HeldoutConfig(share=0.1, seed=4)
    split = split_heldout(keys, config)
    held = set(keys.filter(pl.Series(split.mask)))
    assert split.heldout_prompts == len(held) == 4 and split.pairs == 12  # whole prompts: all three pairs
    order = np.random.default_rng(0).permutation(120)
    shuffled = split_heldout(keys.gather(order), config)
    assert set(keys.gather(order).filter(pl.Series(shuffled.mask))) == held
    assert set(keys.filter(pl.Series(split_heldout(keys, HeldoutConfig(share=0.1, seed=5)).mask))) != held


def test_curation_holds_out_prompts_that_never_reach_a_shard(tmp_path: Path) -> None:
    frame = synthetic_scores(np.linspace(0.5, 3.0, 60)).with_columns(  # 30 prompts with two pairs each
        prompt=pl.format("prompt {}", pl.int_range(60) // 2))
    catalog = make_catalog(tmp_path, frame, conversational=True)
    result = curate(catalog, "run-synthetic", CurateConfig(report=False, heldout=HeldoutConfig(share=0.1)))
    decisions = catalog.query("SELECT d.pair_id, d.kept, d.reason, d.detail, p.prompt FROM decisions d "
                              "JOIN pairs p USING (run_id, pair_id)")
    held = decisions.filter(pl.col("reason") == DecisionReason.HELDOUT.value)
    assert held.height == 6 and held["prompt"].n_unique() == 3 and not held["kept"].any()
    assert held["detail"][0] == "prompt held out for evaluation (3 of 30 prompts: share 0.1, cap 500, seed 0)"
    others = decisions.filter(pl.col("reason") != DecisionReason.HELDOUT.value)
    assert not set(held["prompt"]) & set(others["prompt"])
    sharded = pl.concat([pl.read_parquet(p) for p in result.shard_dir.glob("stage-*.parquet")])
    assert sharded.height == result.kept and not set(held["pair_id"]) & set(sharded["pair_id"])
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["counts"]["dropped_by_reason"]["heldout"] == 6
    assert manifest["curation"]["filters"]["heldout"] == {"prompts": 30, "heldout_prompts": 3, "heldout_pairs": 6}

    from training.eval_tasks import get_task

    data = get_task("pairs").data(catalog, "run-synthetic", prompts=10, pairs=10, seed=0)
    assert data.heldout is True and data.pairs.height == 6 and len(data.prompts) == 3
    assert all(p[0]["role"] == "user" for p in data.prompts)  # conversations stay message lists
    assert set(data.pairs["pair_id"]) == set(held["pair_id"])


def test_a_run_without_a_split_is_evaluated_on_its_own_pairs_and_says_so(tmp_path: Path) -> None:
    from training.eval_tasks import get_task

    catalog = make_catalog(tmp_path, synthetic_scores(np.linspace(0.5, 3.0, 20)))
    curate(catalog, "run-synthetic", CurateConfig(report=False, heldout=HeldoutConfig(share=0.0)))
    data = get_task("pairs").data(catalog, "run-synthetic", prompts=5, pairs=5, seed=0)
    assert data.heldout is False and data.pairs.height == 5 and isinstance(data.prompts[0], str)


# ----------------------------------------------------------------------------- lengths


def _long_tailed(tmp_path: Path) -> Catalog:
    """prompt 8 + completions of 20..90 tokens; max_length 64 (make_catalog's) cuts the longer ones."""
    tokens = np.linspace(20, 90, 40).astype(int)
    return make_catalog(tmp_path, synthetic_scores(np.linspace(0.5, 3.0, 40), chosen_tokens=tokens,
                                                   rejected_tokens=tokens))


def test_length_policy_drop_gives_its_own_reason_and_truncate_keeps(tmp_path: Path) -> None:
    over = int((8 + np.linspace(20, 90, 40).astype(int) > 64).sum())
    dropped = curate(_long_tailed(tmp_path / "drop"), "run-synthetic",
                     CurateConfig(rules=RulesConfig(length_policy="drop"), report=False,
                                  heldout=HeldoutConfig(share=0.0)))
    assert dropped.dropped[DecisionReason.OVER_MAX_LENGTH.value] == over
    catalog = Catalog(tmp_path / "drop")
    detail = catalog.query("SELECT detail FROM decisions WHERE reason = 'over_max_length' LIMIT 1").item()
    assert "> max_length 64 (length_policy drop)" in detail
    kept = curate(_long_tailed(tmp_path / "truncate"), "run-synthetic",
                  CurateConfig(report=False, heldout=HeldoutConfig(share=0.0)))
    assert DecisionReason.OVER_MAX_LENGTH.value not in kept.dropped
    assert kept.kept > dropped.kept
    with pytest.raises(WinnowError, match="length_policy"):
        RulesConfig(length_policy="cut")  # type: ignore[arg-type]


def test_report_shows_lengths_against_max_length(tmp_path: Path) -> None:
    from curation.report import build_report

    catalog = _long_tailed(tmp_path)
    curate(catalog, "run-synthetic", CurateConfig(report=False, heldout=HeldoutConfig(share=0.0)))
    path = build_report(catalog, "run-synthetic")
    text = path.read_text()
    over = int((8 + np.linspace(20, 90, 40).astype(int) > 64).sum())
    assert "## Lengths" in text and f"Pairs over max_length: {over};" in text
    assert "which TRL truncates to 64 tokens" in text and "| length_policy | truncate |" in text
    png = path.parent / "token_lengths.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


# ----------------------------------------------------------------------------- the judge


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory) -> Path:  # noqa: ANN001
    """A tiny random Llama sequence classifier with the Qwen2.5 chat template, saved as a user would."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    from tests.chat_families import FAMILIES, corpus, train_family_tokenizer

    family = FAMILIES["qwen2"]
    tokenizer = train_family_tokenizer(family, corpus(family))
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id))
    folder = tmp_path_factory.mktemp("judge")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_judge_rewards_are_the_models_own_scores(judge_dir: Path) -> None:
    import torch

    from training.evaluate.judge import judge_metrics, load_judge

    judge = load_judge(judge_dir)
    prompts = [[{"role": "user", "content": "What colour is the sky?"}], [{"role": "user", "content": "Two plus two?"}]]
    policy, reference = ["Blue.", "Four, certainly."], ["Green, I think.", "Four, certainly."]
    metrics, details, pol, ref = judge_metrics(judge, prompts, policy, reference)
    direct = []
    with torch.no_grad():
        for prompt, answer in zip(prompts * 2, policy + reference, strict=True):
            ids = judge.tokenizer.apply_chat_template(prompt + [{"role": "assistant", "content": answer}],
                                                      tokenize=True, return_dict=True)["input_ids"]
            direct.append(judge.model(input_ids=torch.tensor([ids])).logits[0, 0].item())
    np.testing.assert_allclose(np.concatenate([pol, ref]), direct, atol=1e-5)
    assert metrics["judge_reward"] == pytest.approx(np.mean(direct[:2]))
    assert metrics["judge_reward_ref"] == pytest.approx(np.mean(direct[2:]))
    wins = int(pol[0] > ref[0])
    assert details["judge_win_rate"] == {"wins": wins, "ties": 1, "losses": 1 - wins, "judge": str(judge_dir)}
    assert metrics["judge_win_rate"] == pytest.approx((wins + 0.5) / 2)
    with pytest.raises(WinnowError, match="not a sequence-classification model"):
        load_judge(judge_dir / "missing")


def test_evaluate_run_on_heldout_conversations_with_a_judge(judge_dir: Path, tmp_path: Path) -> None:
    """A conversational run curated with a split: evaluation samples the held-out prompts through the
    chat template, its rows say heldout: true, and the judge's numbers are there (policy = reference here,
    so they tie exactly and the KL is 0)."""
    from curation.ingest import ingest
    from curation.score.scoring import ScoreOptions, ScoringModels, score_run
    from tests.chat_families import FAMILIES, build_family, ultrafeedback_rows
    from training.run_evaluation import POLICY_LABEL, evaluate_run

    rows = ultrafeedback_rows(30)
    source = tmp_path / "uf.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    family = FAMILIES["qwen2"]
    model, tokenizer = build_family(family, [m["content"] for r in rows for m in r["chosen"] + r["rejected"]]
                                    + [family.template], folder=tmp_path / "model")
    catalog = Catalog(tmp_path / "runs")
    run_id = ingest([str(source)], catalog, progress=False).run_id
    score_run(catalog, run_id, ScoringModels(tokenizer, "qwen-tiny", reference=model), ScoreOptions(max_length=256),
              progress=False)
    curate(catalog, run_id, CurateConfig(report=False, heldout=HeldoutConfig(share=0.2)))
    path = str(tmp_path / "model")
    metrics = evaluate_run(catalog, run_id, path, path, task="pairs", prompts=4, pairs=6, max_new_tokens=4,
                           max_length=256, progress=False, reward_model=str(judge_dir))
    assert {"judge_reward", "judge_reward_ref", "judge_win_rate", "implicit_acc", "kl"} <= set(metrics)
    assert metrics["judge_win_rate"] == 0.5 and metrics["judge_reward"] == metrics["judge_reward_ref"]
    assert metrics["kl"] == 0.0 and metrics["implicit_acc"] == 0.0  # a policy equal to its reference learned nothing
    rows_ = catalog.query("SELECT metric, n, details FROM evals WHERE run_id = ? AND model = ?", [run_id, POLICY_LABEL])
    details = {m: json.loads(d) for m, d in zip(rows_["metric"], rows_["details"], strict=True)}
    assert all(d["heldout"] is True and d["task"] == "pairs" for d in details.values())
    assert details["judge_win_rate"]["judge"] == str(judge_dir)
    held = catalog.query("SELECT count(*) FROM decisions WHERE run_id = ? AND reason = 'heldout'", [run_id]).item()
    assert dict(zip(rows_["metric"], rows_["n"], strict=True))["implicit_acc"] == min(6, held)
