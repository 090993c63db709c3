"""Conversations are tokenised and scored exactly as TRL 1.16's DPOTrainer prepares them.

Why: curation's token lengths, truncation flags and reference log-probs of conversational
pairs are reused by training, so they must be of the tokens TRL builds with the chat template
(generation prompt, prompt/completion split, end-of-turn, system turns, tools). Every check
runs TRL's own ``_prepare_dataset`` and precompute pass on the same rows. The model is a tiny
Qwen2 with a Qwen2.5 chat template (tools, tool calls, tool turns); nothing is downloaded.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ.setdefault("TQDM_DISABLE", "1")

from curation.errors import WinnowError  # noqa: E402
from curation.lm.logprobs import reference_logprobs  # noqa: E402
from curation.lm.tokenization import (  # noqa: E402
    ChatTemplateError,
    extract_prompt_messages,
    prompt_token_ids,
    tokenize_conversations,
    tokenize_preferences,
)
from tests.chat_families import (  # noqa: E402
    FAMILIES,
    TOOLS,
    build_family,
    conversations,
    corpus,
    tool_conversations,
    trl_prepared,
)

QWEN = FAMILIES["qwen2"]
SETTINGS = [(None, "keep_start"), (40, "keep_start"), (40, "keep_end")]


def _rows() -> list[dict]:
    plain = [{**r, "tools": None} for r in conversations(QWEN)]
    return plain + [{**r, "tools": json.dumps(TOOLS)} for r in tool_conversations()]


@pytest.fixture(scope="module")
def qwen():  # noqa: ANN201
    return build_family(QWEN, corpus(QWEN))


@pytest.fixture(scope="module")
def dataset():  # noqa: ANN201
    from datasets import Dataset

    return Dataset.from_list(_rows())


@pytest.fixture(scope="module")
def trl_runs(qwen, dataset, tmp_path_factory):  # noqa: ANN001, ANN201
    model, tokenizer = qwen
    return {s: trl_prepared(model, tokenizer, dataset, tmp_path_factory.mktemp("trl"), *s) for s in SETTINGS}


def _columns(dataset) -> tuple[list, list, list, list]:  # noqa: ANN001
    """The rows as TRL reads them from the dataset (struct fields a message lacks are None)."""
    return dataset["prompt"], dataset["chosen"], dataset["rejected"], dataset["tools"]


@pytest.mark.parametrize("setting", SETTINGS)
def test_token_ids_equal_trl_prepare_dataset(qwen, dataset, trl_runs, setting) -> None:  # noqa: ANN001
    _, tokenizer = qwen
    max_length, mode = setting
    trl_ds, collator = trl_runs[setting]
    tp = tokenize_conversations(tokenizer, *_columns(dataset), max_length=max_length, truncation_mode=mode)
    kept = np.flatnonzero(tp.keep)
    assert len(kept) == len(trl_ds)
    if setting == (40, "keep_start"):
        assert not tp.keep.all(), "the tool prompt alone fills 40 tokens: TRL drops it, and so must we"
    for row, i in enumerate(kept):
        example = trl_ds[int(row)]
        assert tp.prompt_ids[i] == example["prompt_ids"], i
        assert tp.chosen_ids[i] == example["chosen_ids"], i
        assert tp.rejected_ids[i] == example["rejected_ids"], i
    batch = collator([{k: trl_ds[int(r)][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                      for r in range(len(trl_ds))])
    chosen_mask, rejected_mask = batch["completion_mask"].chunk(2)
    np.testing.assert_array_equal(chosen_mask.sum(1).numpy(), tp.chosen_lengths[kept])
    np.testing.assert_array_equal(rejected_mask.sum(1).numpy(), tp.rejected_lengths[kept])
    if max_length is not None:
        assert tp.chosen_truncated.any() or tp.rejected_truncated.any()


def test_the_template_decides_the_turn_end_and_tools_reach_it(qwen, dataset) -> None:  # noqa: ANN001
    _, tokenizer = qwen
    tp = tokenize_conversations(tokenizer, *_columns(dataset))
    eos = tokenizer.eos_token_id  # <|im_end|>, then the template's newline: no eos is appended by us
    assert all(c[-2] == eos and r[-2] == eos for c, r in zip(tp.chosen_ids, tp.rejected_ids, strict=True))
    assert all(tokenizer.decode(c[-1:]) == "\n" for c in tp.chosen_ids)
    prompts = [tokenizer.decode(p) for p in tp.prompt_ids]
    assert prompts[0].endswith("<|im_start|>assistant\n") and "You are Qwen" in prompts[0]
    assert "You are terse and exact." in prompts[5] and "You are Qwen" not in prompts[5]  # the system turn
    assert "# Tools" in prompts[-1] and "get_weather" in prompts[-1]  # tools given to the template
    assert "<tool_call>" in prompts[-2] and "<tool_response>" in prompts[-2]  # tool call and tool turn
    assert "<tool_call>" in tokenizer.decode(tp.chosen_ids[-1])  # a completion that is a tool call


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_reference_logprobs_equal_trl_precompute(qwen, dataset, trl_runs, setting, layout) -> None:  # noqa: ANN001
    model, tokenizer = qwen
    max_length, mode = setting
    trl_ds, _ = trl_runs[setting]
    ours = reference_logprobs(model, tokenizer, *_columns(dataset)[:3], tools=dataset["tools"], max_length=max_length,
                              truncation_mode=mode, layout=layout, progress=False)
    kept = ours.filter(ours["ref_chosen_logps"].is_not_null())
    assert kept.height == len(trl_ds)
    np.testing.assert_allclose(kept["ref_chosen_logps"].to_numpy(), np.array(trl_ds["ref_chosen_logps"]), atol=1e-4)
    np.testing.assert_allclose(kept["ref_rejected_logps"].to_numpy(), np.array(trl_ds["ref_rejected_logps"]),
                               atol=1e-4)


def test_implicit_prompts_split_as_trl_extract_prompt(qwen, tmp_path) -> None:  # noqa: ANN001
    from datasets import Dataset
    from trl.data_utils import extract_prompt

    model, tokenizer = qwen
    rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in conversations(QWEN)]
    user, answer = {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}
    rows.append({"chosen": [user, answer], "rejected": [user, answer, user, answer]})  # one side extends the other
    for row in rows:
        expected = extract_prompt(row)
        assert extract_prompt_messages(row["chosen"], row["rejected"]) == (
            expected["prompt"], expected["chosen"], expected["rejected"])
    dataset = Dataset.from_list(rows)
    trl_ds, _ = trl_prepared(model, tokenizer, dataset, tmp_path)
    tp = tokenize_preferences(tokenizer, None, dataset["chosen"], dataset["rejected"])
    assert tp.prompt_ids == trl_ds["prompt_ids"]
    assert tp.chosen_ids == trl_ds["chosen_ids"]
    assert tp.rejected_ids == trl_ds["rejected_ids"]


def test_prompt_ids_for_sampling_are_trls_prompt_tokens(qwen, dataset) -> None:  # noqa: ANN001
    from trl.data_utils import _tokenize

    _, tokenizer = qwen
    prompts, _, _, tools = _columns(dataset)
    expected = [_tokenize(tokenizer, p, add_generation_prompt=True,
                          tools=json.loads(t) if t else None)["input_ids"] for p, t in zip(prompts, tools, strict=True)]
    assert prompt_token_ids(tokenizer, prompts, tools) == expected
    assert prompt_token_ids(tokenizer, ["plain text"]) == [tokenizer("plain text")["input_ids"]]


def test_bos_comes_from_the_template_once(tmp_path) -> None:  # noqa: ANN001
    """Llama 3's tokenizer adds bos to plain calls and its template writes bos too: TRL has one bos."""
    family = FAMILIES["llama"]
    _, tokenizer = build_family(family, corpus(family))
    bos = tokenizer.bos_token_id
    assert tokenizer("x")["input_ids"][0] == bos  # the post-processor's bos
    rows = conversations(family)
    tp = tokenize_conversations(tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows],
                                [r["rejected"] for r in rows])
    assert all(p[0] == bos and p.count(bos) == 1 for p in tp.prompt_ids)


def test_a_refused_conversation_fails_in_one_line() -> None:
    from curation.score.scoring import ScoreOptions, ScoringModels, batch_tokens

    family = FAMILIES["gemma2"]  # Gemma 2's template raises on a system turn, as TRL would
    _, tokenizer = build_family(family, corpus(family))
    system = {"role": "system", "content": "Be brief."}
    ok = conversations(family)[0]
    prompts = [ok["prompt"], [system, *ok["prompt"]]]
    with pytest.raises(ChatTemplateError, match=r"conversation 1 \(roles: system, user\): System role not supported"):
        tokenize_conversations(tokenizer, prompts, [ok["chosen"]] * 2, [ok["rejected"]] * 2)
    import polars as pl

    frame = pl.DataFrame({"pair_id": ["a" * 64, "b" * 64], "prompt": ["p", "q"], "chosen": ["c", "c"],
                          "rejected": ["r", "r"], "prompt_messages": [json.dumps(p) for p in prompts],
                          "chosen_messages": [json.dumps(ok["chosen"])] * 2,
                          "rejected_messages": [json.dumps(ok["rejected"])] * 2})
    with pytest.raises(WinnowError, match="pair bbbbbbbbbbbb: the chat template refuses conversation 1"):
        batch_tokens(frame, ScoringModels(tokenizer, "gemma2-tiny"), ScoreOptions())


def test_no_chat_template_and_wrong_input_fail_clearly(qwen) -> None:  # noqa: ANN001
    import copy

    _, tokenizer = qwen
    bare = copy.deepcopy(tokenizer)
    bare.chat_template = None
    row = conversations(QWEN)[0]
    with pytest.raises(WinnowError, match="no chat template"):
        tokenize_conversations(bare, [row["prompt"]], [row["chosen"]], [row["rejected"]])
    with pytest.raises(TypeError, match=r"chosens\[0\] is not a list of"):
        tokenize_conversations(tokenizer, [row["prompt"]], ["text"], [row["rejected"]])
    with pytest.raises(ValueError, match="differ in length"):
        tokenize_conversations(tokenizer, [row["prompt"]] * 2, [row["chosen"]], [row["rejected"]])


def test_the_tokenizer_is_left_as_it_was(qwen, dataset) -> None:  # noqa: ANN001
    _, tokenizer = qwen
    backend = tokenizer.backend_tokenizer
    backend.enable_truncation(max_length=4)  # left behind by some earlier call: not ours to keep or change
    try:
        before = (backend.encode_special_tokens, backend.truncation, backend.padding)
        tp = tokenize_conversations(tokenizer, *_columns(dataset))
        assert (backend.encode_special_tokens, backend.truncation, backend.padding) == before
        assert max(map(len, tp.prompt_ids)) > 4
    finally:
        backend.no_truncation()
