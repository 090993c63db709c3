"""The preference gym, cut down: plumbing and arithmetic, not the quality claims.

One quick gym (1 seed, 20% label noise, all arms, a 1-layer model, ~160 pairs, in this process)
checks that every arm trains under the same step budget, is evaluated on the same held-out set,
lands in the catalog and the report, that the curated arm's ablations train on the curation
they name, and that the reported numbers are exactly what the samples and the truth columns
say. A slow test runs two noise levels with three arms (the per-level plumbing). The claims
themselves live in benchmarks/GYM.md (`winnow gym`).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from curation.store import Catalog
from training import gym
from training.sorting import gold_reward, make_prompt

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- arithmetic


@pytest.mark.parametrize("pairs", [1, 31, 32, 33, 159, 948, 1897, 2371])
@pytest.mark.parametrize("steps", [1, 7, 37, 38, 75, 150])
def test_epochs_for_steps_gives_the_trainer_exactly_that_many_steps(pairs: int, steps: int) -> None:
    epochs = gym.epochs_for_steps(steps, pairs, 32)
    assert math.ceil(epochs * gym.batches(pairs, 32)) == steps  # transformers: ceil(epochs * batches/epoch)


def test_budget_and_step_split() -> None:
    config = gym.GymConfig(batch_size=32, epochs=1.0)
    assert gym.budget_steps(2371, config) == 75
    assert gym.budget_steps(2371, gym.GymConfig(batch_size=32, epochs=2.0)) == 150
    assert gym.split_steps(75, [1186, 1185]) == [38, 37]
    assert gym.split_steps(75, [1897]) == [75]
    assert gym.split_steps(10, [1, 1000]) == [1, 9]  # every stage trains at least once
    assert sum(gym.split_steps(101, [3, 5, 7])) == 101
    with pytest.raises(ValueError):
        gym.split_steps(1, [5, 5])


def test_filter_quality_on_hand_made_truth() -> None:
    dropped = np.array([True, True, True, False, False, False, True, False])
    flipped = np.array([True, True, False, True, False, False, False, False])
    q = gym.filter_quality(dropped, flipped)
    assert q["dropped"] == 4 and q["flipped"] == 3 and q["flipped_dropped"] == 2
    assert q["precision"] == pytest.approx(2 / 4)
    assert q["recall"] == pytest.approx(2 / 3)
    assert q["flipped_share_before"] == pytest.approx(3 / 8)
    assert q["flipped_share_after"] == pytest.approx(1 / 4)
    assert math.isnan(gym.filter_quality(np.zeros(3, bool), np.ones(3, bool))["precision"])


def test_filler_detection_and_gold_reward_ignore_fillers() -> None:
    prompt = make_prompt([12, 3, 7])
    responses = [" 3 7 12", " Sure, here is the sorted list: 3 7 12", " 7 3 12", ""]
    np.testing.assert_array_equal(gym.has_filler(responses), [False, True, False, False])
    assert [gold_reward(prompt, r) for r in responses] == [1.0, 1.0, pytest.approx(1 / 3), 0.0]


def test_summary_mean_and_sample_std() -> None:
    frame = pl.DataFrame({"arm": ["a", "a", "a", "b", "b", "b"], "seed": [0, 1, 2] * 2,
                          "gold_reward": [0.5, 0.7, 0.9, 0.2, 0.2, 0.2], "kl": [1.0, None, 3.0, 0.0, 0.0, 0.0]})
    s = gym.summarise(frame, ["gold_reward", "kl"])
    row = s.filter((pl.col("arm") == "a") & (pl.col("metric") == "gold_reward")).row(0, named=True)
    assert row["mean"] == pytest.approx(0.7) and row["std"] == pytest.approx(0.2)  # ddof 1
    assert (row["min"], row["max"], row["seeds"]) == (0.5, 0.9, 3)
    kl = s.filter((pl.col("arm") == "a") & (pl.col("metric") == "kl")).row(0, named=True)
    assert kl["mean"] == pytest.approx(2.0) and kl["seeds"] == 2  # a missing value is skipped, not zero


def _fake_result(values: dict[str, dict[str, list[float]]], precision: list[float]) -> gym.GymResult:
    """A GymResult from hand-made per-seed numbers, to test the claim rules alone."""
    seeds = list(range(len(precision)))
    rows = []
    for arm, metrics in values.items():
        for i in seeds:
            rows.append({"arm": arm, "seed": i, **{m: v[i] for m, v in metrics.items()}})
    per_seed = pl.DataFrame(rows)
    config = gym.GymConfig(seeds=tuple(seeds), arms=("trl-dpo", "winnow-curated", "dpop", "ln-dpo"))
    seed_data = [gym.SeedData(seed=i, dir=Path("."), run_id="r", model_path="m", raw_path=Path("."),
                              kept_path=Path("."), shard_dir=Path("."), raw_pairs=100, kept_pairs=80, steps=4,
                              advice={}, filter={"precision": p, "recall": 0.5, "precision_low_tail": 1.0,
                                                 "flipped_share_kept": 0.05, "flipped_share_before": 0.2},
                              quarantined=0, seconds={})
                 for i, p in zip(seeds, precision, strict=True)]
    metrics = sorted({m for v in values.values() for m in v})
    return gym.GymResult(config, per_seed, gym.summarise(per_seed, metrics), seed_data, 1.0, {}, {})


def test_claim_rules_on_hand_made_numbers() -> None:
    common = {"chosen_drift_high_edit": [0.0] * 3, "len_tokens_sampled": [9.0] * 3, "filler_rate_sampled": [0.3] * 3,
              "filler_rate": [0.1] * 3}
    values = {
        "reference": {"gold_reward": [0.9] * 3, "len_tokens": [5.0] * 3, "chosen_drift_low_edit": [0.0] * 3, **common},
        "trl-dpo": {"gold_reward": [0.70, 0.72, 0.74], "len_tokens": [8.0, 8.5, 9.0],
                    "chosen_drift_low_edit": [-3.0, -4.0, -3.5], **common},
        "dpop": {"gold_reward": [0.85] * 3, "len_tokens": [5.0] * 3, "chosen_drift_low_edit": [0.1, -0.05, 0.1],
                 **common},
        "ln-dpo": {"gold_reward": [0.71, 0.72, 0.73], "len_tokens": [5.0, 5.2, 5.1],
                   "chosen_drift_low_edit": [-1.0] * 3, **common},
        "winnow-curated": {"gold_reward": [0.75, 0.72, 0.76], "len_tokens": [5.0] * 3,
                           "chosen_drift_low_edit": [-0.2] * 3, **common},
    }
    claims = {c.name: c for c in gym.evaluate_claims(_fake_result(values, [0.82, 0.79, 0.85]))}
    assert claims["dpop-low-edit"].verdict == "reproduced"  # means -3.5 < 0 <= +0.05
    assert claims["ln-dpo-length"].verdict == "reproduced"  # 5.1 vs 8.5, gold 0.72 vs 0.72
    assert claims["filter-precision"].verdict == "reproduced"  # mean 0.82
    # curated +0.023 over DPO: just above the spread (the larger std: curated 0.021, DPO 0.020)
    assert claims["curated-beats-dpo"].verdict == "reproduced"
    values["winnow-curated"]["gold_reward"] = [0.71, 0.75, 0.73]  # +0.01, spread 0.02
    values["dpop"]["chosen_drift_low_edit"] = [-0.5, -0.4, -0.6]  # above DPO's, but still below 0
    claims = {c.name: c for c in gym.evaluate_claims(_fake_result(values, [0.7, 0.75, 0.8]))}
    assert claims["curated-beats-dpo"].verdict == "not reproduced"
    assert claims["dpop-low-edit"].verdict == "partly reproduced"
    assert claims["filter-precision"].verdict == "not reproduced"


def _effects_result(gold: dict[str, dict[float, list[float]]]) -> gym.GymResult:
    """A GymResult with hand-made per-seed gold rewards per arm and noise level."""
    rows = [{"noise": noise, "seed": i, "arm": arm, "gold_reward": v}
            for arm, levels in gold.items() for noise, values in levels.items() for i, v in enumerate(values)]
    per_seed = pl.DataFrame(rows)
    config = gym.GymConfig(seeds=(0, 1, 2), noise_levels=(0.0, 0.2, 0.4))
    return gym.GymResult(config, per_seed, gym.summarise(per_seed, ["gold_reward"]), [], 1.0, {}, {})


def test_part_effects_and_the_defaults_they_decide_on_hand_made_numbers() -> None:
    base = [0.80, 0.82, 0.84]
    same = {n: base for n in (0.0, 0.2, 0.4)}
    gold = {arm: dict(same) for arm in gym.ARMS}
    gold["winnow-curated"] = {0.0: base, 0.2: [0.85, 0.86, 0.90], 0.4: [0.81, 0.82, 0.84]}  # +0.05, +0.01, +0.003
    for arm in ("curated-no-filter", "curated-in-batch", "curated-dpo", "trl-dpo"):  # everything else: no effect
        gold[arm] = dict(gold["winnow-curated"])
    gold["curated-each"] = {0.0: base, 0.2: [0.88, 0.90, 0.93], 0.4: gold["winnow-curated"][0.4]}  # stacking wins at 20%
    gold["curated-one-stage"] = {0.0: base, 0.2: [0.88, 0.90, 0.93], 0.4: [0.70, 0.70, 0.70]}  # wins, loses at 40%
    effects = {(e.part, e.noise): e for e in gym.part_effects(_effects_result(gold))}
    online = effects[("online curation between stages", 0.2)]  # winnow-curated minus curated-no-online
    assert online.diffs == pytest.approx([0.05, 0.04, 0.06]) and online.mean == pytest.approx(0.05)
    assert online.std == pytest.approx(0.01) and online.verdict == "helps"
    assert effects[("online curation between stages", 0.0)].verdict == "no clear effect"  # all zero
    each = effects[("20% dropped in all rather than ~36% (policy joint vs each)", 0.2)]
    assert each.mean == pytest.approx(-1 / 30) and each.verdict == "hurts"
    decided = {d.setting: d for d in gym.decide_defaults(_effects_result(gold))}
    assert decided["train.online_curation"].decision == "auto (on)"  # it helps: stays on
    assert decided["curate.advice.filter_policy"].decision == "each"  # stacking wins at 20%, loses nowhere
    assert decided["curate.stages.k"].decision == "2"  # one stage wins at 20% but loses at 40%: kept
    assert decided["train.objective"].decision == "auto"
    gold["curated-no-online"] = {0.0: base, 0.2: [0.90, 0.92, 0.95], 0.4: gold["winnow-curated"][0.4]}  # without wins
    assert {d.setting: d for d in gym.decide_defaults(_effects_result(gold))}["train.online_curation"].decision == \
        "false"


# --------------------------------------------------------------------------- the cut-down gym


NOISE = (0.2,)
STAGED = {"winnow-curated", "curated-no-filter", "curated-in-batch", "curated-each", "curated-dpo",
          "curated-no-online"}


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[gym.GymResult, Path]:
    workdir = tmp_path_factory.mktemp("gym")
    result = gym.run_gym(gym.GymConfig.quick(noise_levels=NOISE), workdir, log=lambda line: None)
    return result, workdir


def test_every_arm_runs_under_the_same_budget(quick) -> None:  # noqa: ANN001
    result, _ = quick
    assert [(s.noise, s.seed) for s in result.seeds] == [(n, 0) for n in NOISE]
    for data in result.seeds:
        per_seed = result.per_seed.filter(pl.col("noise") == data.noise)
        assert per_seed["arm"].to_list() == ["reference", *gym.ARMS]
        assert data.steps == gym.budget_steps(data.raw_pairs, result.config)
        steps = dict(per_seed.select("arm", "steps").iter_rows())
        for arm in gym.ARMS:
            if arm in STAGED:  # train_stages: budget // stages per stage, never more than the budget
                assert data.steps - (result.config.stages - 1) <= steps[arm] <= data.steps, arm
            else:
                assert steps[arm] == data.steps, arm
        pairs = dict(per_seed.select("arm", "pairs").iter_rows())
        assert pairs["winnow-curated"] == pairs["offline-filter"] == data.kept_pairs < data.raw_pairs
        assert pairs["curated-each"] == pairs["curated-dpo"] == pairs["curated-no-online"] == data.kept_pairs
        assert pairs["curated-one-stage"] == data.kept_pairs
        entered = data.raw_pairs - data.filter["dropped_by_rules"]  # no offline beta filter: every rule survivor
        assert pairs["curated-no-filter"] == pairs["curated-in-batch"] == entered > data.kept_pairs
        assert all(pairs[a] == data.raw_pairs for a in ("trl-dpo", "dpop", "ln-dpo", "minor-dpo", "beta-dpo", "sdpo"))
        for metric in gym.TABLE_METRICS:
            assert per_seed[metric].null_count() == 0, metric
        assert per_seed["gold_reward"].is_between(0, 1).all() and per_seed["win_rate"].is_between(0, 1).all()


def test_ablations_train_on_the_curation_they_name(quick) -> None:  # noqa: ANN001
    """The filtering policy and stage count each ablation claims, read back from its own catalog and manifest."""
    from curation.manifest import ShardManifest

    result, _ = quick
    data = result.seed_data(0, 0.2)
    v = data.variants
    assert {a.curation for a in map(gym.get_arm, gym.ARMS)} <= set(v) and set(v) <= set(gym.CURATIONS)
    filtering = {name: variant.advice["evidence"]["filtering"] for name, variant in v.items()}
    assert filtering["default"]["policy"] == "joint" and filtering["each"]["policy"] == "each"
    assert filtering["default"]["offline_kept_share"] == pytest.approx(0.8, abs=0.01)
    assert filtering["no-offline-filter"]["offline_kept_share"] == filtering["no-filter"]["offline_kept_share"] == 1.0
    if v["default"].advice["objective"] == "beta-dpo":  # where beta-DPO's in-batch filter exists
        assert v["default"].advice["params"]["beta_keep"] == 1.0  # joint: the offline filter took the 20%
        assert v["no-offline-filter"].advice["params"]["beta_keep"] == 0.8  # joint: the in-batch filter takes it
        assert v["no-filter"].advice["params"]["beta_keep"] == 1.0
        assert v["each"].advice["params"]["beta_keep"] == 0.8  # stacked: ~36% in all
        assert filtering["each"]["total_kept_share"] == pytest.approx(0.64, abs=0.01)
    assert len(ShardManifest.load(v["one-stage"].shard_dir).stages) == 1
    assert len(ShardManifest.load(v["default"].shard_dir).stages) == result.config.stages
    # online curation is on by default: each staged arm's rounds are in its own catalog copy, none elsewhere
    def rounds(arm: str) -> pl.DataFrame:
        return Catalog(data.dir / "arms" / arm / "catalog").query(
            "SELECT round, count(*) AS n, sum(kept::INT) AS kept FROM decision_rounds WHERE run_id = ? GROUP BY 1",
            [data.run_id])

    assert rounds("winnow-curated")["round"].to_list() == [1] and rounds("winnow-curated")["kept"].item() > 0
    assert rounds("curated-dpo")["round"].to_list() == [1]
    assert rounds("curated-no-online").height == 0 and rounds("curated-one-stage").height == 0  # off; one stage
    assert Catalog(data.dir).query("SELECT count(*) AS n FROM decision_rounds").item() == 0


def test_reference_against_itself_is_the_known_zero(quick) -> None:  # noqa: ANN001
    result, _ = quick
    ref = result.at(0.2).per_seed.filter(pl.col("arm") == "reference").row(0, named=True)
    assert ref["kl"] == 0.0 and ref["win_rate"] == 0.5
    assert ref["chosen_drift"] == 0.0 and ref["implicit_acc"] == 0.0  # a zero margin is not a learned preference
    assert ref["gold_reward"] == ref["gold_reward_ref"]


def test_reported_metrics_equal_the_samples(quick) -> None:  # noqa: ANN001
    result, _ = quick
    data = result.seed_data(0, 0.2)
    for arm in ("trl-dpo", "winnow-curated", "sdpo", "curated-no-online"):
        row = result.at(0.2).per_seed.filter(pl.col("arm") == arm).row(0, named=True)
        samples = pl.read_parquet(data.dir / "arms" / arm / "samples.parquet")
        gold = np.array([gold_reward(p, r) for p, r in zip(samples["prompt"], samples["response"], strict=True)])
        ref = np.array([gold_reward(p, r) for p, r in zip(samples["prompt"], samples["response_ref"], strict=True)])
        assert row["gold_reward"] == pytest.approx(gold.mean())
        assert row["win_rate"] == pytest.approx((np.sum(gold > ref) + 0.5 * np.sum(gold == ref)) / gold.size)
        assert row["kl"] == pytest.approx(float((samples["kl_logp"] - samples["kl_logp_ref"]).mean()))
        assert row["len_tokens_sampled"] == pytest.approx(float(samples["kl_tokens"].mean()))
        assert row["filler_rate"] == pytest.approx(float(gym.has_filler(samples["response"].to_list()).mean()))


def test_filter_quality_matches_decisions_and_truth(quick) -> None:  # noqa: ANN001
    result, _ = quick
    data = result.seed_data(0, 0.2)
    decisions = Catalog(data.dir).query(
        "SELECT p.prompt, p.chosen, p.rejected, d.reason FROM decisions d JOIN pairs p USING (run_id, pair_id) "
        "WHERE d.run_id = ?", [data.run_id])
    from training.sorting import generate_preferences

    truth = generate_preferences(result.config.preference_config(data.seed, data.noise))
    joined = decisions.join(truth, on=["prompt", "chosen", "rejected"], how="left")
    assert joined["is_flipped"].null_count() == 0
    dropped = joined.filter(pl.col("reason").str.starts_with("beta_outlier"))
    assert data.filter["dropped"] == dropped.height > 0
    assert data.filter["precision"] == pytest.approx(dropped["is_flipped"].mean())
    assert data.filter["recall"] == pytest.approx(dropped["is_flipped"].sum() / joined["is_flipped"].sum())


def test_evals_rows_land_in_the_seed_catalog(quick) -> None:  # noqa: ANN001
    result, _ = quick
    for data in result.seeds:
        evals = Catalog(data.dir).query("SELECT model, metric, value FROM evals WHERE run_id = ?", [data.run_id])
        assert set(evals["model"]) == {"reference", *gym.ARMS}
        gold = evals.filter((pl.col("model") == "dpop") & (pl.col("metric") == "gold_reward"))["value"].item()
        assert gold == pytest.approx(result.at(data.noise).per_seed.filter(pl.col("arm") == "dpop")["gold_reward"]
                                     .item())


def test_report_table_plots_and_kept_notes(quick, tmp_path: Path) -> None:  # noqa: ANN001
    result, _ = quick
    out = tmp_path / "GYM.md"
    gym.write_report(result, out, tmp_path / "gym", "winnow gym --quick")
    text = out.read_text()
    assert "winnow gym --quick" in text and "Wall time" in text
    for arm in gym.ARMS:
        assert text.count(f"| `{arm}` |") == len(NOISE)  # a row in each level's table
    claims = text.split("## Claims", 1)[1].split("\n## ", 1)[0]
    assert claims.count("| **") == 4 * len(NOISE)  # four claims with a verdict, at each noise level
    effects = text.split("## Each part's effect", 1)[1].split("\n## ", 1)[0]
    assert all(f"| {part} |" in effects for part, _, _ in gym.PARTS)
    decided = text.split("## Defaults the gym decides", 1)[1].split("\n## ", 1)[0]
    assert decided.count("| **") == len(gym.decide_defaults(result)) == 6
    for png in ("metrics.png", "drift.png", "gold_by_noise.png"):
        assert (tmp_path / "gym" / png).stat().st_size > 10_000
    out.write_text(text + "My reading of the numbers.\n")
    gym.write_report(result, out, tmp_path / "gym", "winnow gym --quick")
    assert out.read_text().endswith(gym.NOTES_MARKER + "\nMy reading of the numbers.\n")


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="unknown gym arm"):
        gym.GymConfig(arms=("dpo-plus",))
    with pytest.raises(ValueError, match="distinct"):
        gym.GymConfig(seeds=(1, 1))
    assert gym.with_overrides(gym.GymConfig(), size=None, noise_levels=(0.3,)).noise_levels == (0.3,)
    with pytest.raises(ValueError, match="noise levels"):
        gym.GymConfig(noise_levels=(0.2, 0.2))
    with pytest.raises(ValueError, match="noise levels"):
        gym.GymConfig(noise_levels=(0.8,))
    assert gym.GymConfig().noise_levels == (0.0, 0.2, 0.4) and gym.GymConfig().primary_noise == 0.2


# --------------------------------------------------------------------------- the arm registry


def test_every_arm_is_registered_with_its_description() -> None:
    assert gym.ARMS == ("trl-dpo", "winnow-curated", "dpop", "ln-dpo", "minor-dpo", "beta-dpo", "sdpo",
                        "offline-filter", "curated-no-filter", "curated-in-batch", "curated-each",
                        "curated-one-stage", "curated-dpo", "curated-no-online")  # the report's row order
    for name in gym.ARMS:
        arm = gym.get_arm(name)
        assert arm.name == name and callable(arm.train)
        assert arm.description and arm.description == gym.ARM_DESCRIPTIONS[name]
    assert set(gym.ARM_DESCRIPTIONS) == {"reference", *gym.ARMS}
    with pytest.raises(ValueError, match="registered twice"):  # one name, one arm
        gym.register_arm("dpop", "another DPOP")(lambda run: (Path("."), 0))
    assert gym.get_arm("dpop").description.startswith("DPOP")


def test_an_unknown_arm_fails_in_one_line() -> None:
    with pytest.raises(ValueError) as err:
        gym.get_arm("dpo-plus")
    message = str(err.value)
    assert "\n" not in message and "'dpo-plus'" in message and all(name in message for name in gym.ARMS)
    with pytest.raises(ValueError, match=r"unknown gym arm\(s\) \['a', 'b'\]"):
        gym.GymConfig(arms=("b", "trl-dpo", "a"))


@pytest.mark.slow
def test_noise_levels_each_get_their_data_reference_and_rows(tmp_path: Path) -> None:
    """Two noise levels: one set, reference and catalog per level; flipped shares follow the level."""
    levels = (0.0, 0.4)
    config = gym.GymConfig.quick(noise_levels=levels, arms=("trl-dpo", "winnow-curated", "curated-no-filter"))
    result = gym.run_gym(config, tmp_path, log=lambda line: None)
    assert [(s.noise, s.seed) for s in result.seeds] == [(0.0, 0), (0.4, 0)]
    assert result.per_seed.group_by("noise").len().sort("noise")["len"].to_list() == [4, 4]  # reference + 3 arms
    flipped = {s.noise: s.filter["flipped"] / s.raw_pairs for s in result.seeds}
    assert flipped[0.0] == 0 and flipped[0.4] == pytest.approx(0.4, abs=0.1)
    assert result.seeds[0].dir != result.seeds[1].dir and result.seeds[0].run_id != result.seeds[1].run_id
    claims = {(c.name, c.noise): c for n in levels for c in gym.evaluate_claims(result, n)}
    assert claims[("filter-precision", 0.0)].verdict == "not measured"  # no flipped pairs to find
    effects = [e for e in gym.part_effects(result) if e.part.startswith("beta-guided filtering")]
    assert [e.noise for e in effects] == list(levels) and all(len(e.diffs) == 1 for e in effects)
    text = gym.render_report(result, "winnow gym", [], tmp_path / "GYM.md")
    assert "## Results at 0% label noise" in text and "## Results at 40% label noise" in text
    assert gym.clear_previous(tmp_path) and not (tmp_path / "noise-00").exists()
