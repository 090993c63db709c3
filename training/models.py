"""Models without the internet: the tiny locally built reference model "winnow-tiny".

No machine here reaches a model hub, yet the default run must train a real causal LM. So the default
model ("winnow-tiny") is built from scratch: a byte-level BPE tokenizer trained on the demo texts, a
small Llama-style network, and a short supervised warm-up (SFT) on prompt -> response pairs so that
DPO starts from a policy that already does the task roughly. The result is cached on disk under a
hash of (config, texts), so every later run on the same data reuses it. Any local path or hub id can
be used instead (see `resolve_model`); loading any model, devices and CPU threads live in
:mod:`curation.lm.loading`, which curation shares.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from curation.lm.loading import _threads_for_width, pick_device, torch_threads
from training.tiny_config import DEFAULT_MODEL, TinyModelConfig

BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [PAD_TOKEN, BOS_TOKEN, EOS_TOKEN]
SFT_HISTORY_FILE = "sft_history.json"
# A minimal chat template so conversational (TRL message-list) data trains with the default model.
# The prompt rendered with the generation prompt is a prefix of prompt + answer, and every
# assistant turn ends with eos, which is how TRL splits and terminates conversational completions.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' ~ m['role'] ~ '|>' ~ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# Bump when the build recipe changes so that older cached models are not reused by mistake.
_BUILD_VERSION = 2
# 256 byte symbols + the special tokens: the smallest vocabulary a byte-level BPE can have.
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


# --------------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts: Iterable[str], vocab_size: int, model_max_length: int = 256) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on `texts` locally.

    Byte-level means any unicode text round-trips, even characters never seen in training. No
    post-processor is attached, so a plain call adds no special tokens: TRL appends the eos token to
    completions itself (DPOTrainer add_eos) and tokenizes prompt and prompt+completion separately, so
    an automatic bos/eos would be duplicated or break the prompt-prefix match. Special tokens are
    still recognised inside text, so "answer<|eos|>" encodes the eos id.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size must be at least {_MIN_VOCAB} for a byte-level BPE, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        model_max_length=model_max_length,
        padding_side="right",
        chat_template=CHAT_TEMPLATE,
    )


# --------------------------------------------------------------------------------------------------
# Default model: build, warm up, cache


def _data_hash(config: TinyModelConfig, prompts: Sequence[str], responses: Sequence[str]) -> str:
    """Content hash of everything that determines the built model, so equal inputs hit the cache."""
    h = hashlib.sha256()
    header = {"version": _BUILD_VERSION, "config": asdict(config), "n": len(prompts)}
    h.update(json.dumps(header, sort_keys=True).encode())
    for p, r in zip(prompts, responses, strict=True):
        for text in (p, r):
            b = text.encode("utf-8", "surrogatepass")
            h.update(len(b).to_bytes(8, "little"))  # length prefix: ("ab","c") != ("a","bc")
            h.update(b)
    return h.hexdigest()[:16]


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _encode_pairs(
    tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], responses: Sequence[str], max_len: int
) -> list[tuple[list[int], int]]:
    """Token ids of prompt+response+eos and the number of leading prompt tokens (masked from the loss).

    Tokenizes exactly like TRL's DPO preprocessing (prompt alone, prompt+completion, completion starts
    at their common prefix) so that the warm-up sees the same token boundaries DPO will.
    """
    eos = tokenizer.eos_token
    p_ids = tokenizer(list(prompts))["input_ids"]
    f_ids = tokenizer([p + r + eos for p, r in zip(prompts, responses, strict=True)])["input_ids"]
    out = []
    for p, f in zip(p_ids, f_ids, strict=True):
        n_prompt = _common_prefix_len(p, f)
        f = f[:max_len]
        if len(f) > n_prompt:  # something left to learn after truncation
            out.append((f, n_prompt))
    return out


def _batches(
    examples: list[tuple[list[int], int]], batch_size: int, rng: random.Random
) -> list[list[tuple[list[int], int]]]:
    """One epoch of length-bucketed batches in random order: similar lengths pad little."""
    order = sorted(range(len(examples)), key=lambda i: (len(examples[i][0]), rng.random()))
    batches = [[examples[i] for i in order[k : k + batch_size]] for k in range(0, len(order), batch_size)]
    rng.shuffle(batches)
    return batches


def _collate(batch: list[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(batch):
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[row, : len(ids)] = t
        labels[row, n_prompt : len(ids)] = t[n_prompt:]
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up then cosine decay to 10%: converges fast in few steps without early blow-ups."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _sft(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    responses: Sequence[str],
    config: TinyModelConfig,
    device: torch.device,
    dtype: torch.dtype,
    progress: bool,
) -> list[float]:
    """Supervised warm-up on prompt -> response (loss on response tokens and eos only); returns losses."""
    examples = _encode_pairs(tokenizer, prompts, responses, config.max_position_embeddings)
    if not examples:
        raise ValueError("no usable prompt/response pairs for the SFT warm-up")
    rng = random.Random(config.seed)
    model.to(device)
    model.train()
    opt = torch.optim.AdamW(
        model.parameters(), lr=config.sft_lr, betas=(0.9, 0.98), weight_decay=config.sft_weight_decay
    )
    warmup = max(1, int(config.sft_warmup_frac * config.sft_steps))
    autocast = (
        torch.autocast(device_type=device.type, dtype=dtype)
        if device.type == "cuda" and dtype != torch.float32
        else contextlib.nullcontext()
    )
    losses: list[float] = []
    pending: list[list[tuple[list[int], int]]] = []

    from curation.progress import progress_bar

    with progress_bar("winnow-tiny SFT warm-up", total=config.sft_steps, unit="step", enabled=progress) as bar:
        for step in range(config.sft_steps):
            if not pending:
                pending = _batches(examples, config.sft_batch_size, rng)
            batch = {k: v.to(device) for k, v in _collate(pending.pop(), tokenizer.pad_token_id).items()}
            for group in opt.param_groups:
                group["lr"] = config.sft_lr * _lr_factor(step, config.sft_steps, warmup)
            with autocast:
                loss = model(**batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            if step % 10 == 0 or step == config.sft_steps - 1:
                bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.eval()
    return losses


def build_default_model(
    prompts: Sequence[str],
    responses: Sequence[str],
    workdir: Path,
    config: TinyModelConfig | None = None,
    progress: bool = True,
) -> Path:
    """Build (or reuse) the tiny default model for these prompt/response pairs; returns its directory.

    The directory is workdir/models/winnow-tiny-<hash>, where the hash covers config and texts: the
    same data and config return at once without retraining. It is written to a temporary directory
    first and renamed into place, so a crash never leaves a half-written model that looks cached.
    `responses` should be good answers: the warm-up imitates them. The directory also holds
    sft_history.json (per-step losses, timing) for inspection and tests.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = config or TinyModelConfig()
    prompts, responses = list(prompts), list(responses)
    if len(prompts) != len(responses):
        raise ValueError(f"got {len(prompts)} prompts but {len(responses)} responses")
    if not prompts:
        raise ValueError("build_default_model needs at least one prompt/response pair")

    digest = _data_hash(config, prompts, responses)
    models_dir = Path(workdir) / "models"
    final = models_dir / f"{DEFAULT_MODEL}-{digest}"
    if (final / "config.json").is_file():
        return final
    models_dir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    torch.manual_seed(config.seed)
    device, dtype = pick_device()
    with torch_threads(_threads_for_width(config.hidden_size)):
        tokenizer = train_tokenizer(
            [*prompts, *responses], config.vocab_size, model_max_length=config.max_position_embeddings
        )
        model_config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_hidden_layers=config.num_layers,
            num_attention_heads=config.num_heads,
            num_key_value_heads=config.num_heads,
            max_position_embeddings=config.max_position_embeddings,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
        )
        model = LlamaForCausalLM(model_config)
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(model.generation_config, key, getattr(model_config, key))
        losses = _sft(model, tokenizer, prompts, responses, config, device, dtype, progress)
    seconds = time.perf_counter() - start

    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=models_dir))
    try:
        model.to("cpu", torch.float32).save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        history = {
            "name": final.name,
            "hash": digest,
            "config": asdict(config),
            "n_pairs": len(prompts),
            "n_params": sum(p.numel() for p in model.parameters()),
            "vocab_size": len(tokenizer),
            "device": str(device),
            "seconds": round(seconds, 3),
            "loss": losses,
        }
        (tmp / SFT_HISTORY_FILE).write_text(json.dumps(history, indent=1))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "config.json").is_file():  # not a concurrent builder winning the race
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_model(spec: str, prompts: Sequence[str], responses: Sequence[str], workdir: Path) -> Path | str:
    """Turn a model spec into something loadable: "winnow-tiny" builds the default, anything else is kept."""
    if spec == DEFAULT_MODEL:
        return build_default_model(prompts, responses, workdir)
    return spec
