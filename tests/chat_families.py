"""Tiny models of real families, each with a locally trained tokenizer and its family's chat template.

Why: conversational pairs are tokenised by the model's own chat template, and every family
writes it differently (bos inside the template or from the tokenizer, an end-of-turn token that
is not eos, a trailing newline after the turn, eos appended only without a generation prompt,
system turns refused or folded into the first user turn, tool calls). The templates below are
written after the families' published ``tokenizer_config.json`` templates (Llama 3 Instruct,
Qwen2.5 Instruct, Gemma 2 / Gemma 3 IT, Mistral 7B Instruct, Phi-3 mini Instruct, and the
OpenAssistant Pythia SFT format for GPT-NeoX); the tokenizers are trained here with HF
``tokenizers`` in the family's style (byte-level BPE or a SentencePiece-like Metaspace BPE,
bos added by the post-processor where the family's tokenizer adds it). Nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

GEMMA3_TEMPLATE = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

MISTRAL_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

PHI3_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}"
    "{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}"
    "{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}"
)

# OpenAssistant's Pythia SFT models (GPT-NeoX): every turn ends with <|endoftext|>
NEOX_OASST_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'user' %}{{ '<|prompter|>' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    """One model family: its config class, tokenizer style and chat template."""

    name: str
    template: str
    style: str  # "bytelevel" (GPT-2 style BPE) or "metaspace" (SentencePiece style BPE)
    special: dict[str, str]  # bos/eos/pad token strings (bos may be absent)
    extra_special: tuple[str, ...]
    config: Callable[[int, dict[str, int | None]], Any]
    bos_in_post_processor: bool = False
    added_tokens: tuple[str, ...] = ()  # non-special added tokens (Qwen's <tool_call>)
    system: bool = True  # the template accepts a system turn
    tools: bool = False  # the template renders tools and tool calls
    notes: dict[str, str] = field(default_factory=dict)


TINY = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 512}


def _ids(special_ids: dict[str, int | None]) -> dict[str, int | None]:
    return {"bos_token_id": special_ids.get("bos"), "eos_token_id": special_ids["eos"],
            "pad_token_id": special_ids["pad"]}


def _llama(vocab: int, special: dict[str, int | None]) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **TINY, **_ids(special)))


def _qwen2(vocab: int, special: dict[str, int | None]) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab, **TINY, **_ids(special), tie_word_embeddings=True))


def _gemma2(vocab: int, special: dict[str, int | None]) -> Any:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    # the real attention and final-logit soft-capping (50, 30) and a sliding window on every other layer
    return Gemma2ForCausalLM(Gemma2Config(vocab_size=vocab, **TINY, head_dim=8, sliding_window=4096,
                                          attn_implementation="eager", **_ids(special)))


def _gemma3(vocab: int, special: dict[str, int | None]) -> Any:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=vocab, **TINY, head_dim=8, sliding_window=512,
                                              **_ids(special)))


def _mistral(vocab: int, special: dict[str, int | None]) -> Any:
    from transformers import MistralConfig, MistralForCausalLM

    # Mistral 7B v0.1's sliding window, cut to fewer tokens than the test conversations have,
    # so the shared-prompt path must switch itself off (and say why)
    return MistralForCausalLM(MistralConfig(vocab_size=vocab, **TINY, sliding_window=24, **_ids(special)))


def _phi3(vocab: int, special: dict[str, int | None]) -> Any:
    from transformers import Phi3Config, Phi3ForCausalLM

    return Phi3ForCausalLM(Phi3Config(vocab_size=vocab, **TINY, sliding_window=2047, **_ids(special)))


def _neox(vocab: int, special: dict[str, int | None]) -> Any:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25,
                                            max_position_embeddings=512, use_parallel_residual=True,
                                            **_ids(special)))


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", LLAMA3_TEMPLATE, "bytelevel",
                    {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>", "pad": "<|finetune_right_pad_id|>"},
                    ("<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"), _llama,
                    bos_in_post_processor=True),
    "qwen2": Family("qwen2", QWEN25_TEMPLATE, "bytelevel",
                    {"eos": "<|im_end|>", "pad": "<|endoftext|>"}, ("<|im_start|>",), _qwen2,
                    added_tokens=("<tool_call>", "</tool_call>"), tools=True),
    "gemma2": Family("gemma2", GEMMA2_TEMPLATE, "metaspace", {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"},
                     ("<start_of_turn>", "<end_of_turn>"), _gemma2, bos_in_post_processor=True, system=False),
    "gemma3": Family("gemma3", GEMMA3_TEMPLATE, "metaspace", {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"},
                     ("<start_of_turn>", "<end_of_turn>"), _gemma3, bos_in_post_processor=True),
    "mistral": Family("mistral", MISTRAL_TEMPLATE, "metaspace", {"bos": "<s>", "eos": "</s>", "pad": "<unk>"},
                      (), _mistral, bos_in_post_processor=True),
    "phi3": Family("phi3", PHI3_TEMPLATE, "metaspace", {"bos": "<s>", "eos": "<|endoftext|>", "pad": "<unk>"},
                   ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"), _phi3),
    "gpt_neox": Family("gpt_neox", NEOX_OASST_TEMPLATE, "bytelevel",
                       {"bos": "<|endoftext|>", "eos": "<|endoftext|>", "pad": "<|padding|>"},
                       ("<|prompter|>", "<|assistant|>", "<|system|>"), _neox),
}


def train_family_tokenizer(family: Family, texts: list[str], vocab_size: int = 400):  # noqa: ANN201
    """A tokenizer of the family's style trained on ``texts``, with its special tokens and chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys([family.special["pad"], *(family.special.get(k) for k in ("bos", "eos")),
                                   *family.extra_special]))
    specials = [s for s in specials if s]
    if family.style == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:  # SentencePiece style: spaces become "▁", a "▁" is put before the first word
        tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=False))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        specials = ["<unk>", *[s for s in specials if s != "<unk>"]]
        alphabet = sorted(set("".join(texts)) | {"▁"})
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, initial_alphabet=alphabet,
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if family.added_tokens:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in family.added_tokens])
    bos = family.special.get("bos")
    if family.bos_in_post_processor and bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    kwargs = {f"{k}_token": v for k, v in family.special.items()}
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=family.template, model_max_length=512, **kwargs)
    if "bos" not in family.special:
        hf.bos_token = None
    return hf


def build_family(family: Family, texts: list[str], seed: int = 0, folder: Path | None = None):  # noqa: ANN201
    """(model, tokenizer): a randomly initialised tiny model of the family and its trained tokenizer.

    With ``folder`` both are saved there and loaded back the way a run loads a model path
    (transformers may load a family's own tokenizer class: Qwen2's splits digits), so the pair
    returned is exactly what curation and training read from that folder.
    """
    tokenizer = train_family_tokenizer(family, texts)
    special = {k: tokenizer.convert_tokens_to_ids(v) for k, v in family.special.items()}
    torch.manual_seed(seed)
    model = family.config(len(tokenizer), special)
    with torch.no_grad():  # larger logits than the init, so tokens differ clearly in log-prob
        model.get_output_embeddings().weight.mul_(4.0)
    if folder is None:
        return model.eval(), tokenizer
    from curation.lm.loading import load_model, load_tokenizer

    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return load_model(folder, device="cpu").eval(), load_tokenizer(folder)


SYSTEM = {"role": "system", "content": "You are terse and exact."}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}]


def conversations(family: Family) -> list[dict[str, Any]]:
    """Preference rows (prompt, chosen, rejected[, tools]) in TRL's explicit conversational layout."""

    def user(text: str) -> dict[str, str]:
        return {"role": "user", "content": text}

    def assistant(text: str) -> dict[str, str]:
        return {"role": "assistant", "content": text}

    rows = [
        {"prompt": [user("What colour is the sky?")], "chosen": [assistant("Blue, on a clear day.")],
         "rejected": [assistant("Green.")]},
        {"prompt": [user("Sort 3 1 2"), assistant("1 2 3"), user("And descending?")],
         "chosen": [assistant("3 2 1")], "rejected": [assistant("1 2 3, again, as before")]},
        {"prompt": [user("Name a prime number bigger than ten, please.")], "chosen": [assistant("Eleven.")],
         "rejected": [assistant("Twelve is prime, I think, though I am not sure of it at all.")]},
        {"prompt": [user("  Spaces around  ")], "chosen": [assistant(" trimmed? ")], "rejected": [assistant("no")]},
        {"prompt": [user("Say hi in French.")], "chosen": [assistant("Bonjour !")],
         "rejected": [assistant("Hola, amigo. Hola.")]},
    ]
    if family.system:
        rows.append({"prompt": [SYSTEM, user("Two plus two?")], "chosen": [assistant("Four.")],
                     "rejected": [assistant("Five, or maybe four.")]})
    return rows


def tool_conversations() -> list[dict[str, Any]]:
    """Rows with tools, an assistant tool call and a tool turn (Qwen2.5's template renders them)."""
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    prompt = [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": "", "tool_calls": [call]},
              {"role": "tool", "content": "18 C, sunny"}]
    return [
        {"prompt": prompt, "chosen": [{"role": "assistant", "content": "Sunny, 18 C."}],
         "rejected": [{"role": "assistant", "content": "It is snowing."}]},
        {"prompt": [{"role": "user", "content": "Weather in Rome?"}],
         "chosen": [{"role": "assistant", "content": "", "tool_calls": [
             {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]}],
         "rejected": [{"role": "assistant", "content": "I cannot know."}]},
    ]


def corpus(family: Family) -> list[str]:
    """Texts to train the family's tokenizer on: the conversations rendered with a stand-in template."""
    texts = []
    for row in conversations(family) + tool_conversations():
        for key in ("prompt", "chosen", "rejected"):
            texts += [str(m.get("content", "")) for m in row[key]]
    texts += ["assistant user system model tool get_weather Paris Rome city sunny", family.template]
    return texts * 4


@contextmanager
def datasets_cache(folder: Path) -> Iterator[None]:
    """HF datasets writes its map/precompute caches under ``folder`` inside the block (not ~/.cache)."""
    import datasets

    old = os.environ.get("HF_DATASETS_CACHE"), datasets.config.HF_DATASETS_CACHE
    os.environ["HF_DATASETS_CACHE"] = str(folder)
    datasets.config.HF_DATASETS_CACHE = folder
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if old[0] is None:
            os.environ.pop("HF_DATASETS_CACHE", None)
        else:
            os.environ["HF_DATASETS_CACHE"] = old[0]
        datasets.config.HF_DATASETS_CACHE = old[1]


def trl_prepared(model, tokenizer, dataset, folder: Path, max_length: int | None = None,  # noqa: ANN001
                 truncation_mode: str = "keep_start"):  # noqa: ANN201 - (datasets.Dataset, collator)
    """TRL's own preparation of ``dataset``: ``_prepare_dataset`` and the precompute pass, run by DPOTrainer.

    ``model`` is deep-copied: the trainer patches the model it gets.
    """
    import copy

    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(folder / "dpo"), precompute_ref_log_probs=True, precompute_ref_batch_size=3,
                     bf16=False, max_length=max_length, truncation_mode=truncation_mode, report_to="none",
                     use_cpu=True, dataloader_pin_memory=False)
    with datasets_cache(folder / "hf"):
        trainer = DPOTrainer(model=copy.deepcopy(model), args=args, train_dataset=dataset, processing_class=tokenizer)
    return trainer.train_dataset, trainer.data_collator


_TOPICS = ["the sky", "rivers", "prime numbers", "bread", "the moon", "tides", "volcanoes", "owls", "glass", "salt",
           "chess", "bees", "rain", "maps", "copper", "tea", "snow", "deserts", "coral", "clocks"]


def ultrafeedback_rows(n: int = 60, seed: int = 0) -> list[dict[str, Any]]:
    """Rows in the exact shape of trl-lib/ultrafeedback_binarized: ``chosen`` and ``rejected`` message lists
    ({content, role}, the user turn first, then the assistant's answer) and float ``score_chosen`` /
    ``score_rejected``; no prompt column (TRL's implicit conversational layout). Every fifth row is
    a two-turn conversation, and a few prompts come twice with other answers (one prompt, several pairs).
    """
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = _TOPICS[i % len(_TOPICS)]
        question = f"Tell me one true fact about {topic}." if i < 2 * len(_TOPICS) else f"What is {topic} made of?"
        turns = [{"content": question, "role": "user"}]
        if i % 5 == 4:
            turns += [{"content": f"{topic.capitalize()} is a broad subject.", "role": "assistant"},
                      {"content": "Be more specific, please.", "role": "user"}]
        good = f"Here is a fact about {topic}: it has been studied for centuries{'!' if rng.random() < .5 else '.'}"
        bad = rng.choice([f"I do not know anything about {topic}.", f"{topic} is purple and made of cheese.",
                          "No."])
        score_chosen = float(rng.choice([7.0, 7.5, 8.0, 8.5, 9.0]))
        rows.append({"chosen": turns + [{"content": good, "role": "assistant"}],
                     "rejected": turns + [{"content": bad, "role": "assistant"}],
                     "score_chosen": score_chosen, "score_rejected": score_chosen - rng.choice([1.0, 2.5, 4.0, 6.0])})
    return rows
