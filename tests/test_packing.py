"""Packed training (training/packing.py) equals TRL's padded training: log-probs, loss and gradients.

Every model family the conversational path names is built tiny from its transformers config; a
fixed batch goes through TRL's own collator, then through TRL's padded fused-LM-head forward and
through the packed row, and the DPO loss and a few parameters' gradients are compared to 1e-5.
Families whose attention cannot be packed exactly are switched off with a reason. The trainer
tests run a few real TRL steps both ways. The module takes ~30 s on 2 cores.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import add_fused_lm_head

from training.objectives import Objective
from training.packing import choose_packing, pack_batch, packed_logps

VOCAB = 97
COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GQA = dict(num_key_value_heads=2)

FAMILIES = {
    "llama": (LlamaForCausalLM, lambda: LlamaConfig(**COMMON, **GQA)),
    "qwen2": (Qwen2ForCausalLM, lambda: Qwen2Config(**COMMON, **GQA)),
    "qwen3": (Qwen3ForCausalLM, lambda: Qwen3Config(**COMMON, **GQA, head_dim=8)),
    "mistral": (MistralForCausalLM, lambda: MistralConfig(**COMMON, **GQA, sliding_window=None)),
    "phi3": (Phi3ForCausalLM, lambda: Phi3Config(**COMMON, **GQA)),
    "gpt_neox": (GPTNeoXForCausalLM, lambda: GPTNeoXConfig(**COMMON, rotary_pct=0.5)),
    # soft-capping of the attention logits off; the final-logit soft-cap stays (TRL's fused head applies it)
    "gemma2": (Gemma2ForCausalLM, lambda: Gemma2Config(**COMMON, **GQA, head_dim=8, query_pre_attn_scalar=8,
                                                       attn_logit_softcapping=None, sliding_window=128)),
    "gemma3": (Gemma3ForCausalLM, lambda: Gemma3TextConfig(**COMMON, **GQA, head_dim=8, query_pre_attn_scalar=8,
                                                           sliding_window=128)),
}
BLOCKED = {
    "gemma2 soft-capping": (Gemma2ForCausalLM, lambda: Gemma2Config(**COMMON, **GQA, head_dim=8, sliding_window=128),
                            "soft-capping"),
    "mistral short window": (MistralForCausalLM, lambda: MistralConfig(**COMMON, **GQA, sliding_window=16),
                             "sliding-window"),
    "gemma3 short window": (Gemma3ForCausalLM, lambda: Gemma3TextConfig(**COMMON, **GQA, head_dim=8, sliding_window=16),
                            "sliding-window"),
}


def _model(family: str, table: dict = FAMILIES) -> torch.nn.Module:
    cls, config = table[family][:2]
    torch.manual_seed(0)
    cfg = config()
    cfg._attn_implementation = "eager" if family.startswith("gemma2") else "sdpa"
    model = cls(cfg).eval()
    add_fused_lm_head(model)
    return model


def _examples(n: int = 6, seed: int = 0) -> list[dict[str, list[int]]]:
    """Pairs of varied lengths; the first has an empty prompt (its first completion token is unscored)."""
    g = torch.Generator().manual_seed(seed)

    def ids(lo: int, hi: int) -> list[int]:
        k = int(torch.randint(lo, hi, (1,), generator=g))
        return torch.randint(3, VOCAB, (k,), generator=g).tolist()

    return [{"prompt_ids": ids(0 if i == 0 else 1, 40), "chosen_ids": ids(1, 30), "rejected_ids": ids(1, 30)}
            for i in range(n)]


def _padded_logps(model, batch) -> torch.Tensor:  # noqa: ANN001
    """TRL's _compute_loss forward on its padded batch."""
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                use_cache=False, fused_lm_head=True)
    return out.log_probs[:, -(batch["completion_mask"].size(1) - 1):].sum(1)


def _loss(logps: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    chosen, rejected = logps.chunk(2)
    ref_c, ref_r = ref.chunk(2)
    return Objective.from_preset("dpo").loss(chosen, rejected, ref_c, ref_r, update_stats=False)[0]


PROBES = ("embed", "layers.0.", "layers.1.", "norm")


def _grads(model) -> dict[str, torch.Tensor]:  # noqa: ANN001
    """Gradients of a few parameters: the embedding, one matrix per layer, a norm."""
    out = {}
    for name, p in model.named_parameters():
        probe = next((k for k in PROBES if k in name and k not in out), None)
        if probe is not None and p.grad is not None:
            out[probe] = p.grad.detach().clone()
    return out


SETTINGS = [(None, "keep_start", True), (30, "keep_start", True), (30, "keep_end", True), (None, "keep_start", False)]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_loss_and_grads_equal_padded(family):
    model = _model(family)
    examples = _examples()
    ref = torch.linspace(-60, -20, 2 * len(examples))  # fixed reference log-probs
    assert choose_packing("on", model, 80).enabled
    for max_length, mode, share in SETTINGS:
        batch = DataCollatorForPreference(pad_token_id=0, max_length=max_length, truncation_mode=mode)(examples)
        model.zero_grad()
        want = _padded_logps(model, batch)
        want_loss = _loss(want, ref)
        want_loss.backward()
        want_grads = _grads(model)

        model.zero_grad()
        packed = pack_batch(batch["input_ids"], batch["attention_mask"], batch["completion_mask"], share_prompt=share)
        assert packed.tokens == int(batch["attention_mask"].sum()) - (
            _shared_tokens(batch) if share else 0), "no padding, the shared prompt once"
        got, _ = packed_logps(model, packed)
        loss = _loss(got, ref)
        loss.backward()
        grads = _grads(model)

        where = f"{family} max_length={max_length} {mode} share={share}"
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-6, msg=where)
        assert abs(loss.item() - want_loss.item()) <= 1e-5, where
        assert grads.keys() == want_grads.keys() and len(grads) == len(PROBES), where
        for k in grads:
            torch.testing.assert_close(grads[k], want_grads[k], atol=1e-5, rtol=1e-4, msg=f"{where} grad {k}")


def _shared_tokens(batch) -> int:  # noqa: ANN001
    """Tokens the rejected side does not rerun: its common start with chosen, less the copied last token."""
    ids, attn, comp = batch["input_ids"], batch["attention_mask"].bool(), batch["completion_mask"].bool()
    b = ids.shape[0] // 2
    total = 0
    for i in range(b):
        prompt_c = int((attn[i] & ~comp[i]).long().cumprod(0).sum())
        prompt_r = int((attn[b + i] & ~comp[b + i]).long().cumprod(0).sum())
        common = 0
        while common < min(prompt_c, prompt_r) and ids[i, common] == ids[b + i, common]:
            common += 1
        total += max(common - 1, 0)
    return total


def test_pack_batch_layout():
    """TRL's docstring batch: rows, positions, labels and the sequence index, by hand."""
    examples = [{"prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
                {"prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]}]
    batch = DataCollatorForPreference(pad_token_id=0)(examples)
    packed = pack_batch(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    # pair 0: [1 2 3 4 5] + [3 6] (copy of the last prompt token, then rejected); pair 1: [7 8 9] + [8 10 11]
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5, 3, 6, 7, 8, 9, 8, 10, 11]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3, 0, 1, 2, 1, 2, 3]]
    assert packed.labels.tolist() == [[-100, -100, -100, 4, 5, -100, 6, -100, -100, 9, -100, 10, 11]]
    assert packed.sequence.tolist() == [0, 0, 0, 0, 0, 2, 2, 1, 1, 1, 3, 3, 3]
    assert packed.rows == [(0, 2, 5, 7, None), (7, 1, 3, 6, None)]
    assert packed.padded_tokens == 4 * 5
    separate = pack_batch(batch["input_ids"], batch["attention_mask"], batch["completion_mask"], share_prompt=False)
    assert separate.input_ids.tolist() == [[1, 2, 3, 4, 5, 1, 2, 3, 6, 7, 8, 9, 7, 8, 10, 11]]
    assert separate.labels.tolist() == [[-100, -100, -100, 4, 5, -100, -100, -100, 6, -100, -100, 9,
                                         -100, -100, 10, 11]]


@pytest.mark.parametrize("case", sorted(BLOCKED))
def test_unpackable_attention_is_switched_off_with_a_reason(case, caplog):
    model = _model(case, BLOCKED)
    reason = BLOCKED[case][2]
    choice = choose_packing("auto", model, 80)
    assert not choice.enabled and reason in choice.reason
    with pytest.raises(ValueError, match=reason):
        choose_packing("on", model, 80)
    assert not choose_packing("off", _model("llama"), 80).enabled
    with pytest.raises(ValueError, match="packing must be"):
        choose_packing("sometimes", model, 80)


def test_short_sequences_pack_under_a_longer_window():
    """A sliding window at least as long as every sequence never slides: packing stays exact and on."""
    model = _model("mistral short window", BLOCKED)
    assert choose_packing("auto", model, 16).enabled
    assert not choose_packing("auto", model, 17).enabled


# ------------------------------------------------------------------------------ the trainer


def test_trainer_packed_steps_equal_padded(tmp_path, caplog):
    """WinnowDPOTrainer, real TRL steps: packing off, on, and on with gradient checkpointing (the
    backward recomputes attention, so the packed switch must hold over the whole step) give the same
    per-step loss and weights; the choice is logged; nothing is left switched or registered after."""
    from datasets import Dataset
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from trl import DPOConfig

    from curation.lm.loading import load_model, load_tokenizer
    from curation.lm.packed_attention import NAME
    from tests.test_trainer import LogRecorder, pairs_frame, state_diff, tiny_model, with_reference
    from training.trainer import WinnowDPOTrainer

    model_dir = tiny_model(tmp_path / "model")
    tokenizer, reference = load_tokenizer(model_dir), load_model(model_dir, device="cpu")
    policy = copy.deepcopy(reference)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    data = Dataset.from_polars(with_reference(pairs_frame(24, seed=7), reference, tokenizer).drop("pair_id"))

    def run(packing: str, checkpointing: bool) -> tuple[list[float], dict, WinnowDPOTrainer]:
        recorder = LogRecorder()
        args = DPOConfig(output_dir=str(tmp_path / f"{packing}-{checkpointing}"), per_device_train_batch_size=8,
                         max_steps=3, logging_steps=1, learning_rate=1e-3, lr_scheduler_type="constant",
                         warmup_steps=0, max_length=128, beta=0.1, precompute_ref_log_probs=True, seed=0,
                         use_cpu=True, bf16=False, gradient_checkpointing=checkpointing, report_to=[],
                         save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
        trainer = WinnowDPOTrainer(model=copy.deepcopy(policy), args=args, train_dataset=data,
                                   processing_class=tokenizer, callbacks=[recorder], packing=packing,
                                   objective=Objective.from_preset("dpo"))
        trainer.train()
        return [row["loss"] for row in recorder.logs], trainer.model.state_dict(), trainer

    with caplog.at_level(logging.INFO, logger="training.trainer"):
        padded_loss, padded_state, padded = run("off", False)
        packed_loss, packed_state, packed = run("on", False)
        ckpt_loss, ckpt_state, _ = run("auto", True)
    assert not padded.packing.enabled and packed.packing.enabled
    assert any("packed rows" in r.getMessage() for r in caplog.records)
    assert any("packing off" in r.getMessage() for r in caplog.records)
    assert len(padded_loss) == 3
    assert packed_loss == pytest.approx(padded_loss, abs=1e-5, rel=0)
    assert ckpt_loss == pytest.approx(padded_loss, abs=1e-5, rel=0)
    assert state_diff(packed_state, padded_state) < 1e-5
    assert state_diff(ckpt_state, padded_state) < 1e-5
    assert state_diff(padded_state, policy.state_dict()) > 1e-4  # the steps did move the weights
    assert packed.packing_tokens["packed"] < padded.packing_tokens["packed"] <= padded.packing_tokens["padded"]
    assert packed.packing_tokens["padded"] == padded.packing_tokens["padded"]
    assert NAME not in ALL_ATTENTION_FUNCTIONS
    assert all(m.config._attn_implementation == "sdpa" for m in packed.model.modules() if hasattr(m, "config"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("varlen", [False, True])
def test_packed_equals_padded_on_cuda(varlen):
    """On the GPU: per-segment SDPA (fp32, tight) and varlen FlashAttention (bf16, flash-attn installed)."""
    from curation.lm.packed_attention import flash_varlen_available

    if varlen and not flash_varlen_available():
        pytest.skip("flash-attn is not installed")
    dtype = torch.bfloat16 if varlen else torch.float32
    model = _model("llama").to("cuda", dtype)
    examples = _examples(8)
    ref = torch.linspace(-60, -20, 16, device="cuda")
    batch = {k: v.cuda() for k, v in DataCollatorForPreference(pad_token_id=0)(examples).items()}
    want = _padded_logps(model, batch).float()
    packed = pack_batch(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    got, _ = packed_logps(model, packed, varlen=varlen)
    got = got.float()
    tol = dict(atol=0.5, rtol=2e-2) if varlen else dict(atol=1e-4, rtol=1e-6)  # bf16: ~3 significant digits
    torch.testing.assert_close(got, want, **tol)
    model.zero_grad()
    _loss(want, ref).backward()
    want_grads = _grads(model)
    model.zero_grad()
    got2, _ = packed_logps(model, packed, varlen=varlen)
    _loss(got2.float(), ref).backward()
    for k, g in _grads(model).items():
        torch.testing.assert_close(g.float(), want_grads[k].float(), **(dict(atol=5e-2, rtol=5e-2) if varlen
                                                                          else dict(atol=1e-5, rtol=1e-4)))


def test_lora_adapters_pack_like_padded():
    """Through a PEFT LoRA wrapper (the trainer's model with lora=True): same log-probs and adapter grads."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model("llama"), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    assert choose_packing("auto", model, 80).enabled
    batch = DataCollatorForPreference(pad_token_id=0)(_examples())
    ref = torch.linspace(-60, -20, 12)
    results = []
    for packed in (False, True):
        model.zero_grad()
        if packed:
            logps, _ = packed_logps(model, pack_batch(batch["input_ids"], batch["attention_mask"],
                                                      batch["completion_mask"]))
        else:
            logps = _padded_logps(model, batch)
        _loss(logps, ref).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((logps.detach(), grads))
    (want, want_grads), (got, grads) = results
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-6)
    assert grads.keys() == want_grads.keys() and len(grads) == 8  # 2 layers x 2 modules x (A, B)
    for k in grads:
        torch.testing.assert_close(grads[k], want_grads[k], atol=1e-5, rtol=1e-4, msg=k)
