"""Tests for training/objectives.py.

TRL parity runs a real ``trl.DPOTrainer`` on a tiny random Llama, so the expected numbers come
from TRL's own code path; the variant tests use hand-computed values on crafted tensors.
"""

from __future__ import annotations

import io
import math
import statistics
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from training.objectives import PRESETS, Objective, _sample_without_replacement


def _t(*values: float, grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=grad)


def _softplus(x: float) -> float:
    """-log sigmoid(-x), computed by hand."""
    return math.log1p(math.exp(x))


# --------------------------------------------------------------------------- TRL parity

WORDS = "the a cat dog sat ran on mat fast slow red blue is was and".split()
PAIRS = {
    "prompt": ["the cat", "a dog", "the mat is", "red and blue", "a cat was", "the dog"],
    "chosen": [" sat on the mat", " ran fast", " red", " is the cat and the dog", " slow", " sat"],
    "rejected": [" ran", " sat slow on a red mat", " blue and red", " was", " fast and red", " on a mat"],
}


def _trl_trainer(loss_type: str, beta: float, out_dir: Path) -> Any:
    """A real DPOTrainer on a tiny random Llama (policy and reference initialised differently)."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from trl import DPOConfig, DPOTrainer

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        initializer_range=0.5,  # wide init: log-ratios of several nats, so the losses differ
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    torch.manual_seed(0)
    policy = LlamaForCausalLM(config)
    torch.manual_seed(1)
    ref = LlamaForCausalLM(config)
    args = DPOConfig(
        output_dir=str(out_dir),
        loss_type=[loss_type],
        beta=beta,
        report_to=[],
        per_device_train_batch_size=len(PAIRS["prompt"]),
        use_cpu=True,
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=ref,
        args=args,
        train_dataset=Dataset.from_dict(PAIRS),
        processing_class=tokenizer,
    )
    trainer.model.eval()
    return trainer


def _trl_run(trainer: Any) -> dict[str, torch.Tensor]:
    """TRL's batch loss, its per-pair losses (one-pair batches) and the log-probs it computed."""
    batch = next(iter(trainer.get_train_dataloader()))
    captured: dict[str, torch.Tensor] = {}

    def capture(name: str) -> Any:
        def hook(module: Any, args: Any, kwargs: Any, output: Any) -> None:
            captured[name] = output.log_probs.detach()

        return hook

    handles = [
        trainer.model.register_forward_hook(capture("policy"), with_kwargs=True),
        trainer.ref_model.register_forward_hook(capture("ref"), with_kwargs=True),
    ]
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        seq_len = batch["completion_mask"].size(1) - 1
        # TRL sums the per-token log-probs it returns; labels outside the completion are 0 there.
        policy = captured["policy"][:, -seq_len:].sum(dim=1)
        ref = captured["ref"][:, -seq_len:].sum(dim=1)
        n = policy.numel() // 2
        per_pair = torch.stack(
            [
                trainer.compute_loss(trainer.model, {k: v[[i, n + i]] for k, v in batch.items()})
                for i in range(n)
            ]
        )
    for h in handles:
        h.remove()
    pc, pr = policy.chunk(2)
    rc, rr = ref.chunk(2)
    lengths_c, lengths_r = batch["completion_mask"].sum(dim=1).chunk(2)
    return {
        "loss": loss.detach(),
        "per_pair": per_pair,
        "logps": torch.stack([pc, pr, rc, rr]),
        "lengths": torch.stack([lengths_c, lengths_r]),
    }


@pytest.fixture(scope="module")
def trl_sigmoid(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    beta = PRESETS["dpo"].get("beta", Objective.beta)
    return _trl_run(_trl_trainer("sigmoid", beta, tmp_path_factory.mktemp("trl_sigmoid")))


@pytest.fixture(scope="module")
def trl_sigmoid_norm(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    beta = PRESETS["ln-dpo"]["beta"]
    return _trl_run(_trl_trainer("sigmoid_norm", beta, tmp_path_factory.mktemp("trl_norm")))


def test_dpo_preset_matches_trl_sigmoid(trl_sigmoid: dict[str, torch.Tensor]) -> None:
    pc, pr, rc, rr = trl_sigmoid["logps"]
    # The batch must discriminate: losses spread away from log 2 (a zero margin).
    assert trl_sigmoid["per_pair"].std() > 0.05
    obj = Objective.from_preset("dpo")
    loss, stats = obj.loss(pc, pr, rc, rr)
    per_pair, _ = obj.loss(pc, pr, rc, rr, reduction="none")
    assert loss.item() == pytest.approx(trl_sigmoid["loss"].item(), abs=1e-6)
    torch.testing.assert_close(per_pair, trl_sigmoid["per_pair"], atol=1e-6, rtol=0)
    assert stats["mask"].all() and stats["kept_fraction"] == 1.0


def test_ln_dpo_preset_matches_trl_sigmoid_norm(
    trl_sigmoid_norm: dict[str, torch.Tensor], trl_sigmoid: dict[str, torch.Tensor]
) -> None:
    pc, pr, rc, rr = trl_sigmoid_norm["logps"]
    lc, lr = trl_sigmoid_norm["lengths"]
    assert not torch.equal(lc, lr)  # unequal lengths, or normalisation could not show
    obj = Objective.from_preset("ln-dpo")
    loss, _ = obj.loss(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr)
    per_pair, _ = obj.loss(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr, reduction="none")
    assert loss.item() == pytest.approx(trl_sigmoid_norm["loss"].item(), abs=1e-6)
    torch.testing.assert_close(per_pair, trl_sigmoid_norm["per_pair"], atol=1e-6, rtol=0)
    # Same models and batch; sigmoid and sigmoid_norm must not coincide.
    assert (per_pair - trl_sigmoid["per_pair"]).abs().max() > 1e-3


def test_length_normalize_needs_lengths_and_clamps_zero() -> None:
    obj = Objective(length_normalize=True, beta=1.0)
    args = (_t(-2.0), _t(-6.0), _t(-3.0), _t(-3.0))
    with pytest.raises(ValueError, match="lengths"):
        obj.loss(*args)
    with pytest.raises(ValueError, match="lengths"):
        obj.loss(*args, chosen_lengths=torch.tensor([2]))
    loss, _ = obj.loss(*args, chosen_lengths=torch.tensor([0]), rejected_lengths=torch.tensor([3]))
    assert loss.item() == pytest.approx(_softplus(-(1.0 / 1 - (-3.0) / 3)))


# ------------------------------------------------------------------------------ DPOP


@pytest.mark.parametrize(
    ("r_w", "r_l", "expected"),
    [
        (-1.0, -3.0, _softplus(-0.1 * (-1.0 + 3.0 - 50.0 * 1.0))),  # penalty active: r_w < 0
        (2.0, 1.0, _softplus(-0.1 * (2.0 - 1.0))),  # inactive: plain DPO
        (0.0, 0.5, _softplus(-0.1 * (0.0 - 0.5))),  # boundary: max(0, -0) = 0
    ],
)
def test_dpop_inside_hand_values(r_w: float, r_l: float, expected: float) -> None:
    obj = Objective.from_preset("dpop")
    loss, _ = obj.loss(_t(r_w - 5), _t(r_l - 7), _t(-5.0), _t(-7.0))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize(
    ("r_w", "r_l", "expected"),
    [
        (-1.0, -3.0, _softplus(-0.1 * 2.0) + 50.0 * 1.0),
        (2.0, 1.0, _softplus(-0.1 * 1.0)),
    ],
)
def test_dpop_outside_hand_values(r_w: float, r_l: float, expected: float) -> None:
    obj = Objective.from_preset("dpop", dpop_placement="outside")
    loss, _ = obj.loss(_t(r_w), _t(r_l), _t(0.0), _t(0.0))
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def _grads(obj: Objective, r_w: float, r_l: float) -> tuple[float, float]:
    pc, pr = _t(r_w, grad=True), _t(r_l, grad=True)
    loss, _ = obj.loss(pc, pr, _t(0.0), _t(0.0))
    loss.backward()
    assert pc.grad is not None and pr.grad is not None
    return pc.grad.item(), pr.grad.item()


@pytest.mark.parametrize("placement", ["inside", "outside"])
def test_dpop_pushes_chosen_up_harder_when_below_reference(placement: str) -> None:
    dpo = Objective.from_preset("dpo")
    dpop = Objective.from_preset("dpop", dpop_placement=placement)
    g_dpo, _ = _grads(dpo, -0.5, -2.0)
    g_dpop, _ = _grads(dpop, -0.5, -2.0)
    assert g_dpo < 0 and g_dpop < g_dpo  # descent raises log pi(y_w) more under DPOP
    g_dpo, _ = _grads(dpo, 0.5, -2.0)
    g_dpop, _ = _grads(dpop, 0.5, -2.0)
    assert g_dpop == pytest.approx(g_dpo, rel=1e-12)  # r_w >= 0: no penalty


# ------------------------------------------------------------------------- MinorDPO


@pytest.mark.parametrize(
    ("r_w", "r_l", "expected"),
    [
        (1.0, -4.0, _softplus(-0.1 * 1.0)),  # r_l < 0 clamped to 0
        (1.0, 3.0, _softplus(-0.1 * (1.0 - 3.0))),  # r_l > 0 kept
    ],
)
def test_minor_dpo_hand_values(r_w: float, r_l: float, expected: float) -> None:
    loss, stats = Objective.from_preset("minor-dpo").loss(_t(r_w), _t(r_l), _t(0.0), _t(0.0))
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert stats["rejected_rewards"].item() == pytest.approx(0.1 * r_l)  # rewards are unclamped


def test_minor_dpo_stops_pushing_rejected_below_reference() -> None:
    minor = Objective.from_preset("minor-dpo")
    g_w, g_l = _grads(minor, 0.3, -0.2)
    assert g_l == 0.0 and g_w < 0
    _, g_l = _grads(minor, 0.3, 0.2)
    assert g_l > 0  # still pushed down while above the reference
    _, g_l_dpo = _grads(Objective.from_preset("dpo"), 0.3, -0.2)
    assert g_l_dpo > 0  # plain DPO keeps pushing


# ------------------------------------------------------------------------- beta-DPO


def _batches(n_batches: int, n: int, seed: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    for _ in range(n_batches):
        yield tuple(torch.randn(n, generator=g, dtype=torch.float64) * 3 for _ in range(4))


def _gaps(batch: tuple[torch.Tensor, ...]) -> list[float]:
    pc, pr, rc, rr = batch
    return ((pc - rc) - (pr - rr)).tolist()


def test_beta_dpo_running_stats_follow_momentum_recursion() -> None:
    obj = Objective.from_preset("beta-dpo", seed=0)
    m0 = sigma = 0.0
    for batch in _batches(4, 10):
        gaps = _gaps(batch)
        m0 = 0.9 * m0 + 0.1 * statistics.fmean(gaps)
        sigma = 0.9 * sigma + 0.1 * statistics.stdev(gaps)
        _, stats = obj.loss(*batch)
        assert stats["gap_mean"] == pytest.approx(m0, rel=1e-12)
        assert stats["gap_std"] == pytest.approx(sigma, rel=1e-12)
    assert obj.state_dict()["steps"] == 4


def test_beta_dpo_keep_all_beta_formula_and_loss() -> None:
    obj = Objective.from_preset("beta-dpo", beta_keep=1.0, seed=0)
    m0 = sigma = 0.0
    for batch in _batches(3, 6):
        gaps = _gaps(batch)
        m0 = 0.9 * m0 + 0.1 * statistics.fmean(gaps)  # stats move before the loss
        sigma = 0.9 * sigma + 0.1 * statistics.stdev(gaps)
        beta_b = max(0.1 * (1 + 0.6 * (statistics.fmean(gaps) - m0)), 1e-3)
        loss, stats = obj.loss(*batch)
        assert stats["mask"].all()
        assert stats["beta"] == pytest.approx(beta_b, rel=1e-12)
        expected = statistics.fmean(_softplus(-beta_b * m) for m in gaps)
        assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_beta_dpo_beta_clamped_and_detached() -> None:
    obj = Objective.from_preset("beta-dpo", beta_keep=1.0, beta_alpha=100.0)
    pc = _t(-5.0, -6.0, -7.0, grad=True)  # large negative gaps drive beta below zero
    _, stats = obj.loss(pc, _t(0.0, 0.0, 0.0), _t(0.0, 0.0, 0.0), _t(0.0, 0.0, 0.0))
    assert stats["beta"] == 1e-3
    assert isinstance(stats["beta"], float)


@pytest.mark.parametrize(("n", "keep"), [(10, 0.8), (10, 0.7), (7, 0.8), (64, 0.75), (5, 0.5), (100, 0.71)])
def test_beta_dpo_kept_count(n: int, keep: float) -> None:
    obj = Objective.from_preset("beta-dpo", beta_keep=keep, seed=1)
    expected = math.floor(round(n * keep, 9))
    for batch in _batches(3, n):
        loss, stats = obj.loss(*batch, reduction="none")
        assert int(stats["mask"].sum()) == expected
        assert stats["kept_fraction"] == pytest.approx(expected / n)
        assert (loss[~stats["mask"]] == 0).all() and (loss[stats["mask"]] > 0).all()


def test_beta_dpo_keeps_at_least_one_pair() -> None:
    _, stats = Objective.from_preset("beta-dpo").loss(_t(1.0), _t(0.0), _t(0.0), _t(0.0))
    assert stats["mask"].tolist() == [True]


def test_beta_dpo_reductions_agree() -> None:
    batch = next(_batches(1, 10))
    per_pair, stats = Objective.from_preset("beta-dpo", seed=3).loss(*batch, reduction="none")
    mean, _ = Objective.from_preset("beta-dpo", seed=3).loss(*batch)
    total, _ = Objective.from_preset("beta-dpo", seed=3).loss(*batch, reduction="sum")
    assert mean.item() == pytest.approx(per_pair.sum().item() / stats["mask"].sum().item())
    assert total.item() == pytest.approx(per_pair.sum().item())


def test_beta_dpo_equal_gaps_no_nan() -> None:
    obj = Objective.from_preset("beta-dpo", seed=0)
    same = _t(*[0.5] * 8)
    zeros = _t(*[0.0] * 8)
    loss, stats = obj.loss(same, zeros, zeros, zeros)  # first batch: sigma = 0
    assert torch.isfinite(loss) and math.isfinite(stats["beta"])
    assert int(stats["mask"].sum()) == 6
    loss, stats = obj.loss(zeros, zeros, zeros, zeros)  # all gaps 0, still sigma = 0
    assert torch.isfinite(loss) and math.isfinite(stats["beta"])


def test_beta_dpo_drops_outliers() -> None:
    obj = Objective.from_preset("beta-dpo", seed=0)
    for batch in _batches(20, 10):  # warm the running stats up
        obj.loss(*batch)
    gaps = _t(*[obj.gap_mean] * 8, 1e3, -1e3)
    zeros = torch.zeros(10, dtype=torch.float64)
    _, stats = obj.loss(gaps, zeros, zeros, zeros)
    assert stats["mask"].tolist() == [True] * 8 + [False, False]


def test_sampler_is_multinomial_without_replacement() -> None:
    for seed in range(20):
        w = torch.rand(12, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64) + 0.05
        ours = _sample_without_replacement(w.log(), 7, torch.Generator().manual_seed(seed))
        idx = torch.multinomial(w, 7, replacement=False, generator=torch.Generator().manual_seed(seed))
        assert set(ours.nonzero().flatten().tolist()) == set(idx.tolist())


def test_sampler_survives_underflowing_and_nan_weights() -> None:
    # exp(-1e4) is 0 in any float: multinomial would choose among zeros; log space keeps the order.
    log_w = _t(0.0, -1e4, -2e4, -3e4, -4e4)
    for seed in range(10):
        perm = torch.randperm(5, generator=torch.Generator().manual_seed(seed))
        mask = _sample_without_replacement(log_w[perm], 2, torch.Generator().manual_seed(seed))
        assert sorted(perm[mask].tolist()) == [0, 1]
    mask = _sample_without_replacement(_t(math.nan, math.nan, math.nan), 2, None)
    assert int(mask.sum()) == 2


def test_beta_dpo_seeded_sampling_reproducible() -> None:
    def masks(seed: int) -> list[list[bool]]:
        obj = Objective.from_preset("beta-dpo", seed=seed)
        return [obj.loss(*b)[1]["mask"].tolist() for b in _batches(5, 16)]

    assert masks(7) == masks(7)
    assert masks(7) != masks(8)


def test_beta_dpo_state_dict_round_trip() -> None:
    batches = list(_batches(5, 16))
    a = Objective.from_preset("beta-dpo", seed=0)
    for b in batches[:3]:
        a.loss(*b)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b_obj = Objective.from_preset("beta-dpo", seed=0)
    b_obj.load_state_dict(torch.load(buf, weights_only=True))
    fresh = Objective.from_preset("beta-dpo", seed=0)
    for b in batches[3:]:
        la, sa = a.loss(*b)
        lb, sb = b_obj.loss(*b)
        assert torch.equal(sa["mask"], sb["mask"]) and sa["beta"] == sb["beta"] and torch.equal(la, lb)
        assert fresh.loss(*b)[1]["beta"] != sa["beta"]  # the restored state is what makes them agree


def test_beta_dpo_eval_calls_leave_training_untouched() -> None:
    batches = list(_batches(4, 16))
    plain = Objective.from_preset("beta-dpo", seed=0)
    with_eval = Objective.from_preset("beta-dpo", seed=0)
    for b in batches:
        before = with_eval.state_dict()
        _, s_eval = with_eval.loss(*batches[0], update_stats=False)
        after = with_eval.state_dict()
        assert (before["gap_mean"], before["gap_std"], before["steps"]) == (
            after["gap_mean"],
            after["gap_std"],
            after["steps"],
        )
        assert torch.equal(before["generator"], after["generator"])
        assert int(s_eval["mask"].sum()) == math.floor(16 * 0.8)
        assert torch.equal(plain.loss(*b)[1]["mask"], with_eval.loss(*b)[1]["mask"])


def test_composition_beta_dpo_dpop_ln() -> None:
    obj = Objective.from_preset("beta-dpo", dpop_lambda=50.0, length_normalize=True, beta_keep=1.0)
    pc, pr, rc, rr = _t(-8.0, 2.0, -1.0), _t(-4.0, -6.0, 3.0), _t(-6.0, 0.0, 0.0), _t(0.0, 0.0, 0.0)
    lc, lr = torch.tensor([4, 2, 1]), torch.tensor([2, 3, 5])
    r_w = [(-8.0 + 6.0) / 4, 2.0 / 2, -1.0 / 1]
    r_l = [-4.0 / 2, -6.0 / 3, 3.0 / 5]
    z = [w - lo - 50.0 * max(0.0, -w) for w, lo in zip(r_w, r_l, strict=True)]  # what beta multiplies
    raw = [(-8.0 + 6.0) - (-4.0), 2.0 - (-6.0), -1.0 - 3.0]  # beta-DPO's M: summed, untransformed
    loss, stats = obj.loss(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr)
    assert stats["gaps"].tolist() == pytest.approx(raw)
    assert stats["loss_margins"].tolist() == pytest.approx(z)
    m0 = 0.1 * statistics.fmean(raw)
    beta_b = max(0.1 * (1 + 0.6 * (statistics.fmean(raw) - m0)), 1e-3)
    assert stats["beta"] == pytest.approx(beta_b)
    assert loss.item() == pytest.approx(statistics.fmean(_softplus(-beta_b * g) for g in z))


# ------------------------------------------- beta-DPO composed with LN, MinorDPO and DPOP (issue 15)
#
# The reference's arithmetic, written out (github.com/junkangwu/beta-DPO, trainers.py; OBJECTIVES.md
# section 4): M = r_w - r_l on summed log-probs, running statistics updated before the loss, weights
# exp(-0.5 ((M - M0) / sigma)^2), k = floor(N * keep) pairs drawn with torch.multinomial without
# replacement, beta_b = beta0 * (1 + a * (mean of the kept M - M0)). Whatever the objective adds
# (LN, Minor's clamp, DPOP's penalty) changes the loss, never M.


def _reference_beta_dpo(batches: list[tuple[torch.Tensor, ...]], seed: int, keep: float = 0.8, beta0: float = 0.1,
                        alpha: float = 0.6) -> list[dict[str, Any]]:
    """Per step: M0, sigma, the kept mask and beta_b, as the reference code computes them."""
    generator = torch.Generator().manual_seed(seed)
    m0 = sigma = 0.0
    out = []
    for pc, pr, rc, rr in batches:
        gaps = (pc - rc) - (pr - rr)
        m0 = 0.9 * m0 + 0.1 * gaps.mean().item()
        sigma = 0.9 * sigma + 0.1 * gaps.std().item()
        weights = torch.exp(-0.5 * ((gaps - m0) / max(sigma, 1e-8)) ** 2)
        k = math.floor(gaps.numel() * keep + 1e-9)
        mask = torch.zeros(gaps.numel(), dtype=torch.bool)
        mask[torch.multinomial(weights, k, replacement=False, generator=generator)] = True
        beta_b = max(beta0 * (1 + alpha * (gaps[mask].mean().item() - m0)), 1e-3)
        out.append({"m0": m0, "sigma": sigma, "mask": mask, "beta": beta_b, "gaps": gaps})
    return out


def _training_like_batches(steps: int, n: int, seed: int, drift: float = 0.02) -> tuple[list[tuple[torch.Tensor, ...]],
                                                                                       list[tuple]]:
    """Summed log-ratios of 10-40-token completions; per token, r_w drifts up (r_l down) by `drift` a step."""
    g = torch.Generator().manual_seed(seed)
    batches, lengths = [], []
    for step in range(steps):
        lc = torch.randint(10, 41, (n,), generator=g)
        lr = torch.randint(10, 41, (n,), generator=g)
        r_w = lc * (drift * step + 0.08 * torch.randn(n, generator=g, dtype=torch.float64))
        r_l = lr * (-drift * step + 0.08 * torch.randn(n, generator=g, dtype=torch.float64))
        zeros = torch.zeros(n, dtype=torch.float64)
        batches.append((r_w, r_l, zeros, zeros))
        lengths.append((lc, lr))
    return batches, lengths


COMPOSITIONS = [
    {},
    {"dpop_lambda": 50.0},
    {"dpop_lambda": 50.0, "dpop_placement": "outside"},
    {"minor": True},
    {"length_normalize": True},
    {"length_normalize": True, "beta": 2.0, "dpop_lambda": 50.0},  # the composition Winnow advises for the demo
    {"length_normalize": True, "minor": True, "dpop_lambda": 50.0},
]


@pytest.mark.parametrize("knobs", COMPOSITIONS, ids=lambda k: "+".join(k) or "beta-dpo")
def test_beta_dpo_statistic_is_the_raw_gap_whatever_the_objective_adds(knobs: dict[str, Any]) -> None:
    batches, lengths = _training_like_batches(12, 24, seed=4)
    obj = Objective.from_preset("beta-dpo", seed=11, **knobs)
    beta0 = obj.beta
    expected = _reference_beta_dpo(batches, seed=11, beta0=beta0)
    for (pc, pr, rc, rr), (lc, lr), ref in zip(batches, lengths, expected, strict=True):
        loss, stats = obj.loss(pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr)
        assert (stats["gap_mean"], stats["gap_std"]) == pytest.approx((ref["m0"], ref["sigma"]), rel=1e-12)
        assert torch.equal(stats["mask"], ref["mask"])
        assert stats["beta"] == pytest.approx(ref["beta"], rel=1e-12)
        # the loss still uses the transformed margin, on the kept pairs, with the batch's beta
        r_w, r_l = pc - rc, pr - rr
        if knobs.get("length_normalize"):
            r_w, r_l = r_w / lc, r_l / lr
        z = r_w - (r_l.clamp(min=0) if knobs.get("minor") else r_l)
        penalty = knobs.get("dpop_lambda", 0.0) * torch.relu(-r_w)
        inside = knobs.get("dpop_placement", "inside") == "inside"
        per_pair = -F.logsigmoid(ref["beta"] * (z - penalty if inside else z)) + (0 if inside else penalty)
        assert loss.item() == pytest.approx(per_pair[ref["mask"]].mean().item(), rel=1e-10)


def test_length_normalisation_keeps_the_dynamic_beta_moving() -> None:
    """Issue 15, point 1: under LN the statistic stays on sums, so beta_b/beta0 moves as much as without LN."""
    batches, lengths = _training_like_batches(60, 32, seed=7)
    traces = {}
    for ln in (False, True):
        obj = Objective.from_preset("beta-dpo", seed=5, length_normalize=ln, beta=2.0 if ln else 0.1)
        traces[ln] = [obj.loss(*b, chosen_lengths=lc, rejected_lengths=lr)[1]["beta"] / obj.beta
                      for b, (lc, lr) in zip(batches, lengths, strict=True)]
    assert traces[True] == pytest.approx(traces[False], rel=1e-12)  # LN changes the loss, not beta_b/beta0
    reference = [r["beta"] / 0.1 for r in _reference_beta_dpo(batches, seed=5)]
    assert traces[True] == pytest.approx(reference, rel=1e-12)
    moving = statistics.pstdev(traces[True][10:])
    assert moving > 0.15  # beta_b really adapts: a spread of 15%+ of beta0 after the first steps
    # what taking M on the per-token gaps (the earlier code) did to the same batches: inert
    per_token = [((pc - rc) / lc - (pr - rr) / lr, pc) for (pc, pr, rc, rr), (lc, lr) in zip(batches, lengths,
                                                                                              strict=True)]
    inert = _reference_beta_dpo([(g, torch.zeros_like(g), torch.zeros_like(g), torch.zeros_like(g))
                                 for g, _ in per_token], seed=5)
    assert statistics.pstdev([r["beta"] / 0.1 for r in inert][10:]) < moving / 10


def test_dpop_penalty_does_not_decide_which_pairs_beta_dpo_drops() -> None:
    """Issue 15, point 2: with lambda 50 the pairs DPOP protects (r_w < 0) are dropped at the reference's rate."""
    batches, _ = _training_like_batches(200, 32, seed=9, drift=0.0)  # r_w < 0 for about half the pairs
    obj = Objective.from_preset("beta-dpo", seed=2, dpop_lambda=50.0)
    reference = _reference_beta_dpo(batches, seed=2)
    dropped = below = dropped_ref = 0
    betas, betas_ref = [], []
    for b, ref in zip(batches, reference, strict=True):
        stats = obj.loss(*b)[1]
        negative = (b[0] - b[2]) < 0
        below += int(negative.sum())
        dropped += int((negative & ~stats["mask"]).sum())
        dropped_ref += int((negative & ~ref["mask"]).sum())
        betas.append(stats["beta"])
        betas_ref.append(ref["beta"])
    assert dropped == dropped_ref and below > 2000
    assert 0.15 < dropped / below < 0.35  # near the overall 20%, not singled out
    assert statistics.fmean(betas) == pytest.approx(statistics.fmean(betas_ref), rel=1e-12)


def test_keep_share_is_the_papers_rho_and_the_drop_share_name_is_refused() -> None:
    """Issue 15, point 4: the paper's rho 0.8 keeps 80%; beta_rho (a drop share) cannot be passed by mistake."""
    batch = next(_batches(1, 10))
    _, stats = Objective.from_preset("beta-dpo", beta_keep=0.8, seed=0).loss(*batch)
    assert int(stats["mask"].sum()) == 8
    for build in (lambda: Objective.from_preset("beta-dpo", beta_rho=0.8), lambda: Objective(beta_rho=0.2)):
        with pytest.raises(ValueError, match="beta_keep, the share of each batch KEPT"):
            build()
    with pytest.raises(ValueError, match="for a drop share d pass beta_keep = 1 - d"):
        Objective.from_preset("beta-dpo", beta_keep=0.2)  # a drop share pasted into the keep share
    from curation.errors import WinnowError
    from training.config import TrainConfig, resolve_objective

    with pytest.raises((ValueError, WinnowError), match="beta_keep"):
        resolve_objective(TrainConfig(objective="beta-dpo", objective_overrides={"beta_rho": 0.8}), None)


def _dist_worker(rank: int, world: int, tmp: str, batch: tuple[torch.Tensor, ...]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=rank, world_size=world)
    try:
        n = batch[0].numel() // world
        local = tuple(t[rank * n : (rank + 1) * n] for t in batch)
        seeded = Objective.from_preset("beta-dpo", seed=0)
        unseeded = Objective.from_preset("beta-dpo")
        torch.manual_seed(rank)  # ranks' global RNGs differ, as after per-rank seeding in a trainer
        for _ in range(3):
            loss, stats = seeded.loss(*local, reduction="none")
        # Equal gaps give equal weights, so each unseeded draw is uniform and would differ per rank.
        ones, zeros = torch.ones(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
        free = [unseeded.loss(ones, zeros, zeros, zeros)[1] for _ in range(10)]
        result = {
            "loss": loss,
            "mask": stats["mask"],
            "beta": stats["beta"],
            "m0": seeded.gap_mean,
            "sigma": seeded.gap_std,
            "free_masks": torch.stack([f["mask"] for f in free]),
            "free_betas": [f["beta"] for f in free],
        }
        torch.save(result, f"{tmp}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_beta_dpo_distributed_matches_single_process(tmp_path: Path) -> None:
    batch = next(_batches(1, 12))
    single = Objective.from_preset("beta-dpo", seed=0)
    for _ in range(3):
        loss, stats = single.loss(*batch, reduction="none")
    mp.start_processes(_dist_worker, args=(2, str(tmp_path), batch), nprocs=2, start_method="spawn")
    results = [torch.load(tmp_path / f"{rank}.pt") for rank in range(2)]
    # Statistics, selection and beta are global; each rank keeps its own slice of the mask.
    assert torch.equal(torch.cat([r["loss"] for r in results]), loss)
    assert torch.equal(torch.cat([r["mask"] for r in results]), stats["mask"])
    for r in results:
        assert (r["beta"], r["m0"], r["sigma"]) == (stats["beta"], single.gap_mean, single.gap_std)
    # Unseeded ranks still agree on one kept set (rank 0's draw) and hence on beta.
    kept_per_step = results[0]["free_masks"].sum(dim=1) + results[1]["free_masks"].sum(dim=1)
    assert kept_per_step.tolist() == [math.floor(12 * 0.8)] * 10
    assert results[0]["free_betas"] == results[1]["free_betas"]


# ------------------------------------------------------------------ presets, options


def test_presets_set_their_knobs() -> None:
    assert Objective.from_preset("dpo") == Objective(name="dpo")
    assert Objective.from_preset("dpop").dpop_lambda == 50.0
    assert Objective.from_preset("ln-dpo").length_normalize
    assert Objective.from_preset("minor-dpo").minor
    b = Objective.from_preset("beta-dpo")
    assert (b.dynamic_beta, b.beta, b.beta_alpha, b.beta_keep) == (True, 0.1, 0.6, 0.8)
    c = Objective.from_preset("beta-dpo", dpop_lambda=5.0, minor=True, beta=0.3)
    assert (c.name, c.dynamic_beta, c.dpop_lambda, c.minor, c.beta) == ("beta-dpo", True, 5.0, True, 0.3)


def test_preset_errors() -> None:
    with pytest.raises(ValueError, match="dpo, dpop, ln-dpo, minor-dpo, beta-dpo"):
        Objective.from_preset("ipo")
    with pytest.raises(ValueError, match="lamda"):
        Objective.from_preset("dpop", dpop_lamda=5.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"beta": 0.0},
        {"dpop_lambda": -1.0},
        {"dpop_placement": "middle"},
        {"beta_keep": 1.01},
        {"beta_keep": 0.2},
        {"beta_rho": 0.2},
        {"beta_momentum": 1.0},
    ],
)
def test_invalid_options(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Objective(**kwargs)


def test_invalid_reduction_and_stats_keys() -> None:
    args = (_t(1.0, 2.0, grad=True), _t(0.0, 1.0, grad=True), _t(0.0, 0.0), _t(0.0, 0.0))
    with pytest.raises(ValueError, match="reduction"):
        Objective().loss(*args, reduction="max")  # type: ignore[arg-type]
    loss, stats = Objective().loss(*args, reduction="none")
    assert loss.shape == (2,)
    assert {"beta", "mask", "kept_fraction", "chosen_rewards", "rejected_rewards", "margins"} <= stats.keys()
    assert stats["mask"].dtype == torch.bool and stats["mask"].all()
    assert not any(stats[k].requires_grad for k in ("chosen_rewards", "rejected_rewards", "margins", "gaps",
                                                    "loss_margins"))
    torch.testing.assert_close(stats["margins"], _t(0.1, 0.1))
