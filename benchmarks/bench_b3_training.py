"""B3: one training epoch of a stage, Winnow (reused reference log-probs) vs TRL (live reference).

Why: an sDPO stage trains against reference log-probs the curation step (stage 1) or the fast
scorer (later stages) already computed, so ``WinnowDPOTrainer`` runs no reference model at all,
where TRL's ``DPOTrainer`` with a live reference runs a no-grad reference forward on every
batch. Target: at most 0.8x TRL's wall time, with an identical loss curve for plain DPO.

What is timed, alternating A/B/A/B in one process after one untimed warm-up of each:
* A, TRL: ``DPOTrainer(model, ref_model=copy, precompute_ref_log_probs=False, loss_type=sigmoid)``;
* B, Winnow: ``WinnowDPOTrainer(model, objective=dpo)`` on the same shard with its
  ``ref_chosen_logps``/``ref_rejected_logps`` columns (precompute_ref_log_probs=True, as
  ``training.stages`` configures it);
the wall time of ``trainer.train()`` for one epoch: same initial weights, pairs, batch size,
seed (so the same batches in the same order), learning-rate schedule and thread count. Trainer
construction (tokenising the shard) is timed apart; computing the shard's reference columns is
curation's cost (B2), reported once for scale. The loss is logged every step and the two
curves are compared. To explain the ratio, TRL's reference forwards are timed inside its run.

Run (CPU, the demo-sized shard on the winnow-tiny shape, ~1 min):
    .venv/bin/python benchmarks/bench_b3_training.py
A larger CPU model:  ``--hidden 256 --layers 4 --intermediate 688``.
A curated shard:     ``--shards RUN/shards --stage 1`` (model: the manifest's scoring model).
GPU, a ~0.5B config in bf16 (reports MFU):
    .venv/bin/python benchmarks/bench_b3_training.py --device cuda --dtype bf16 --hidden 896 --layers 24 \
        --heads 14 --kv-heads 2 --intermediate 4864 --vocab 32000 --data words --pairs 2048 \
        --min-words 64 --max-words 384 --max-length 1024 --batch-size 8
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_DATASETS_CACHE", tempfile.mkdtemp(prefix="winnow_b3_"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets  # noqa: E402
import polars as pl  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback, ProgressCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from benchmarks.common import describe_machine  # noqa: E402
from curation.lm.loading import load_model, load_tokenizer, torch_threads  # noqa: E402
from curation.lm.logprobs import reference_logprobs  # noqa: E402
from curation.lm.tokenization import tokenize_pairs  # noqa: E402
from curation.manifest import ShardManifest  # noqa: E402
from training.models import train_tokenizer  # noqa: E402
from training.objectives import Objective  # noqa: E402
from training.sorting import PreferenceSetConfig, generate_preferences  # noqa: E402
from training.trainer import REF_COLUMNS, WinnowDPOTrainer  # noqa: E402

datasets.disable_progress_bars()
transformers.logging.set_verbosity_error()

# Dense bf16 peak TFLOP/s by card name, for MFU; --peak-tflops overrides
_PEAK_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


# ------------------------------------------------------------------------------- setup


def machine(device: torch.device, threads: int) -> str:
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "none"
    return describe_machine(("torch", "transformers", "trl", "accelerate", "datasets"), gpu, threads)


def random_word_pairs(n: int, lo: int, hi: int, seed: int) -> pl.DataFrame:
    """Pairs of random words, lo..hi words per text (for longer sequences than the sorting task)."""
    rng = random.Random(seed)
    words = list({"".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 7))) for _ in range(3000)})

    def text(lead: str = "") -> str:
        return lead + " ".join(rng.choices(words, k=rng.randint(lo, hi)))

    return pl.DataFrame({"prompt": [text() for _ in range(n)], "chosen": [text(" ") for _ in range(n)],
                         "rejected": [text(" ") for _ in range(n)]})


def build(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple[Any, Any, pl.DataFrame, str]:
    """(model, tokenizer, shard frame without ref columns, description)."""
    if args.shards:
        manifest = ShardManifest.load(Path(args.shards))
        entry = next(s for s in manifest.stages if s.stage == args.stage)
        frame = pl.read_parquet(manifest.shard_path(entry))
        frame = frame.select("prompt", "chosen", "rejected", *[c for c in REF_COLUMNS if c in frame.columns])
        source = args.model or manifest.reference.model
        model = load_model(source, device=device, dtype=dtype)
        args.max_length = manifest.reference.max_length
        return model, load_tokenizer(source), frame, f"curated shard {manifest.shard_path(entry)}, model {source}"
    if args.data == "sorting":
        frame = generate_preferences(PreferenceSetConfig(size=args.pairs, seed=args.seed)).select(
            "prompt", "chosen", "rejected")
    else:
        frame = random_word_pairs(args.pairs, args.min_words, args.max_words, args.seed)
    texts = [*frame["prompt"], *frame["chosen"], *frame["rejected"]]
    tokenizer = train_tokenizer(texts, min(args.vocab, 4096), model_max_length=args.max_length or 4096)
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        vocab_size=max(len(tokenizer), args.vocab),  # a real-sized LM head even when the BPE is smaller
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.kv_heads or args.heads,
        max_position_embeddings=max(256, args.max_length or 0), tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    what = f"{args.data} pairs (generated, seed {args.seed}), random-init Llama from config"
    return model, tokenizer, frame, what


def dpo_args(args: argparse.Namespace, out: Path, device: torch.device, precompute: bool) -> DPOConfig:
    """The stage's DPOConfig (training.stages.dpo_config's fields), logging every step."""
    return DPOConfig(
        output_dir=str(out), learning_rate=args.lr, num_train_epochs=1, per_device_train_batch_size=args.batch_size,
        lr_scheduler_type="linear", warmup_steps=0.1, logging_steps=1, max_length=args.max_length,
        truncation_mode="keep_start", precompute_ref_log_probs=precompute, loss_type=["sigmoid"], beta=0.1,
        seed=args.seed, bf16=args.dtype == "bf16", use_cpu=device.type != "cuda", gradient_checkpointing=False,
        save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
    )


class Losses(TrainerCallback):
    def __init__(self) -> None:
        self.loss: list[float] = []

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:  # noqa: ANN001
        if logs and "loss" in logs:
            self.loss.append(float(logs["loss"]))


class Timed(torch.nn.Module):
    """Wraps TRL's reference model to add up the time of its forwards (synchronised on CUDA)."""

    def __init__(self, module: torch.nn.Module) -> None:
        super().__init__()
        self.module = module
        self.seconds = 0.0

    def forward(self, *a: Any, **kw: Any) -> Any:
        sync()
        start = time.perf_counter()
        out = self.module(*a, **kw)
        sync()
        self.seconds += time.perf_counter() - start
        return out


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


# ------------------------------------------------------------------------------- runs


def run_once(kind: str, args: argparse.Namespace, base: Any, tokenizer: Any, plain: Dataset, reused: Dataset,
             out: Path, device: torch.device, max_steps: int | None = None, time_ref: bool = False) -> dict[str, Any]:
    losses = Losses()
    config = dpo_args(args, out, device, precompute=kind == "winnow")
    if max_steps:
        config.max_steps = max_steps
    sync()
    start = time.perf_counter()
    if kind == "trl":
        trainer = DPOTrainer(model=copy.deepcopy(base), ref_model=copy.deepcopy(base), args=config,
                             train_dataset=plain, processing_class=tokenizer, callbacks=[losses])
    else:
        trainer = WinnowDPOTrainer(model=copy.deepcopy(base), args=config, train_dataset=reused,
                                   processing_class=tokenizer, callbacks=[losses], objective=Objective.from_preset("dpo"))
    init_s = time.perf_counter() - start
    trainer.remove_callback(PrinterCallback)  # no per-step dict printing in either run
    trainer.remove_callback(ProgressCallback)
    timer = None
    if time_ref and kind == "trl":
        timer = Timed(trainer.ref_model)
        trainer.ref_model = timer
    sync()
    start = time.perf_counter()
    trainer.train()
    sync()
    train_s = time.perf_counter() - start
    steps = trainer.state.global_step
    del trainer
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"kind": kind, "init_s": init_s, "train_s": train_s, "steps": steps, "loss": losses.loss,
            "ref_s": timer.seconds if timer else None}


def epoch_tokens(tokenizer: Any, frame: pl.DataFrame, max_length: int | None) -> tuple[int, int]:
    """(tokens the policy sees per epoch, completion tokens): prompt+chosen and prompt+rejected, truncated as TRL."""
    tp = tokenize_pairs(tokenizer, frame["prompt"].to_list(), frame["chosen"].to_list(), frame["rejected"].to_list(),
                        max_length, "keep_start")
    kept = tp.keep
    prompt = tp.prompt_lengths[kept].astype(int)
    comp = tp.chosen_lengths[kept].astype(int) + tp.rejected_lengths[kept].astype(int)
    return int(2 * prompt.sum() + comp.sum()), int(comp.sum())


def forward_flops(config: Any, tokens: int, completion: int) -> float:
    """Forward FLOPs of an epoch: 2 x the layers' matmul parameters per token, plus the LM head on the
    completion tokens only (TRL's fused head scores just those on GPUs). Attention scores are left out
    (a few % at these lengths), so the MFU is a slight underestimate."""
    d, layers = config.hidden_size, config.num_hidden_layers
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    layer = 2 * d * d + 2 * d * kv + 3 * d * config.intermediate_size
    return 2.0 * (tokens * layers * layer + completion * d * config.vocab_size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=1200, help="shard size (the demo's stages hold ~1180)")
    ap.add_argument("--data", choices=["sorting", "words"], default="sorting",
                    help="sorting: the demo's synthetic task; words: random words, --min/--max-words long")
    ap.add_argument("--min-words", type=int, default=64)
    ap.add_argument("--max-words", type=int, default=384)
    ap.add_argument("--shards", default=None, help="a curated shards/ folder: time its --stage instead")
    ap.add_argument("--stage", type=int, default=1)
    ap.add_argument("--model", default=None, help="with --shards: model path (default: the manifest's)")
    ap.add_argument("--hidden", type=int, default=128, help="defaults: the winnow-tiny shape")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--intermediate", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=16, help="per device (TrainConfig's default)")
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--repeats", type=int, default=3, help="timed epochs of each, alternating")
    ap.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16: bf16 weights + autocast")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 below width 256, as stages)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the card, for MFU")
    ap.add_argument("--json", default=None, help="also write the raw numbers here")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    base, tokenizer, frame, what = build(args, device, dtype)
    width = base.config.get_text_config().hidden_size
    threads = args.threads or (torch.get_num_threads() if device.type == "cuda" or width > 256 else 1)
    work = Path(tempfile.mkdtemp(prefix="winnow_b3_run_"))

    with torch_threads(threads):
        score_s = None
        if not set(REF_COLUMNS) <= set(frame.columns):  # a curated stage-1 shard carries them already
            start = time.perf_counter()
            ref = reference_logprobs(base, tokenizer, frame["prompt"].to_list(), frame["chosen"].to_list(),
                                     frame["rejected"].to_list(), max_length=args.max_length, progress=False)
            score_s = time.perf_counter() - start
            frame = frame.hstack(ref.select(REF_COLUMNS))
        frame = frame.drop_nulls(REF_COLUMNS)  # pairs TRL drops (prompt fills max_length) have none
        plain = Dataset.from_polars(frame.drop(REF_COLUMNS))
        reused = Dataset.from_polars(frame)
        # warm-up (imports, allocator, kernels): a few steps of each, untimed
        for kind in ("trl", "winnow"):
            run_once(kind, args, base, tokenizer, plain, reused, work / f"warm-{kind}", device, max_steps=3)
        runs: list[dict[str, Any]] = []
        for r in range(args.repeats):
            for kind in ("trl", "winnow"):
                runs.append(run_once(kind, args, base, tokenizer, plain, reused, work / f"{kind}-{r}", device,
                                     time_ref=True))
                print(f"  {kind:6s} epoch {r + 1}: {runs[-1]['train_s']:.2f} s", file=sys.stderr)

    trl_runs = [x for x in runs if x["kind"] == "trl"]
    win_runs = [x for x in runs if x["kind"] == "winnow"]
    t_trl = statistics.median(x["train_s"] for x in trl_runs)
    t_win = statistics.median(x["train_s"] for x in win_runs)
    ratio = t_win / t_trl
    paired = statistics.median(w["train_s"] / t["train_s"] for t, w in zip(trl_runs, win_runs, strict=True))
    ref_share = statistics.median(x["ref_s"] / x["train_s"] for x in trl_runs)
    steps = trl_runs[0]["steps"]
    assert all(x["steps"] == steps for x in runs)
    curve_diff = max(abs(a - b) for t, w in zip(trl_runs, win_runs, strict=True)
                     for a, b in zip(t["loss"], w["loss"], strict=True))
    curve_len = {len(x["loss"]) for x in runs}
    repeat_diff = max((abs(a - b) for x in trl_runs[1:] for a, b in zip(x["loss"], trl_runs[0]["loss"], strict=True)),
                      default=0.0)

    tokens, completion = epoch_tokens(tokenizer, frame, args.max_length)
    cfg = base.config.get_text_config()
    n_params = sum(p.numel() for p in base.parameters())
    fwd = forward_flops(cfg, tokens, completion)
    flops_win, flops_trl = 3 * fwd, 4 * fwd  # policy forward+backward; TRL adds a reference forward
    peak = args.peak_tflops
    if peak is None and device.type == "cuda":
        name = torch.cuda.get_device_name(0)
        peak = next((v for k, v in _PEAK_BF16.items() if k in name), None)

    def mfu(flops: float, seconds: float) -> str:
        if device.type != "cuda" or not peak:
            return "n/a (CPU)" if device.type != "cuda" else "n/a (unknown peak)"
        return f"{100 * flops / seconds / (peak * 1e12):.1f}%"

    print(f"\n**B3, one epoch of one stage** ({what})\n")
    print(f"Machine: {machine(device, threads)}\n")
    print(f"Model: Llama {cfg.num_hidden_layers} layers x {cfg.hidden_size} (ffn {cfg.intermediate_size}, vocab "
          f"{cfg.vocab_size}), {n_params / 1e6:.2f} M params, {args.dtype} on {device.type}. Shard: {frame.height} "
          f"pairs, {tokens} tokens per epoch ({completion} completion), batch {args.batch_size} pairs -> {steps} "
          f"steps, max_length {args.max_length}, lr {args.lr} linear, seed {args.seed}. "
          f"Timed: trainer.train(), {args.repeats} alternating runs each after a warm-up; median.\n")
    print("| trainer | reference | epoch wall s (median) | runs | steps/s | pairs/s | trainer init s | MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for label, refdesc, rs, t, fl in (
        ("TRL DPOTrainer (sigmoid)", "live model, no-grad forward per batch", trl_runs, t_trl, flops_trl),
        ("WinnowDPOTrainer (dpo)", "shard's ref_*_logps columns", win_runs, t_win, flops_win),
    ):
        each = ", ".join(f"{x['train_s']:.2f}" for x in rs)
        print(f"| {label} | {refdesc} | {t:.2f} | {each} | "
              f"{steps / t:.1f} | {frame.height / t:.0f} | {statistics.median(x['init_s'] for x in rs):.2f} | "
              f"{mfu(fl, t)} |")
    verdict = "met" if ratio <= 0.8 else "missed"
    print(f"\n- **Winnow / TRL wall time: {ratio:.3f}x** (ratio of medians; target <= 0.8x: {verdict}); median of "
          f"the {len(trl_runs)} back-to-back pairs' ratios: {paired:.3f}x.")
    print(f"- Reference forwards inside TRL's epoch: {100 * ref_share:.1f}% of its wall time (median), so removing "
          f"them alone predicts {1 - ref_share:.3f}x.")
    print(f"- Loss curves ({curve_len.pop() if len(curve_len) == 1 else curve_len} logged steps): "
          f"max |loss_TRL - loss_Winnow| = {curve_diff:.2e}; TRL run-to-run: {repeat_diff:.2e}.")
    if score_s is None:
        print("- Reference columns: the curated shard's own (computed during curation).")
    else:
        print(f"- Computing the shard's reference columns (curation's fast scorer, once, B2): {score_s:.2f} s.")
    if args.json:
        Path(args.json).write_text(json.dumps({"ratio": ratio, "paired_ratio": paired, "ref_share": ref_share, "curve_diff": curve_diff,
                                               "runs": runs, "score_s": score_s, "tokens": tokens}, indent=1))


if __name__ == "__main__":
    main()
