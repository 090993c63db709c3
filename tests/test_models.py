"""Tests for training/models.py (local tokenizer, tiny default model build + cache) and
curation/lm/loading.py (offline loading, devices)."""

from __future__ import annotations

import json
import os
import random
import re
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curation.lm.loading import ModelNotFoundError, load_model, load_tokenizer, pick_device
from training import models
from training.models import SFT_HISTORY_FILE, build_default_model, resolve_model, train_tokenizer
from training.tiny_config import TinyModelConfig

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for a hub, even from fixtures built at collection

SMALL = TinyModelConfig(
    vocab_size=320,
    hidden_size=32,
    num_layers=1,
    num_heads=2,
    intermediate_size=64,
    max_position_embeddings=64,
    sft_steps=40,
    sft_batch_size=16,
    sft_lr=1e-2,
)


def sorting_pairs(n: int, seed: int) -> tuple[list[str], list[str]]:
    """Throwaway sorting-task pairs (the real generator lives in training/sorting.py)."""
    rng = random.Random(seed)
    prompts, responses = [], []
    for _ in range(n):
        nums = rng.sample(range(50), rng.randint(3, 6))
        filler = " Sure, here is the sorted list:" if rng.random() < 0.2 else ""
        prompts.append(f"Sort ascending: {' '.join(map(str, nums))}\nAnswer:")
        responses.append(f"{filler} {' '.join(map(str, sorted(nums)))}")
    return prompts, responses


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tokenizer():  # noqa: ANN201 - PreTrainedTokenizerFast
    prompts, responses = sorting_pairs(300, seed=0)
    return train_tokenizer(prompts + responses, vocab_size=400, model_max_length=128)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, list[str], list[str]]:
    """One small model built once for the module: (workdir, model dir, prompts, responses)."""
    workdir = tmp_path_factory.mktemp("work")
    prompts, responses = sorting_pairs(300, seed=1)
    path = build_default_model(prompts, responses, workdir, SMALL, progress=False)
    return workdir, path, prompts, responses


# -- tokenizer ---------------------------------------------------------------------------------------

UNICODE_SAMPLES = [
    "Sort ascending: 42 7 19 3\nAnswer: 3 7 19 42",
    "héllo wörld, ça va? — “quotes” ‘single’",
    "日本語のテキストと中文字符",
    "emoji 🙂👍🏽 and a family 👨‍👩‍👧",
    "e\u0301 combining, zero\u200bwidth, rtl \u05e9\u05dc\u05d5\u05dd",
    "  leading and trailing spaces  \t\r\n\x00\x07",
    "",
]


@pytest.mark.parametrize("text", UNICODE_SAMPLES)
def test_tokenizer_round_trips_unicode(tokenizer, text: str) -> None:  # noqa: ANN001
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=60))
def test_tokenizer_round_trips_any_text(tokenizer, text: str) -> None:  # noqa: ANN001
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_tokenizer_special_tokens(tokenizer) -> None:  # noqa: ANN001
    special = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert None not in special and len(special) == 3, "bos, eos and pad must be set and distinct"
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert tokenizer.model_max_length == 128
    # A plain call (add_special_tokens defaults to True) adds nothing: TRL appends eos itself.
    ids = tokenizer("Sort ascending: 5 3 1\nAnswer:")["input_ids"]
    assert not special & set(ids)
    # ...and the eos string TRL appends is recognised as the single eos token.
    ids = tokenizer(" 1 3 5" + tokenizer.eos_token)["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id and ids.count(tokenizer.eos_token_id) == 1


def test_tokenizer_numbers_are_single_tokens(tokenizer) -> None:  # noqa: ANN001
    """The sorting demo is learnable by a tiny model because each ' N' is one token."""
    for n in (0, 7, 19, 42, 49):
        assert len(tokenizer(f" {n}")["input_ids"]) == 1


def test_tokenizer_rejects_too_small_vocab() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["abc"], vocab_size=100)


def test_prompt_is_a_token_prefix_of_prompt_plus_response(tokenizer) -> None:  # noqa: ANN001
    """TRL's DPO tokenizes prompt and prompt+completion separately; no merge may cross the boundary."""
    prompts, responses = sorting_pairs(50, seed=5)
    for p, r in zip(prompts, responses, strict=True):
        p_ids = tokenizer(p)["input_ids"]
        full = tokenizer(p + r + tokenizer.eos_token)["input_ids"]
        assert full[: len(p_ids)] == p_ids


def test_sft_masks_prompt_and_ends_with_eos(tokenizer) -> None:  # noqa: ANN001
    prompts, responses = sorting_pairs(4, seed=6)
    examples = models._encode_pairs(tokenizer, prompts, responses, max_len=128)
    batch = models._collate(examples, tokenizer.pad_token_id)
    for row, (p, r) in enumerate(zip(prompts, responses, strict=True)):
        n_prompt = len(tokenizer(p)["input_ids"])
        labels = batch["labels"][row]
        assert (labels[:n_prompt] == -100).all()
        kept = labels[labels != -100].tolist()
        assert kept[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(kept[:-1]) == r


# -- build_default_model --------------------------------------------------------------------------


def test_build_produces_loadable_model(built) -> None:  # noqa: ANN001
    workdir, path, prompts, _ = built
    assert path.parent == workdir / "models" and path.name.startswith("winnow-tiny-")
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    tok = load_tokenizer(path)
    model = load_model(path, device="cpu", dtype=torch.float32)
    assert model.config.vocab_size == len(tok)
    assert model.config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    enc = tok(prompts[:2], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape[:2] == enc["input_ids"].shape and torch.isfinite(logits).all()
    leftovers = [p.name for p in path.parent.iterdir() if p.name.startswith(".tmp")]
    assert not leftovers, f"temporary build dirs left behind: {leftovers}"


def test_sft_loss_goes_down(built) -> None:  # noqa: ANN001
    _, path, _, _ = built
    history = json.loads((path / SFT_HISTORY_FILE).read_text())
    loss = history["loss"]
    assert len(loss) == SMALL.sft_steps
    first, last = sum(loss[:5]) / 5, sum(loss[-5:]) / 5
    half = len(loss) // 2
    assert last < 0.75 * first, f"SFT loss did not go down enough: {first:.3f} -> {last:.3f}"
    assert sum(loss[half:]) < sum(loss[:half])
    assert history["config"]["sft_steps"] == SMALL.sft_steps


def test_same_data_is_a_cache_hit(built, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    workdir, path, prompts, responses = built
    weights = path / "model.safetensors"
    mtime = weights.stat().st_mtime_ns

    def no_training(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        raise AssertionError("cache hit expected, but the model was trained again")

    monkeypatch.setattr(models, "_sft", no_training)
    started = time.perf_counter()
    again = build_default_model(prompts, responses, workdir, SMALL, progress=False)
    assert again == path
    assert weights.stat().st_mtime_ns == mtime
    assert time.perf_counter() - started < 2.0


def test_different_data_or_config_gets_another_dir(built) -> None:  # noqa: ANN001
    workdir, path, prompts, responses = built
    cfg = SMALL
    assert models._data_hash(cfg, prompts, responses) in path.name
    other_data = models._data_hash(cfg, prompts, [*responses[:-1], responses[-1] + " 1"])
    other_cfg = models._data_hash(TinyModelConfig(**{**cfg.__dict__, "seed": 1}), prompts, responses)
    # Length-prefixed hashing: moving text between prompt and response changes the hash.
    shifted = models._data_hash(cfg, [prompts[0] + " "], [responses[0][1:]])
    assert len({path.name.split("-")[-1], other_data, other_cfg, shifted}) == 4

    new_prompts, new_responses = sorting_pairs(60, seed=2)
    cfg = TinyModelConfig(**{**SMALL.__dict__, "sft_steps": 3})
    other = build_default_model(new_prompts, new_responses, workdir, cfg, progress=True)
    assert other != path and (other / "config.json").is_file()


def test_crash_leaves_no_half_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prompts, responses = sorting_pairs(40, seed=3)
    cfg = TinyModelConfig(**{**SMALL.__dict__, "sft_steps": 2})

    def crash(src, dst):  # noqa: ANN001, ANN202
        raise OSError("disk full")

    with monkeypatch.context() as m:
        m.setattr(models.os, "rename", crash)
        with pytest.raises(OSError, match="disk full"):
            build_default_model(prompts, responses, tmp_path, cfg, progress=False)
    assert list((tmp_path / "models").iterdir()) == [], "a failed build must leave nothing behind"
    path = build_default_model(prompts, responses, tmp_path, cfg, progress=False)
    assert (path / "config.json").is_file()


def test_build_validates_inputs(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="prompts"):
        build_default_model(["a", "b"], ["x"], tmp_path, SMALL, progress=False)
    with pytest.raises(ValueError, match="at least one"):
        build_default_model([], [], tmp_path, SMALL, progress=False)


# -- loading --------------------------------------------------------------------------------------


@pytest.mark.parametrize("loader", [load_model, load_tokenizer])
@pytest.mark.parametrize("name", ["/nonexistent/winnow/model", "./no-such-dir/x/y", "nobody-xyz/no-such-model"])
def test_missing_model_is_a_clear_one_line_error(loader, name: str) -> None:  # noqa: ANN001
    started = time.perf_counter()
    with pytest.raises(ModelNotFoundError) as info:
        loader(name)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert name in message and "\n" not in message and len(message) < 400
    chained = info.value.__cause__ or (None if info.value.__suppress_context__ else info.value.__context__)
    assert chained is None, "no chained network traceback"
    assert time.perf_counter() - started < 15


def test_missing_model_is_a_winnow_error_the_cli_prints_as_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`winnow score --model <missing path>`: exit code 2 and one line on stderr, no traceback."""
    import sys

    from curation.errors import WinnowError
    from curation.ingest import IngestOptions, ingest
    from curation.store import Catalog
    from flows import cli
    from flows.prefect_env import PREFECT_DEFAULTS

    assert issubclass(ModelNotFoundError, WinnowError) and issubclass(ModelNotFoundError, ValueError)
    data = tmp_path / "pairs.jsonl"
    prompts, responses = sorting_pairs(4, seed=3)
    data.write_text("".join(json.dumps({"prompt": p, "chosen": r, "rejected": r + " 9"}) + "\n"
                            for p, r in zip(prompts, responses, strict=True)))
    workdir = tmp_path / "ws"
    run_id = ingest([str(data)], Catalog(workdir), IngestOptions(), progress=False).run_id
    for name, value in PREFECT_DEFAULTS.items():  # main() sets them; keep this process's environment as it was
        monkeypatch.setenv(name, os.environ.get(name, value))
    missing = "/nonexistent/winnow/model"
    monkeypatch.setattr(sys, "argv", ["winnow", "score", run_id, "--workdir", str(workdir), "--model", missing])
    with pytest.raises(SystemExit) as info:
        cli.main()
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and missing in err
    assert "Traceback" not in err


@pytest.mark.parametrize("loader", [load_model, load_tokenizer])
def test_directory_without_a_model_is_a_clear_error(loader, tmp_path: Path) -> None:  # noqa: ANN001
    with pytest.raises(ModelNotFoundError) as info:
        loader(tmp_path)
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_load_tokenizer_sets_missing_pad_to_eos(tokenizer, tmp_path: Path) -> None:  # noqa: ANN001
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|eos|>")
    assert bare.pad_token is None
    bare.save_pretrained(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert loaded.pad_token == "<|eos|>" and loaded.pad_token_id == loaded.eos_token_id


def test_pick_device_without_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device() == (torch.device("cpu"), torch.float32)


def test_pick_device_with_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert pick_device() == (torch.device("cuda"), torch.bfloat16)


def test_resolve_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_build(prompts, responses, workdir, config=None, progress=True):  # noqa: ANN001, ANN202
        calls.append((list(prompts), list(responses), workdir))
        return workdir / "models" / "winnow-tiny-abc"

    monkeypatch.setattr(models, "build_default_model", fake_build)
    assert resolve_model("org/some-model", ["p"], ["r"], tmp_path) == "org/some-model"
    assert resolve_model("/models/local", ["p"], ["r"], tmp_path) == "/models/local"
    assert not calls
    assert resolve_model("winnow-tiny", ["p"], ["r"], tmp_path) == tmp_path / "models" / "winnow-tiny-abc"
    assert calls == [(["p"], ["r"], tmp_path)]


@pytest.mark.slow
def test_default_model_learns_to_sort(tmp_path: Path) -> None:
    """The default config, warmed up on ~3000 correct pairs, sorts held-out lists greedily (about 25 s)."""
    prompts, responses = sorting_pairs(3000, seed=10)
    path = build_default_model(prompts, responses, tmp_path, progress=False)
    tok, model = load_tokenizer(path), load_model(path, device="cpu", dtype=torch.float32)
    tok.padding_side = "left"
    test_prompts, test_responses = sorting_pairs(200, seed=11)
    enc = tok(test_prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False)
    answers = tok.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    exact = sum(
        re.findall(r"\d+", a) == re.findall(r"\d+", r) for a, r in zip(answers, test_responses, strict=True)
    )
    assert exact / len(answers) >= 0.8, answers[:5]
