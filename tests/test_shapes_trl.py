"""Shards of the new shapes go through TRL's DPOTrainer dataset preparation as they are.

The fast test writes shards from an ingested catalog and tokenizes them with DPOTrainer on a tiny
model whose chat template renders tools, tool calls and tool names (so the test sees that the
shards carry them). The slow one runs `winnow curate` on a folder of every public shape.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from curation.ingest import IngestOptions, ingest
from curation.shard import write_shards
from curation.store import Catalog

FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
ROOT = Path(__file__).resolve().parents[1]

# A chat template that shows what TRL passes it: the tools, each message's name, content and tool calls.
TOOL_TEMPLATE = (
    "{% if tools %}{{ '<|tools|>' ~ (tools | tojson) ~ '\\n' }}{% endif %}"
    "{% for m in messages %}{{ '<|' ~ m['role'] ~ '|>' }}"
    "{% if m.name is defined %}{{ m.name ~ ': ' }}{% endif %}"
    "{% if m.content is defined and m.content %}{{ m.content }}{% endif %}"
    "{% if m.tool_calls is defined %}{% for c in m.tool_calls %}"
    "{{ '<call>' ~ c.function.name ~ c.function.arguments }}{% endfor %}{% endif %}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _tiny_model_and_tokenizer(texts: list[str]):  # noqa: ANN202
    from transformers import LlamaConfig, LlamaForCausalLM

    from training.models import train_tokenizer

    tokenizer = train_tokenizer(texts, vocab_size=400, model_max_length=1024)
    tokenizer.chat_template = TOOL_TEMPLATE
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    return LlamaForCausalLM(config), tokenizer


def _prepare(model, tokenizer, shard: Path, out: Path):  # noqa: ANN001, ANN202 - TRL objects
    """DPOTrainer's own dataset preparation on a shard loaded the way the README says."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    dataset = datasets.load_dataset("parquet", data_files=str(shard), split="train",
                                    cache_dir=str(out / "hf-cache"))
    args = DPOConfig(output_dir=str(out / "trainer"), report_to=[], use_cpu=True, max_length=1024,
                     per_device_train_batch_size=2)
    trainer = DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args, train_dataset=dataset,
                         processing_class=tokenizer)
    return dataset, trainer.train_dataset


def test_shards_of_tool_calls_and_extracted_prompts_pass_dpo_trainer_preparation(tmp_path: Path, one_torch_thread) -> None:  # noqa: ANN001, E501
    data = tmp_path / "data"
    data.mkdir()
    for name in ("tool_calls.jsonl", "ultrafeedback_binarized.jsonl", "helpsteer3_preference.jsonl",
                 "orca_dpo_pairs.jsonl"):
        shutil.copy(FIXTURES / name, data / name)
    catalog = Catalog(tmp_path / "ws")
    result = ingest([str(data)], catalog, IngestOptions(), progress=False)
    ids = catalog.query("SELECT pair_id FROM pairs WHERE run_id = ? ORDER BY source, source_row", [result.run_id])
    order = ids.with_columns(stage=pl.lit(1), stage_position=pl.int_range(pl.len()))
    shards = write_shards(catalog, result.run_id, order, tmp_path / "shards")
    assert shards.conversational and shards.columns == ["prompt", "chosen", "rejected", "tools", "pair_id"]

    texts = catalog.query("SELECT prompt || chosen || rejected AS t FROM pairs")["t"].to_list()
    model, tokenizer = _tiny_model_and_tokenizer(texts)
    dataset, prepared = _prepare(model, tokenizer, shards.shards[0].path, tmp_path)
    assert len(prepared) == len(dataset) == result.pairs
    rows = dataset.to_list()

    weather = next(i for i, r in enumerate(rows) if r["tools"] and "Paris" in r["prompt"][0]["content"])
    prompt = tokenizer.decode(prepared[weather]["prompt_ids"])
    chosen = tokenizer.decode(prepared[weather]["chosen_ids"])
    assert prompt.startswith('<|tools|>[{"type": "function", "function": {"name": "get_weather"')
    assert '<call>get_weather{"city": "Paris"}' in chosen and "<|tool|>get_weather: 18 C, sunny" in chosen
    assert json.loads(rows[weather]["tools"])[0]["function"]["name"] == "get_weather"

    spider = next(i for i, r in enumerate(rows) if "spider" in r["prompt"][0]["content"])
    full = tokenizer.decode(prepared[spider]["prompt_ids"] + prepared[spider]["chosen_ids"])
    assert full.count("How many legs does a spider have?") == 1  # the question once, not twice
    # the struct carries the run's optional fields as nulls; transformers drops None keys before templating
    assert [{k: v for k, v in m.items() if v is not None} for m in rows[spider]["chosen"]] == [
        {"role": "assistant", "content": "A spider has eight legs."}]

    system = next(i for i, r in enumerate(rows) if r["prompt"][0]["role"] == "system")
    assert tokenizer.decode(prepared[system]["prompt_ids"]).startswith("<|system|>You are an AI assistant.")


@pytest.mark.slow
def test_winnow_curate_on_every_public_shape_writes_shards_trl_takes(tmp_path: Path, one_torch_thread) -> None:  # noqa: ANN001, E501
    """`winnow curate` on a folder of every public shape, no flags; each stage's shard prepares in DPOTrainer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = tmp_path / "data"
    shutil.copytree(FIXTURES, data)
    workdir = tmp_path / "ws"
    sets = ["tiny.hidden_size=32", "tiny.intermediate_size=64", "tiny.num_layers=1", "tiny.sft_steps=5",
            "score.max_length=256", "ingest.max_bad_fraction=0.9"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WINNOW_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "curate", str(data), "-w", str(workdir),
                           *(a for s in sets for a in ("--set", s))], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    catalog = Catalog(workdir)
    sources = json.loads(catalog.query("SELECT sources FROM runs").item())
    shapes = {Path(s["source"]).name: s["shape"] for s in sources}
    assert shapes["shp.jsonl"] == "shp" and shapes["ultrafeedback_raw.jsonl"] == "ultrafeedback-raw"
    assert shapes["helpsteer2_preference.jsonl"] == "helpsteer2" and shapes["pku_saferlhf.jsonl"] == "pku-saferlhf"
    model_dir = next((workdir / "models").iterdir())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    shard_files = sorted(workdir.glob("run-*/shards/stage-*.parquet"))
    assert len(shard_files) == 2
    for shard in shard_files:
        dataset, prepared = _prepare(model, tokenizer, shard, tmp_path / shard.stem)
        assert len(prepared) == len(dataset) > 0
        assert {"prompt_ids", "chosen_ids", "rejected_ids", "tools"} <= set(prepared.column_names)
