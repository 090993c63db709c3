"""B2: reference log-prob scoring, Winnow's scorer vs TRL's own precompute pass.

Why: the reference log-probs are computed once in curation and reused by training, so they
must be TRL's numbers (checked here, max abs/rel difference) and should come faster than
``DPOTrainer(precompute_ref_log_probs=True)`` gives them (target: 1.5x pairs/s).

What is timed, on the same model object and the same pairs, alternating in one process:
* TRL: ``trainer._precompute_ref_logps(prepared_dataset, ...)``, the whole precompute pass
  (DataLoader + collator + fused-LM-head forward + writing its cache file), on the dataset
  ``_prepare_dataset`` already tokenised; its cache file is deleted before each run so it
  recomputes. Batch size: ``--trl-batch-size`` (TRL's default is per_device_train_batch_size=8).
* Winnow: ``score_tokenized(model, tokenized)`` on pairs already tokenised by
  ``tokenize_pairs``. Tokenisation is timed separately on both sides (second table).

Data: ``--data uniform`` (lengths uniform in [min, max] words) or ``--data hh`` (an HH-like
spread, :func:`benchmarks.common.hh_like_pairs`); ``--conversational`` turns the same pairs into
TRL's conversational layout (message lists, the tokenizer's chat template on both sides:
TRL's ``_prepare_dataset`` and Winnow's ``tokenize_conversations``). Target: at least 3x TRL's
pairs/s (the packed layout as the headline), numbers equal to 1e-4.

Run: ``.venv/bin/python benchmarks/bench_b2_logprobs.py`` (CPU defaults). On a GPU with a
~0.5B config in bf16: ``--hidden 896 --layers 24 --heads 14 --kv-heads 2 --intermediate 4864
--vocab 32000 --pairs 2048 --dtype bf16``.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
_TMP = tempfile.mkdtemp(prefix="winnow_b2_")
os.environ.setdefault("HF_DATASETS_CACHE", _TMP)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from datasets.fingerprint import Hasher  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from benchmarks.common import as_conversations, describe_machine  # noqa: E402
from curation.lm.logprobs import score_tokenized  # noqa: E402
from curation.lm.tokenization import tokenize_pairs  # noqa: E402

datasets.disable_progress_bars()
transformers.logging.set_verbosity_error()

# Peak dense bf16 TFLOP/s by card name (for MFU); override with --peak-tflops
_PEAK_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


def build_tokenizer(vocab: int, words: list[str], seed: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained locally on the benchmark's own words (no download)."""
    rng = random.Random(seed)
    corpus = [" ".join(rng.choices(words, k=64)) for _ in range(2000)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    # sorted: set order depends on the per-process string hash seed
    return sorted({"".join(rng.choices(letters, k=rng.randint(2, 7))) for _ in range(n)})


def make_pairs(
    n: int, lo: int, hi: int, words: list[str], seed: int
) -> tuple[list[str], list[str], list[str]]:
    """Prompts and responses of uniformly varied word counts in [lo, hi] (so padding matters)."""
    rng = random.Random(seed)

    def text(k: int) -> str:
        return " ".join(rng.choices(words, k=k))

    prompts = [text(rng.randint(lo, hi)) for _ in range(n)]
    chosens = [" " + text(rng.randint(lo, hi)) for _ in range(n)]
    rejecteds = [" " + text(rng.randint(lo, hi)) for _ in range(n)]
    return prompts, chosens, rejecteds


def machine() -> str:
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return describe_machine(("torch", "transformers", "trl", "datasets"), gpu, torch.get_num_threads())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def row_flops(cfg: LlamaConfig, prompt: int, comp: list[int]) -> float:
    """Forward FLOPs needed for one prompt and the completions run after it (no padding).

    Dense layers 2*params per token, causal attention 2*2*d*ctx per token (QK and AV), LM head
    2*d*V per scored token.
    """
    d, L, kv = (
        cfg.hidden_size,
        cfg.num_hidden_layers,
        cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads),
    )
    layer_params = d * d * 2 + 2 * d * kv + 3 * d * cfg.intermediate_size
    tokens = prompt + sum(comp)
    attn_ctx = prompt * (prompt + 1) / 2 + sum(c * prompt + c * (c + 1) / 2 for c in comp)
    return L * (2 * layer_params * tokens + 4 * d * attn_ctx) + 2 * d * cfg.vocab_size * sum(comp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=128)
    ap.add_argument("--data", choices=["uniform", "hh"], default="uniform", help="length spread of the pairs")
    ap.add_argument("--scale", type=float, default=1.0, help="--data hh: stretch the lengths")
    ap.add_argument("--conversational", action="store_true",
                    help="message lists through the chat template (TRL's conversational layout)")
    ap.add_argument("--min-words", type=int, default=20, help="shortest prompt/response, in words (~tokens)")
    ap.add_argument("--max-words", type=int, default=300)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=688)
    ap.add_argument("--vocab", type=int, default=2000)
    ap.add_argument(
        "--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: TRL autocast + ours autocast"
    )
    ap.add_argument("--max-length", type=int, default=None, help="DPO max_length (keep_start); default none")
    ap.add_argument("--trl-batch-size", type=int, default=8)
    ap.add_argument("--batch-tokens", type=int, default=None, help="our token budget per forward")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--variants",
        default="padded,packed,padded-noshare",
        help="our configurations to time, comma-separated among packed, padded, packed-noshare, padded-noshare",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument(
        "--no-truth",
        action="store_true",
        help="skip the float64 re-run that shows whose float32 error is whose",
    )
    ap.add_argument("--peak-tflops", type=float, default=None, help="card's dense bf16 peak, for MFU")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    # A third of the vocabulary as distinct words: BPE learns each as one token, so word
    # counts are token counts
    if args.data == "hh" or args.conversational:
        from benchmarks.common import hh_like_pairs
        from training.models import train_tokenizer

        if args.data == "hh":
            data = hh_like_pairs(args.pairs, args.seed + 1, vocabulary=max(args.vocab // 3, 100), scale=args.scale)
            prompts, chosens, rejecteds = data["prompt"], data["chosen"], data["rejected"]
        else:
            words = make_words(max(args.vocab // 3, 100), args.seed)
            prompts, chosens, rejecteds = make_pairs(args.pairs, args.min_words, args.max_words, words, args.seed + 1)
        # a byte-level BPE with a chat template (winnow-tiny's), trained on the pairs themselves
        tokenizer = train_tokenizer([*prompts, *chosens, *rejecteds][:6000], args.vocab, model_max_length=1 << 20)
    else:
        words = make_words(max(args.vocab // 3, 100), args.seed)
        tokenizer = build_tokenizer(args.vocab, words, args.seed)
        prompts, chosens, rejecteds = make_pairs(args.pairs, args.min_words, args.max_words, words, args.seed + 1)
    tokenize = tokenize_pairs
    if args.conversational:
        try:
            from curation.lm.tokenization import tokenize_conversations
        except ImportError:
            print("B2 conversational: not run: curation.lm.tokenization.tokenize_conversations (the chat-template "
                  "tokenisation) is not on this branch yet")
            return
        prompts, chosens, rejecteds = as_conversations(prompts, chosens, rejecteds)

        def tokenize(tok, p, c, r, max_length=None):  # noqa: ANN001, ANN202 - tokenize_pairs' signature
            return tokenize_conversations(tok, p, c, r, max_length=max_length)

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg).to(device)
    model.eval()
    n_params = sum(p.numel() for p in model.parameters())

    raw = Dataset.from_dict({"prompt": prompts, "chosen": chosens, "rejected": rejecteds})
    bf16 = args.dtype == "bf16"
    dpo_args = DPOConfig(
        output_dir=os.path.join(_TMP, "out"),
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=args.trl_batch_size,
        bf16=bf16,  # TRL defaults bf16=True even on CPU; fp32 unless asked
        max_length=args.max_length,
        report_to="none",
        use_cpu=device.type == "cpu",
        dataloader_pin_memory=False,
    )
    # Construction runs TRL's tokenisation and one precompute pass (its warm-up)
    trainer = DPOTrainer(model=model, args=dpo_args, train_dataset=raw, processing_class=tokenizer)
    trl_first = trainer.train_dataset
    prepared = trl_first.remove_columns(["ref_chosen_logps", "ref_rejected_logps"])
    cache_file = prepared._get_cache_file_path(
        Hasher.hash((prepared._fingerprint, trainer._precompute_model_hash))
    )

    def run_trl() -> Dataset:
        if os.path.exists(cache_file):
            os.remove(cache_file)
        return trainer._precompute_ref_logps(prepared, "bench", args.trl_batch_size)

    tp = tokenize(tokenizer, prompts, chosens, rejecteds, args.max_length)
    kept = np.flatnonzero(tp.keep)
    assert len(kept) == len(prepared), "pair filtering differs from TRL"

    def ours(layout: str, share: bool):
        def run():
            return score_tokenized(
                model,
                tp,
                batch_tokens=args.batch_tokens,
                progress=False,
                autocast=bf16 and device.type == "cuda",
                share_prompt=share,
                layout=layout,
            )

        return run

    labels = {
        "packed": "Winnow, packed rows, shared prompt",
        "padded": "Winnow, padded buckets, shared prompt (default)",
        "packed-noshare": "Winnow, packed rows, no prompt sharing",
        "padded-noshare": "Winnow, padded buckets, no prompt sharing",
    }
    variants = {"TRL precompute": run_trl}
    for v in args.variants.split(","):
        v = v.strip()
        if v not in labels:
            raise SystemExit(f"unknown variant {v!r}; choose among {', '.join(labels)}")
        variants[labels[v]] = ours(v.split("-")[0], not v.endswith("noshare"))
    for name, fn in variants.items():  # warm-up: TRL's construction already ran one pass
        if name != "TRL precompute":
            fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    cpu_times: dict[str, list[float]] = {k: [] for k in variants}
    outputs: dict[str, object] = {}
    for _ in range(args.rounds):
        for name, fn in variants.items():
            gc.collect()
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            outputs[name] = fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            cpu_times[name].append(time.process_time() - c0)

    trl_c = np.asarray(outputs["TRL precompute"]["ref_chosen_logps"], np.float64)
    trl_r = np.asarray(outputs["TRL precompute"]["ref_rejected_logps"], np.float64)
    n = len(kept)

    def diffs(frame) -> tuple[float, float, float]:
        ours = np.concatenate(
            [frame["ref_chosen_logps"].to_numpy()[kept], frame["ref_rejected_logps"].to_numpy()[kept]]
        )
        ref = np.concatenate([trl_c, trl_r])
        err = np.abs(ours - ref)
        lengths = np.concatenate([tp.chosen_lengths[kept], tp.rejected_lengths[kept]]).astype(np.float64)
        return (
            float(err.max()),
            float((err / np.maximum(np.abs(ref), 1.0)).max()),
            float((err / lengths).max()),
        )

    # Useful forward FLOPs of each method's rows (padding excluded), for MFU on GPUs
    flops_trl = sum(
        row_flops(cfg, len(tp.prompt_ids[i]), [int(tp.chosen_lengths[i])])
        + row_flops(cfg, len(tp.prompt_ids[i]), [int(tp.rejected_lengths[i])])
        for i in kept
    )
    flops_ours = sum(
        row_flops(cfg, len(tp.prompt_ids[i]), [int(tp.chosen_lengths[i]), int(tp.rejected_lengths[i])])
        for i in kept
    )
    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in _PEAK_BF16.items() if k in name), None)

    truth = None
    if not args.no_truth:
        # The same weights in float64: the exact value both float32 computations approximate
        exact = LlamaForCausalLM(cfg)
        exact.load_state_dict(model.state_dict())
        exact = exact.to(device=device, dtype=torch.float64).eval()
        frame = score_tokenized(exact, tp, progress=False, autocast=False)
        truth = np.concatenate(
            [frame["ref_chosen_logps"].to_numpy()[kept], frame["ref_rejected_logps"].to_numpy()[kept]]
        )
        del exact

    def truth_err(name: str) -> str:
        if truth is None:
            return "-"
        if name == "TRL precompute":
            got = np.concatenate([trl_c, trl_r])
        else:
            f = outputs[name]
            got = np.concatenate(
                [f["ref_chosen_logps"].to_numpy()[kept], f["ref_rejected_logps"].to_numpy()[kept]]
            )
        return f"{np.abs(got - truth).max():.1e}"

    med_trl = statistics.median(times["TRL precompute"])
    tokens = [len(tp.prompt_ids[i]) for i in kept]
    comp = [int(tp.chosen_lengths[i]) for i in kept] + [int(tp.rejected_lengths[i]) for i in kept]
    kind = "conversations (chat template)" if args.conversational else "plain text"
    print(f"## B2: reference log-probs, TRL precompute vs Winnow, {kind}, {args.data} lengths\n")
    print(f"machine: {machine()}")
    print(
        f"model: Llama hidden {args.hidden}, {args.layers} layers, {args.heads} heads ({args.kv_heads} kv), "
        f"intermediate {args.intermediate}, vocab {len(tokenizer)}, {n_params / 1e6:.1f}M params, {args.dtype}, "
        f"sdpa, device {device.type}"
    )
    print(
        f"pairs: {n} scored of {args.pairs}; prompt tokens {min(tokens)}-{max(tokens)} (mean {np.mean(tokens):.0f}), "
        f"completion tokens {min(comp)}-{max(comp)} (mean {np.mean(comp):.0f}); max_length {args.max_length}; "
        f"TRL batch {args.trl_batch_size} pairs; ours {args.batch_tokens or 'default'} tokens/forward"
    )
    print(f"rounds: {args.rounds}, alternating {' / '.join(variants)}; median of rounds\n")
    header = (
        "| method | wall s per pass (rounds) | CPU s per pass (rounds) | pairs/s (median wall) | speed-up vs TRL, "
        "wall (per round) | speed-up vs TRL, CPU time | max abs diff of sums | max rel diff of sums | "
        "max abs diff of per-token means | max abs error of sums vs float64 |"
    )
    if device.type == "cuda" and peak:
        header += " MFU |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    cpu_trl = statistics.median(cpu_times["TRL precompute"])
    for name, ts in times.items():
        med = statistics.median(ts)
        per_round = [a / b for a, b in zip(times["TRL precompute"], ts, strict=True)]
        if name == "TRL precompute":
            d = f"| - | - | - | {truth_err(name)} |"
        else:
            a, r, m = diffs(outputs[name])
            d = f"| {a:.1e} | {r:.1e} | {m:.1e} | {truth_err(name)} |"
        row = (
            f"| {name} | {', '.join(f'{t:.2f}' for t in ts)} | {', '.join(f'{t:.2f}' for t in cpu_times[name])} "
            f"| {n / med:.2f} | **{med_trl / med:.2f}x** ({', '.join(f'{x:.2f}' for x in per_round)}) "
            f"| {cpu_trl / statistics.median(cpu_times[name]):.2f}x {d}"
        )
        if device.type == "cuda" and peak:
            fl = flops_ours if "shared prompt" in name else flops_trl
            row += f" {fl / med / (peak * 1e12):.1%} |"
        print(row)
    print(
        "\nTRL's sums are float32 (ours: float32 per token, float64 sum): at |sum| >= 2048 one float32 ulp is "
        "2.4e-4, so an absolute 1e-4 on sums is below TRL's own resolution there; the relative difference, the "
        "per-token means and the error against a float64 run of the same weights are the meaningful measures."
    )

    # Tokenisation, side by side: TRL's per-example Dataset.map vs one batched call per list
    t_trl, t_ours = [], []
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        trainer._prepare_dataset(raw, tokenizer, dpo_args, "bench-tok")
        t_trl.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tokenize(tokenizer, prompts, chosens, rejecteds, args.max_length)
        t_ours.append(time.perf_counter() - t0)
    print("\n| tokenisation | s per pass (each round) | pairs/s (median) |")
    print("|---|---|---|")
    print(
        f"| TRL `_prepare_dataset` | {', '.join(f'{t:.3f}' for t in t_trl)} | {args.pairs / statistics.median(t_trl):.0f} |"
    )
    print(
        f"| Winnow `{tokenize.__name__ if not args.conversational else 'tokenize_conversations'}` | "
        f"{', '.join(f'{t:.3f}' for t in t_ours)} | {args.pairs / statistics.median(t_ours):.0f} |"
    )
    for name, ts in times.items():
        if name != "TRL precompute":
            ratio = med_trl / statistics.median(ts)
            print(f"- {name}: **{ratio:.2f}x** TRL's pairs/s (target >= 3x: {'met' if ratio >= 3 else 'missed'})")


if __name__ == "__main__":
    main()
