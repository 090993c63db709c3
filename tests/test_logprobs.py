"""Reference log-probs and their tokenisation must be TRL 1.16's, to 1e-4.

Why: curation computes pi_ref once and training reuses it instead of running a reference
model, so a token or a number that differs from what ``DPOTrainer`` would compute itself
silently changes the loss. Everything is built locally (a byte-level BPE trained on the test
texts, a random tiny Llama): no downloads.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from curation.lm.logprobs import COLUMNS, reference_logprobs, score_tokenized  # noqa: E402
from curation.lm.tokenization import TokenizedPairs, tokenize_pairs  # noqa: E402

EOS = "</s>"
PAIRS = [
    # prompt ends mid-word: "wor" + "ld" merges into one token across the boundary
    ("The wor", "ld is big", "ld is round and the world is big"),
    # prompt ends with a space, which BPE glues onto the next word
    ("Answer: ", "yes", "no"),
    ("café naïve", " 日本語 😀", " émoji ü"),
    ("What is two plus two?", " It is four.", " It is five, or maybe four, hard to say."),
    ("Hello", " world" + EOS, " there"),  # chosen already ends with EOS: not doubled
    ("Sort these numbers 3 1 2 into", " 1 2 3", " 3 2 1 1 2 3 3 2 1"),
    ("", " an empty prompt still gets BOS", " short"),
    ("Hello world, hello there. " * 6, " a prompt longer than the small max_length", " dropped"),
    ("The world is round.", "", " empty chosen is just EOS"),
    ("Sort these numbers 9 8 7 6 5 4 3 2 1 into", " 1 2 3 4 5 6 7 8 9 and that is all there is to it", " 9"),
]
SMALL_MAX_LENGTH = 16


def _texts() -> list[str]:
    base = [t for pair in PAIRS for t in pair] + ["The world is big and the world is round.", "Hello world"]
    return base * 10


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=["<pad>", "<s>", EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_texts(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=EOS, pad_token="<pad>")
    assert hf.pad_token_id != hf.eos_token_id
    return hf


def _model(tokenizer, attn: str = "sdpa", kv_heads: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation=attn,
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():  # larger logits than the init, so numbers differ clearly between tokens
        model.lm_head.weight.mul_(8.0)
    return model.eval()


@pytest.fixture(scope="module")
def model(tokenizer) -> LlamaForCausalLM:
    return _model(tokenizer)


def _columns():
    return [list(x) for x in zip(*PAIRS, strict=True)]


@pytest.fixture(scope="module")
def trl_runs(tokenizer, tmp_path_factory):
    """TRL's own prepared dataset + precompute pass, per (max_length, truncation_mode)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from tests.chat_families import datasets_cache

    prompts, chosens, rejecteds = _columns()
    runs = {}
    with datasets_cache(tmp_path_factory.mktemp("hf_datasets")):
        for max_length, mode in [
            (None, "keep_start"),
            (SMALL_MAX_LENGTH, "keep_start"),
            (SMALL_MAX_LENGTH, "keep_end"),
        ]:
            # a fresh model per run: the trainer patches forward and sets the pad id on the one it gets
            trl_model = _model(tokenizer)
            args = DPOConfig(
                output_dir=str(tmp_path_factory.mktemp("dpo")),
                precompute_ref_log_probs=True,
                precompute_ref_batch_size=3,  # uneven batches, so TRL pads
                bf16=False,  # TRL defaults to bf16 autocast, even on CPU
                max_length=max_length,
                truncation_mode=mode,
                report_to="none",
                use_cpu=True,
                dataloader_pin_memory=False,
            )
            ds = Dataset.from_dict({"prompt": prompts, "chosen": chosens, "rejected": rejecteds})
            trainer = DPOTrainer(model=trl_model, args=args, train_dataset=ds, processing_class=tokenizer)
            runs[(max_length, mode)] = (trainer.train_dataset, trainer.data_collator)
    return runs


def _direct(model, tp: TokenizedPairs) -> tuple[np.ndarray, np.ndarray]:
    """Plain reference: each truncated sequence alone, full logits, log_softmax, gather, sum."""
    out = np.full((len(tp), 2), np.nan)
    with torch.no_grad():
        for i in np.flatnonzero(tp.keep):
            for s, side in enumerate(("chosen", "rejected")):
                prompt, comp = tp.sequence(i, side)
                ids = torch.tensor([prompt + comp])
                logits = model(input_ids=ids).logits.float()
                logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[0, :, 0]
                mask = torch.tensor([0] * len(prompt) + [1] * len(comp))[1:].bool()
                out[i, s] = logp[mask].double().sum().item()
    return out[:, 0], out[:, 1]


@pytest.mark.parametrize(
    "setting", [(None, "keep_start"), (SMALL_MAX_LENGTH, "keep_start"), (SMALL_MAX_LENGTH, "keep_end")]
)
def test_tokenize_pairs_equals_trl_prepare_dataset(tokenizer, trl_runs, setting):
    max_length, mode = setting
    trl_ds, collator = trl_runs[setting]
    tp = tokenize_pairs(tokenizer, *_columns(), max_length=max_length, truncation_mode=mode)
    kept = np.flatnonzero(tp.keep)
    assert len(kept) == len(trl_ds)
    if max_length is not None and mode == "keep_start":
        assert not tp.keep.all(), "the long prompt must be dropped, as TRL drops it"
    for row, i in enumerate(kept):
        example = trl_ds[int(row)]
        assert tp.prompt_ids[i] == example["prompt_ids"], i
        assert tp.chosen_ids[i] == example["chosen_ids"], i
        assert tp.rejected_ids[i] == example["rejected_ids"], i
    # completion lengths after the collator's truncation: TRL's completion_mask sums
    batch = collator(
        [
            {k: trl_ds[int(r)][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
            for r in range(len(trl_ds))
        ]
    )
    chosen_mask, rejected_mask = batch["completion_mask"].chunk(2)
    np.testing.assert_array_equal(chosen_mask.sum(1).numpy(), tp.chosen_lengths[kept])
    np.testing.assert_array_equal(rejected_mask.sum(1).numpy(), tp.rejected_lengths[kept])
    full_c = np.array([len(tp.chosen_ids[i]) for i in kept])
    np.testing.assert_array_equal(tp.chosen_truncated[kept], tp.chosen_lengths[kept] < full_c)
    if max_length is not None:
        assert tp.chosen_truncated.any() or tp.rejected_truncated.any()


def test_tokenize_pairs_boundary_merge_and_eos(tokenizer):
    tp = tokenize_pairs(tokenizer, *_columns())
    alone = tokenizer("The wor")["input_ids"]
    assert len(tp.prompt_ids[0]) < len(alone), "the test tokenizer must merge across the boundary"
    eos = tokenizer.eos_token_id
    assert all(c[-1] == eos and r[-1] == eos for c, r in zip(tp.chosen_ids, tp.rejected_ids, strict=True))
    assert tp.chosen_ids[4].count(eos) == 1  # " world</s>" is not given a second EOS
    assert tp.chosen_ids[8] == [eos]


def test_direct_rust_encoding_gives_the_wrapper_ids(tokenizer):
    """tokenize_pairs calls the Rust backend directly (no masks): the ids must be tokenizer(text)'s."""
    from curation.lm.tokenization import _batch_ids, _rust_backend

    texts = [t for pair in PAIRS for t in pair] + [f"a literal {EOS} inside", "<s> twice <s>", ""]
    assert _rust_backend(tokenizer) is not None
    assert _batch_ids(tokenizer, texts) == tokenizer(text=texts)["input_ids"]
    tokenizer.split_special_tokens = True  # the wrapper encodes "</s>" as text then; so must we
    try:
        assert _batch_ids(tokenizer, texts) == tokenizer(text=texts)["input_ids"]
        assert _batch_ids(tokenizer, [EOS])[0] != [tokenizer.bos_token_id, tokenizer.eos_token_id]
    finally:
        tokenizer.split_special_tokens = False
        tokenizer.backend_tokenizer.encode_special_tokens = False
    tokenizer.backend_tokenizer.enable_truncation(max_length=4)  # left behind by some earlier call
    try:
        assert _rust_backend(tokenizer) is None  # falls back to the wrapper, which resets truncation
        assert _batch_ids(tokenizer, texts) == [tokenizer(text=t)["input_ids"] for t in texts]
    finally:
        tokenizer.backend_tokenizer.no_truncation()


def _backend_state(tokenizer) -> tuple:
    backend = tokenizer.backend_tokenizer
    return backend.encode_special_tokens, backend.truncation, backend.padding, tokenizer.split_special_tokens


@pytest.mark.parametrize("left_behind", ["nothing", "special_tokens", "truncation", "padding"])
def test_tokenize_pairs_leaves_the_tokenizer_as_it_was(tokenizer, trl_runs, left_behind):
    """Whatever state the caller's backend is in, tokenize_pairs changes none of it and gives TRL's ids."""
    backend = tokenizer.backend_tokenizer
    if left_behind == "special_tokens":  # differs from what tokenizer(...) would set (split_special_tokens)
        backend.encode_special_tokens = True
    elif left_behind == "truncation":
        backend.enable_truncation(max_length=4)
    elif left_behind == "padding":
        backend.enable_padding(pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token, length=40)
    try:
        before = _backend_state(tokenizer)
        tp = tokenize_pairs(tokenizer, *_columns())
        assert _backend_state(tokenizer) == before
        trl_ds, _ = trl_runs[(None, "keep_start")]
        assert tp.prompt_ids == trl_ds["prompt_ids"]
        assert tp.chosen_ids == trl_ds["chosen_ids"]
        assert tp.rejected_ids == trl_ds["rejected_ids"]
    finally:
        backend.encode_special_tokens = False
        backend.no_truncation()
        backend.no_padding()


def test_tokenize_pairs_rejects_conversational_and_bad_input(tokenizer):
    with pytest.raises(TypeError, match="plain strings"):
        tokenize_pairs(tokenizer, [[{"role": "user", "content": "hi"}]], ["a"], ["b"])
    with pytest.raises(ValueError, match="differ in length"):
        tokenize_pairs(tokenizer, ["a", "b"], ["a"], ["b"])
    with pytest.raises(ValueError, match="truncation_mode"):
        tokenize_pairs(tokenizer, ["a"], ["a"], ["b"], truncation_mode="middle")


@pytest.mark.parametrize(
    "layout,share", [("packed", True), ("packed", False), ("padded", True), ("padded", False)]
)
@pytest.mark.parametrize("max_length", [None, SMALL_MAX_LENGTH])
def test_reference_logprobs_equal_direct_computation(tokenizer, model, layout, share, max_length):
    frame = reference_logprobs(
        model,
        tokenizer,
        *_columns(),
        max_length=max_length,
        progress=False,
        layout=layout,
        share_prompt=share,
        batch_tokens=64,  # several buckets
    )
    assert frame.columns == list(COLUMNS)
    tp = tokenize_pairs(tokenizer, *_columns(), max_length=max_length)
    want_c, want_r = _direct(model, tp)
    kept = tp.keep
    np.testing.assert_allclose(frame["ref_chosen_logps"].to_numpy()[kept], want_c[kept], atol=1e-4, rtol=0)
    np.testing.assert_allclose(frame["ref_rejected_logps"].to_numpy()[kept], want_r[kept], atol=1e-4, rtol=0)
    np.testing.assert_allclose(
        frame["ref_chosen_logps_mean"].to_numpy()[kept], want_c[kept] / tp.chosen_lengths[kept], atol=1e-5
    )
    np.testing.assert_allclose(
        frame["ref_rejected_logps_mean"].to_numpy()[kept], want_r[kept] / tp.rejected_lengths[kept], atol=1e-5
    )
    np.testing.assert_array_equal(frame["chosen_tokens"].to_numpy()[kept], tp.chosen_lengths[kept])
    if not kept.all():  # pairs TRL drops are null, not zero
        assert frame.filter(~frame["ref_chosen_logps"].is_not_null()).height == int((~kept).sum())
        assert frame["chosen_tokens"].null_count() == int((~kept).sum())


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_eager_and_mha_models_match_direct(tokenizer, layout):
    model = _model(tokenizer, attn="eager", kv_heads=4)
    frame = reference_logprobs(model, tokenizer, *_columns(), progress=False, layout=layout, batch_tokens=64)
    want_c, want_r = _direct(model, tokenize_pairs(tokenizer, *_columns()))
    np.testing.assert_allclose(frame["ref_chosen_logps"].to_numpy(), want_c, atol=1e-4, rtol=0)
    np.testing.assert_allclose(frame["ref_rejected_logps"].to_numpy(), want_r, atol=1e-4, rtol=0)
    assert model.config._attn_implementation == "eager"  # the packed path restores the backend


def test_sliding_window_longer_than_sequences_still_shares(tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
    )
    tp = tokenize_pairs(tokenizer, *_columns())
    for window in (4096, 8):  # never slides: shared rows; slides: falls back to separate sequences
        torch.manual_seed(0)
        model = MistralForCausalLM(MistralConfig(sliding_window=window, **common)).eval()
        frame = score_tokenized(model, tp, progress=False)
        want_c, want_r = _direct(model, tp)
        np.testing.assert_allclose(frame["ref_chosen_logps"].to_numpy(), want_c, atol=1e-4, rtol=0)
        np.testing.assert_allclose(frame["ref_rejected_logps"].to_numpy(), want_r, atol=1e-4, rtol=0)
        if window == 8:
            with pytest.raises(ValueError, match="sliding-window"):
                score_tokenized(model, tp, progress=False, share_prompt=True)


@pytest.mark.parametrize(
    "setting", [(None, "keep_start"), (SMALL_MAX_LENGTH, "keep_start"), (SMALL_MAX_LENGTH, "keep_end")]
)
@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_reference_logprobs_equal_trl_precompute(tokenizer, model, trl_runs, setting, layout):
    max_length, mode = setting
    trl_ds, _ = trl_runs[setting]
    tp = tokenize_pairs(tokenizer, *_columns(), max_length=max_length, truncation_mode=mode)
    frame = score_tokenized(model, tp, progress=False, layout=layout)
    kept = np.flatnonzero(tp.keep)
    np.testing.assert_allclose(
        frame["ref_chosen_logps"].to_numpy()[kept], np.asarray(trl_ds["ref_chosen_logps"]), atol=1e-4, rtol=0
    )
    np.testing.assert_allclose(
        frame["ref_rejected_logps"].to_numpy()[kept],
        np.asarray(trl_ds["ref_rejected_logps"]),
        atol=1e-4,
        rtol=0,
    )


def test_order_invariance_and_repeatability(tokenizer, model):
    prompts, chosens, rejecteds = _columns()
    rng = random.Random(1)
    many = [(p + f" case {k}", c * (1 + k % 3), r) for k in range(4) for p, c, r in PAIRS]
    prompts, chosens, rejecteds = (list(x) for x in zip(*many, strict=True))
    first = reference_logprobs(
        model, tokenizer, prompts, chosens, rejecteds, progress=False, batch_tokens=128
    )
    again = reference_logprobs(
        model, tokenizer, prompts, chosens, rejecteds, progress=False, batch_tokens=128
    )
    assert first.equals(again)
    perm = list(range(len(prompts)))
    rng.shuffle(perm)
    shuffled = reference_logprobs(
        model,
        tokenizer,
        [prompts[j] for j in perm],
        [chosens[j] for j in perm],
        [rejecteds[j] for j in perm],
        progress=False,
        batch_tokens=128,
    )
    back = np.empty(len(perm), dtype=np.int64)
    back[perm] = np.arange(len(perm))
    assert shuffled[back.tolist()].equals(first)  # same buckets whatever the order: bit-identical


def test_empty_input(tokenizer, model):
    frame = reference_logprobs(model, tokenizer, [], [], [], progress=False)
    assert frame.height == 0 and frame.columns == list(COLUMNS)


@pytest.mark.parametrize("layout", ["packed", "padded"])
def test_empty_second_side_and_empty_rows(tokenizer, model, layout):
    """Callers score single responses by leaving the rejected side empty; that must cost nothing extra."""
    tp = tokenize_pairs(tokenizer, *_columns())
    single = TokenizedPairs(tp.prompt_ids, tp.chosen_ids, [[] for _ in tp.prompt_ids])
    frame = score_tokenized(model, single, progress=False, layout=layout)
    full = score_tokenized(model, tp, progress=False, layout=layout)
    np.testing.assert_allclose(
        frame["ref_chosen_logps"].to_numpy(), full["ref_chosen_logps"].to_numpy(), atol=1e-5
    )
    assert (frame["ref_rejected_logps"].to_numpy() == 0).all() and (
        frame["rejected_tokens"].to_numpy() == 0
    ).all()
    empty = score_tokenized(model, TokenizedPairs([[]], [[]], [[]]), progress=False, layout=layout)
    assert empty["ref_chosen_logps"].to_list() == [0.0] and empty["chosen_tokens"].to_list() == [0]


def _attention_state(model) -> tuple[dict, dict, list]:
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    configs = [(m.config, m.config._attn_implementation) for m in model.modules() if hasattr(m, "config")]
    return dict(ALL_ATTENTION_FUNCTIONS), dict(AttentionInterface._global_mapping), configs


def test_packed_scoring_leaves_no_global_or_model_state(tokenizer, model):
    """The packed layout's attention is registered, and the model switched to it, only during the call."""
    from curation.lm.packed_attention import NAME

    tp = tokenize_pairs(tokenizer, *_columns())
    registry, global_mapping, configs = _attention_state(model)
    config_dict = model.config.to_dict()
    during = []
    hook = model.model.layers[0].self_attn.register_forward_pre_hook(
        lambda module, args: during.append(module.config._attn_implementation)
    )
    try:
        packed = score_tokenized(model, tp, progress=False, layout="packed", batch_tokens=64)
    finally:
        hook.remove()
    assert during and set(during) == {NAME}, "the packed attention ran"
    after_registry, after_global, after_configs = _attention_state(model)
    assert NAME not in after_registry
    assert after_registry == registry and after_global == global_mapping
    assert after_configs == configs and all(impl == "sdpa" for _, impl in configs)
    assert model.config.to_dict() == config_dict
    padded = score_tokenized(model, tp, progress=False, layout="padded", batch_tokens=64)
    want_c, want_r = _direct(model, tp)
    np.testing.assert_allclose(packed["ref_chosen_logps"].to_numpy(), want_c, atol=1e-4, rtol=0)
    np.testing.assert_allclose(packed["ref_rejected_logps"].to_numpy(), want_r, atol=1e-4, rtol=0)
    np.testing.assert_allclose(packed["ref_chosen_logps"].to_numpy(), padded["ref_chosen_logps"].to_numpy(), atol=1e-5)


def test_concurrent_packed_scorers_share_the_registration(tokenizer):
    """Two threads scoring packed at once: neither removes the attention function under the other."""
    from concurrent.futures import ThreadPoolExecutor

    from curation.lm.packed_attention import NAME

    tp = tokenize_pairs(tokenizer, *_columns())
    models = [_model(tokenizer) for _ in range(4)]  # one model per call: a model runs one call at a time
    registry = _attention_state(models[0])[0]
    with ThreadPoolExecutor(2) as pool:
        frames = list(pool.map(lambda m: score_tokenized(m, tp, progress=False, layout="packed", batch_tokens=32),
                               models))
    assert all(f.equals(frames[0]) for f in frames)
    assert NAME not in _attention_state(models[0])[0] and _attention_state(models[0])[0] == registry
    assert all(m.config._attn_implementation == "sdpa" for m in models)
