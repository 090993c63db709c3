"""Tests for the training/evaluate package (sampling, metrics, the evaluate() driver).

Metric functions are checked on hand-made numbers; the KL estimator against an exact KL
computed by enumerating every response of up to two tokens; the whole stage end to end on a
tiny random Llama with a locally trained tokenizer (no downloads).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from curation.lm.logprobs import reference_logprobs
from curation.store import Catalog
from training import evaluate as ev
from training.eval_tasks.sorting import HeldoutSet, heldout_sorting_set
from training.models import train_tokenizer
from training.sorting import (
    PreferenceSetConfig,
    generate_preferences,
    gold_reward,
    make_prompt,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201 - PreTrainedTokenizerFast
    frame = generate_preferences(PreferenceSetConfig(size=150, seed=3))
    texts = frame["prompt"].to_list() + frame["chosen"].to_list() + frame["rejected"].to_list()
    return train_tokenizer(texts, vocab_size=300)


def _llama(tokenizer, seed: int, init_std: float = 0.3):  # noqa: ANN001, ANN202
    """A tiny random Llama; a large init std gives peaked next-token distributions (a sizeable KL)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=init_std,
    )
    model = LlamaForCausalLM(config).eval()
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, key, getattr(config, key))
    return model


@pytest.fixture(scope="module")
def models(tokenizer):  # noqa: ANN001, ANN201
    return _llama(tokenizer, seed=1), _llama(tokenizer, seed=0)  # (policy, reference)


@pytest.fixture(scope="module")
def heldout() -> HeldoutSet:
    return heldout_sorting_set(24, 30, seed=0)


# --------------------------------------------------------------------------- gold reward, win rate


def test_gold_reward_on_hand_made_outputs() -> None:
    p = make_prompt([30, 4, 17, 9])  # sorted: 4 9 17 30
    assert gold_reward(p, " 4 9 17 30") == 1.0
    assert gold_reward(p, " Sure, here is the sorted list: 4 9 17 30") == 1.0  # filler earns nothing extra
    assert gold_reward(p, " 9 4 17 30") == 0.5  # one swap: two positions wrong
    assert gold_reward(p, " 4 9 30 17") == 0.5
    assert gold_reward(p, " 4 9 17 30 31") == pytest.approx(4 / 5)  # an extra number is never free
    assert gold_reward(p, " 4 9 17") == pytest.approx(3 / 4)  # a missing number counts as wrong
    assert gold_reward(p, " 30 17 9 4") == 0.0
    assert gold_reward(p, " no numbers at all") == 0.0
    prompts = [p] * 4
    responses = [" 4 9 17 30", " 9 4 17 30", " 4 9 17", " 30 17 9 4"]
    np.testing.assert_allclose(ev.gold_rewards(prompts, responses, gold_reward), [1.0, 0.5, 0.75, 0.0])
    assert ev.mean_gold_reward(prompts, responses, gold_reward) == pytest.approx(2.25 / 4)


def test_win_rate_counts_ties_half() -> None:
    policy = [1.0, 0.5, 0.2, 0.75, 0.0]
    reference = [0.5, 0.5, 0.3, 0.75, 0.0]
    assert ev.win_tie_loss(policy, reference) == (1, 3, 1)
    assert ev.win_rate(policy, reference) == pytest.approx((1 + 0.5 * 3) / 5)
    assert ev.win_rate([1, 1], [0, 0]) == 1.0
    assert ev.win_rate([0, 0], [1, 1]) == 0.0
    assert ev.win_rate([0.3] * 3, [0.3] * 3) == 0.5
    with pytest.raises(ValueError):
        ev.win_rate([], [])
    with pytest.raises(ValueError):
        ev.win_rate([1.0], [1.0, 0.0])


def test_length_stats() -> None:
    assert ev.length_stats([2, 4], [" 1 2", " 10 20 30"]) == {"len_tokens": 3.0, "len_chars": 6.5}


# --------------------------------------------------------------------------- pair metrics


def test_implicit_accuracy_and_drift_on_crafted_logps() -> None:
    pi_w = np.array([-1.0, -5.0, -3.0, -2.0, np.nan])
    ref_w = np.array([-2.0, -4.0, -3.0, -4.0, -1.0])
    pi_l = np.array([-6.0, -2.0, -3.0, -9.0, -1.0])
    ref_l = np.array([-4.0, -3.0, -3.0, -5.0, -1.0])
    # r_w - r_l: 1-(-2)=3 (right), -1-1=-2 (wrong), 0-0=0 (a tie is not learned), 2-(-4)=6, NaN dropped
    np.testing.assert_allclose(
        ev.implicit_margins(pi_w, ref_w, pi_l, ref_l, beta=0.5)[:4], [1.5, -1.0, 0.0, 3.0]
    )
    assert ev.implicit_reward_accuracy(pi_w, ref_w, pi_l, ref_l, beta=0.5) == pytest.approx(2 / 4)
    assert ev.implicit_reward_accuracy(pi_w, ref_w, pi_l, ref_l, beta=2.0) == pytest.approx(2 / 4)
    # drift: pi_w - ref_w = [1, -1, 0, 2, NaN]
    assert ev.logp_drift(pi_w, ref_w) == pytest.approx(0.5)
    low = np.array([False, True, True, False, True])
    assert ev.logp_drift(pi_w, ref_w, low) == pytest.approx(-0.5)
    assert ev.logp_drift(pi_w, ref_w, ~low) == pytest.approx(1.5)
    assert math.isnan(ev.logp_drift(pi_w, ref_w, np.zeros(5, bool)))
    with pytest.raises(ValueError):
        ev.logp_drift(pi_w, ref_w, [True, False])


def test_kl_estimate_arithmetic() -> None:
    kl, se = ev.kl_estimate([-1.0, -2.0, -3.0], [-2.0, -2.0, -5.0])  # log ratios 1, 0, 2
    assert kl == pytest.approx(1.0)
    assert se == pytest.approx(1.0 / math.sqrt(3))
    assert ev.kl_estimate([-1.0, -2.0], [-1.0, -2.0]) == (0.0, 0.0)


# --------------------------------------------------------------------------- sampling and log-probs


def test_sampling_left_padding_determinism_and_clean_text(tokenizer, models, heldout) -> None:  # noqa: ANN001
    policy, _ = models
    prompts = heldout.prompts[:12]
    one = ev.sample_tokens(policy, tokenizer, prompts, 8, batch_size=1)
    many = ev.sample_tokens(policy, tokenizer, prompts, 8, batch_size=12)
    assert one.completion_ids == many.completion_ids  # left padding does not change greedy answers
    assert all(len(c) <= 8 for c in many.completion_ids)
    for text, ids, done in zip(many.texts, many.completion_ids, many.finished, strict=True):
        assert "<|" not in text  # no special tokens
        assert (ids[-1] == tokenizer.eos_token_id) == done
        assert tokenizer.eos_token_id not in ids[:-1]  # cut at the first eos
    a = ev.sample_responses(policy, tokenizer, prompts, 8, greedy=False, seed=5)
    b = ev.sample_responses(policy, tokenizer, prompts, 8, greedy=False, seed=5)
    c = ev.sample_responses(policy, tokenizer, prompts, 8, greedy=False, seed=6)
    assert a == b and a != c
    state = torch.get_rng_state()
    ev.sample_responses(policy, tokenizer, prompts[:2], 4, greedy=False, seed=1)
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is left alone
    with pytest.raises(ValueError):
        ev.sample_tokens(policy, tokenizer, prompts, 4, greedy=False, temperature=0.0)


def test_sequence_logps_match_the_pair_scorer(tokenizer, models, heldout) -> None:  # noqa: ANN001
    policy, _ = models
    pairs = heldout.pairs.head(8)
    prompts, chosen = pairs["prompt"].to_list(), pairs["chosen"].to_list()
    got = ev.sequence_logps(policy, tokenizer, prompts, chosen, max_length=128)
    want = reference_logprobs(
        policy, tokenizer, prompts, chosen, pairs["rejected"].to_list(), max_length=128, progress=False
    )["ref_chosen_logps"].to_numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    assert np.all(got < 0)


# --------------------------------------------------------------------------- KL against known values


def test_kl_is_exactly_zero_when_policy_equals_reference(tokenizer, models, heldout) -> None:  # noqa: ANN001
    import copy

    policy, _ = models
    twin = copy.deepcopy(policy)
    for reference in (policy, twin):
        result = ev.evaluate(
            policy, reference, tokenizer, heldout.prompts[:8], None, max_new_tokens=6, progress=False
        )
        assert result.metrics["kl"] == 0.0
        assert result.metrics["kl_se"] == 0.0
        assert result.metrics["chosen_drift" if "chosen_drift" in result.metrics else "kl"] == 0.0
        assert (result.samples["response"] == result.samples["response_ref"]).all()


def _exact_kl_two_steps(policy, reference, prompt_ids: list[int], eos_id: int) -> float:  # noqa: ANN001
    """KL(pi || ref) over responses of at most two tokens (eos ends one early), by enumeration.

    Chain rule: KL = KL(pi(t1) || ref(t1)) + sum_{t1 != eos} pi(t1) KL(pi(t2|t1) || ref(t2|t1)),
    which sums over every one of the V + (V-1)*V possible responses exactly.
    """
    with torch.no_grad():
        x = torch.tensor([prompt_ids])
        lp1 = torch.log_softmax(policy(x).logits[0, -1].double(), -1)
        lq1 = torch.log_softmax(reference(x).logits[0, -1].double(), -1)
        vocab = lp1.shape[0]
        x2 = torch.cat([x.expand(vocab, -1), torch.arange(vocab)[:, None]], dim=1)
        lp2 = torch.log_softmax(policy(x2).logits[:, -1].double(), -1)
        lq2 = torch.log_softmax(reference(x2).logits[:, -1].double(), -1)
    kl1 = torch.sum(lp1.exp() * (lp1 - lq1))
    kl2 = torch.sum(lp2.exp() * (lp2 - lq2), dim=-1)  # per first token
    go_on = torch.ones(vocab, dtype=torch.bool)
    go_on[eos_id] = False
    return float(kl1 + torch.sum(lp1.exp()[go_on] * kl2[go_on]))


def test_kl_estimate_matches_exact_kl_by_enumeration(tokenizer, models) -> None:  # noqa: ANN001
    policy, reference = models
    prompt = make_prompt([12, 3, 40])
    prompt_ids = tokenizer(prompt)["input_ids"]
    exact = _exact_kl_two_steps(policy, reference, prompt_ids, tokenizer.eos_token_id)
    assert exact > 0.5  # a clearly non-zero target, or the check would be weak

    # The model's own generation defaults must not leak into the sampler: top_k or min_p here
    # would truncate pi and bias the estimate far beyond the tolerance below (so would
    # transformers' global default top_k=50, which the sampler must switch off).
    policy.generation_config.top_k = 5
    policy.generation_config.min_p = 0.1
    try:
        n = 3000
        samples = ev.sample_tokens(policy, tokenizer, [prompt] * n, 2, greedy=False, seed=11, batch_size=1000)
        assert policy.generation_config.min_p == 0.1  # the model's config is back afterwards
    finally:
        policy.generation_config.top_k = policy.generation_config.min_p = None
    pad = tokenizer.pad_token_id
    lp = ev.token_logps(policy, samples.prompt_ids, samples.completion_ids, pad_token_id=pad)
    lq = ev.token_logps(reference, samples.prompt_ids, samples.completion_ids, pad_token_id=pad)
    estimate, se = ev.kl_estimate(lp, lq)
    # Unbiased estimator, n = 3000: the error is ~N(0, se^2); 4 se is a 1-in-15,000 false alarm,
    # and se must be small next to the KL for the comparison to mean anything.
    assert se < 0.1 * exact
    assert abs(estimate - exact) < 4 * se, (estimate, exact, se)


# --------------------------------------------------------------------------- end to end


def test_evaluate_end_to_end_all_metrics_and_deterministic(tokenizer, models, heldout, tmp_path) -> None:  # noqa: ANN001
    policy, reference = models
    kwargs = {"gold_reward": gold_reward, "beta": 0.1, "max_new_tokens": 12, "max_length": 128, "seed": 3}
    first = ev.evaluate(
        policy, reference, tokenizer, heldout.prompts, heldout.pairs, progress=False, **kwargs
    )
    second = ev.evaluate(
        policy, reference, tokenizer, heldout.prompts, heldout.pairs, progress=False, **kwargs
    )
    expected = {
        "gold_reward", "gold_reward_ref", "win_rate",
        "len_tokens", "len_tokens_ref", "len_chars", "len_chars_ref",
        "implicit_acc", "implicit_margin", "chosen_drift", "rejected_drift",
        "chosen_drift_low_edit", "chosen_drift_high_edit",
        "kl", "kl_se",
    }  # fmt: skip
    assert set(first.metrics) == expected
    assert all(math.isfinite(v) for v in first.metrics.values())
    assert first.metrics == second.metrics
    assert first.samples.equals(second.samples)
    assert first.pairs is not None and first.pairs.equals(second.pairs)
    assert first.samples.height == len(heldout.prompts)
    assert first.pairs.height == heldout.pairs.height
    # the metrics are what the frames say
    s = first.samples
    assert first.metrics["gold_reward"] == pytest.approx(s["gold"].mean())
    assert first.metrics["win_rate"] == pytest.approx(
        ev.win_rate(s["gold"].to_numpy(), s["gold_ref"].to_numpy())
    )
    assert first.metrics["len_chars"] == pytest.approx(s["response"].str.len_chars().mean())
    assert first.metrics["kl"] == pytest.approx(s["kl_log_ratio"].mean())
    assert 0.0 <= first.metrics["implicit_acc"] <= 1.0
    assert (
        first.counts["chosen_drift_low_edit"] + first.counts["chosen_drift_high_edit"] == heldout.pairs.height
    )
    # different policy and reference: a non-zero KL
    assert first.metrics["kl"] != 0.0

    # no gold reward: gold metrics are skipped, not faked; the rest still run
    blind = ev.evaluate(
        policy,
        reference,
        tokenizer,
        heldout.prompts[:6],
        heldout.pairs.drop("is_low_edit"),
        max_new_tokens=6,
        progress=False,
    )
    assert not {"gold_reward", "gold_reward_ref", "win_rate"} & set(blind.metrics)
    assert not {"chosen_drift_low_edit", "chosen_drift_high_edit"} & set(blind.metrics)
    assert {"len_tokens", "kl", "implicit_acc", "chosen_drift"} <= set(blind.metrics)
    assert "gold" not in blind.samples.columns

    # the evals table: one row per metric, re-runs replace, other models' rows stay
    catalog = Catalog(tmp_path)
    assert ev.write_evals(catalog, "run1", first, "dpo") == len(expected)
    assert ev.write_evals(catalog, "run1", blind, "dpop") == len(blind.metrics)
    assert ev.write_evals(catalog, "run1", second, "dpo") == len(expected)
    counts = catalog.query(
        "SELECT model, count(*) AS n FROM evals GROUP BY model ORDER BY model", read_only=False
    )
    assert counts.to_dicts() == [
        {"model": "dpo", "n": len(expected)},
        {"model": "dpop", "n": len(blind.metrics)},
    ]
    row = catalog.query(
        "SELECT value, n, details->>'$.wins' AS wins, details->>'$.beta' AS beta FROM evals "
        "WHERE model = 'dpo' AND metric = 'win_rate'",
        read_only=False,
    ).to_dicts()[0]
    assert row["value"] == pytest.approx(first.metrics["win_rate"])
    assert row["n"] == len(heldout.prompts)
    assert int(row["wins"]) == first.details["win_rate"]["wins"] and float(row["beta"]) == 0.1
    # one prompt: no standard error exists; it is left out (kl_se) or null (details), never NaN
    single = ev.evaluate(
        policy,
        reference,
        tokenizer,
        heldout.prompts[:1],
        None,
        gold_reward=gold_reward,
        max_new_tokens=4,
        progress=False,
    )
    assert "kl_se" not in single.metrics and "kl" in single.metrics
    ev.write_evals(catalog, "run1", single, "single")
    se = catalog.query(
        "SELECT details->>'$.se' AS se FROM evals WHERE model = 'single' AND metric = 'gold_reward'",
        read_only=False,
    )
    assert se["se"].to_list() == [None]
    rows = first.to_rows("run1", "dpo")
    assert rows.columns == list(ev.EVAL_COLUMNS)
    assert all(isinstance(json.loads(d), dict) for d in rows["details"])
