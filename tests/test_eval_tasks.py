"""Evaluation tasks: named by configuration, never detected from the data.

The registry (names, one-line error), the sorting task's held-out set (clean, disjoint from
training, deterministic), the pairs task (a sample of the run's own pairs, even when they look
like sorting prompts), and the config that names the task (the demo recipe says sorting, and a
run with no recipe and no sources loads it).
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from curation.errors import WinnowError
from curation.store import Catalog
from training.eval_tasks import get_task, task_names
from training.eval_tasks.sorting import heldout_sorting_set, number_key
from training.sorting import PreferenceSetConfig, generate_preferences, make_prompt, prompt_numbers

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------- the registry and the config


def test_registry_names_and_unknown_task_fails_in_one_line() -> None:
    assert set(task_names()) >= {"sorting", "pairs"}
    assert get_task("sorting").gold_reward is not None and get_task("pairs").gold_reward is None
    with pytest.raises(WinnowError) as err:
        get_task("sorting-by-vibes")
    message = str(err.value)
    assert "\n" not in message and "'sorting-by-vibes'" in message
    assert all(name in message for name in task_names())


def test_config_names_the_task_and_no_recipe_means_the_demo_recipe() -> None:
    from flows.config import DEMO_SOURCE, EvalConfig, PipelineConfig

    assert EvalConfig().task == "pairs"  # user data by default
    demo = PipelineConfig.load(ROOT / "flows" / "recipes" / "demo.yaml")
    assert demo.eval.task == "sorting"
    # no recipe, no sources: the demo recipe, so the demo data is evaluated on the sorting task
    default = PipelineConfig.load(None)
    assert default.sources == [DEMO_SOURCE] and default.eval.task == "sorting"
    assert default.dump() == demo.dump()
    assert PipelineConfig.load(None, {"eval.prompts": 7}).eval.task == "sorting"
    # sources of one's own: no demo recipe, the pairs task unless a recipe or a flag names another
    own = PipelineConfig.load(None, {"sources": ["my.jsonl"]})
    assert own.eval.task == "pairs"
    assert PipelineConfig.load(None, {"sources": ["my.jsonl"], "eval.task": "sorting"}).eval.task == "sorting"


# --------------------------------------------------------------------------- the sorting task's held-out set

def test_heldout_sorting_set_is_clean_disjoint_and_deterministic() -> None:
    train = PreferenceSetConfig(size=400, seed=7)
    held = heldout_sorting_set(40, 50, seed=0, train_config=train)
    again = heldout_sorting_set(40, 50, seed=0, train_config=train)
    assert held.prompts == again.prompts and held.pairs.equals(again.pairs)
    assert len(held.prompts) == 40 and len(set(held.prompts)) == 40
    assert held.pairs.height == 50
    # clean pairs with their truth columns
    assert not held.pairs["is_flipped"].any()
    assert (held.pairs["gold_chosen"] > held.pairs["gold_rejected"]).all()
    assert {"is_low_edit", "is_verbose_chosen"} <= set(held.pairs.columns)
    # disjoint from the training prompts, by their numbers (reordering gives the same answer)
    train_keys = {number_key(p) for p in generate_preferences(train)["prompt"].to_list()}
    assert not train_keys & {number_key(p) for p in held.prompts}
    assert not train_keys & {number_key(p) for p in held.pairs["prompt"].to_list()}
    # the explicit check does work: excluding prompts replaces them (even in another order)
    excluded = [make_prompt(sorted(prompt_numbers(p), reverse=True)) for p in held.prompts[:10]]
    swapped = heldout_sorting_set(40, 50, seed=0, train_config=train, exclude_prompts=excluded)
    assert len(swapped.prompts) == 40
    assert not {number_key(p) for p in excluded} & {number_key(p) for p in swapped.prompts}
    assert swapped.prompts[:30] == held.prompts[10:40]  # the rest of the stream moves up
    # a smaller set is a prefix of a larger one; another seed gives another set
    assert heldout_sorting_set(10, 0, seed=0, train_config=train).prompts == held.prompts[:10]
    other = heldout_sorting_set(40, 50, seed=1, train_config=train)
    assert other.prompts != held.prompts and not other.pairs.equals(held.pairs)
    assert isinstance(held.pairs, pl.DataFrame) and heldout_sorting_set(5, 0).pairs.height == 0


# --------------------------------------------------------------------------- tasks on a run's catalog


@pytest.fixture(scope="module")
def sorting_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Catalog, str, list[str]]:
    """A run whose every prompt starts with "Sort ascending:" (the demo's prefix), ingested as user data;
    ten prompts carry a second pair, so there are fewer prompts than pairs."""
    from curation.ingest import ingest

    workdir = tmp_path_factory.mktemp("run")
    frame = generate_preferences(PreferenceSetConfig(size=60, seed=5)).select("prompt", "chosen", "rejected")
    second = frame.slice(10, 10).with_columns(prompt=frame["prompt"].head(10))
    frame = pl.concat([frame, second])
    source = workdir / "pairs.jsonl"
    frame.write_ndjson(source)
    catalog = Catalog(workdir)
    run_id = ingest([str(source)], catalog, run_id="looks-like-sorting", progress=False).run_id
    return catalog, run_id, frame["prompt"].to_list()


def test_pairs_task_samples_the_run_even_when_its_prompts_look_like_sorting(sorting_run) -> None:  # noqa: ANN001
    catalog, run_id, prompts = sorting_run
    assert all(p.startswith("Sort ascending:") for p in prompts)
    data = get_task("pairs").data(catalog, run_id, prompts=10, pairs=12, seed=3)
    assert data.heldout is False
    assert len(data.prompts) == 10 and set(data.prompts) <= set(prompts)  # the run's own prompts
    assert data.pairs.height == 12 and set(data.pairs["prompt"]) <= set(prompts)
    again = get_task("pairs").data(catalog, run_id, prompts=10, pairs=12, seed=3)
    assert again.prompts == data.prompts and again.pairs.equals(data.pairs)
    # more prompts asked for than the run has distinct prompts: each of them once, no error
    from curation.reads import run_pair_texts

    run_prompts = run_pair_texts(catalog, run_id, ("prompt",))["prompt"]
    assert run_prompts.n_unique() < run_prompts.len()
    every = get_task("pairs").data(catalog, run_id, prompts=10_000, pairs=5, seed=0).prompts
    assert sorted(every) == sorted(run_prompts.unique().to_list())


def test_sorting_task_holds_out_the_run_prompts(sorting_run) -> None:  # noqa: ANN001
    catalog, run_id, prompts = sorting_run
    data = get_task("sorting").data(catalog, run_id, prompts=20, pairs=15, seed=0)
    assert data.heldout is True and len(data.prompts) == 20 and data.pairs.height == 15
    trained = {number_key(p) for p in prompts}
    assert not trained & {number_key(p) for p in data.prompts}
    assert not trained & {number_key(p) for p in data.pairs["prompt"].to_list()}


def _save_tiny_model(path: Path, texts: list[str]) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.models import train_tokenizer

    tokenizer = train_tokenizer(texts, vocab_size=300)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_evaluate_run_uses_the_named_task_never_the_text(sorting_run, tmp_path: Path) -> None:  # noqa: ANN001
    from training.run_evaluation import POLICY_LABEL, evaluate_run

    catalog, run_id, prompts = sorting_run
    frame = generate_preferences(PreferenceSetConfig(size=60, seed=5))
    model = str(_save_tiny_model(tmp_path / "model", frame["prompt"].to_list() + frame["chosen"].to_list()))
    kwargs = {"prompts": 4, "pairs": 6, "max_new_tokens": 4, "max_length": 64, "progress": False}

    def evals() -> pl.DataFrame:
        return catalog.query("SELECT metric, details FROM evals WHERE run_id = ? AND model = ?",
                             [run_id, POLICY_LABEL], read_only=False)

    metrics = evaluate_run(catalog, run_id, model, model, task="pairs", **kwargs)
    assert not {"gold_reward", "gold_reward_ref", "win_rate"} & set(metrics)  # no gold reward guessed
    assert {"len_tokens", "kl", "implicit_acc"} <= set(metrics)
    details = [json.loads(d) for d in evals()["details"]]
    assert {(d["task"], d["heldout"]) for d in details} == {("pairs", False)}

    metrics = evaluate_run(catalog, run_id, model, model, task="sorting", **kwargs)
    assert {"gold_reward", "win_rate"} <= set(metrics)
    details = [json.loads(d) for d in evals()["details"]]
    assert {(d["task"], d["heldout"]) for d in details} == {("sorting", True)}

    with pytest.raises(WinnowError, match="unknown evaluation task 'auto'"):  # before any model is loaded
        evaluate_run(catalog, run_id, "/nonexistent", "/nonexistent", task="auto", **kwargs)
