"""B3: the whole path to one trained stage, Winnow against TRL's best setting and TRL's live reference.

Why: a user who trains DPO with TRL and cares about speed sets ``precompute_ref_log_probs=True``
(one reference pass, then padded training), so that is the baseline to beat; TRL with a live
reference model (a no-grad reference forward on every batch) is measured too. Winnow's path is
curation's reference pass (``tokenize_pairs`` + ``score_tokenized``, whose columns training
reuses) plus ``WinnowDPOTrainer`` training on padding-free packed rows (``packing="auto"``).
Target (shared/spec/BENCHMARKS.md): at most 0.5x TRL's best wall time, the same loss curve.

Arms, each a fresh child process (so peak memory is its own), alternating round by round in a
rotated order, after one untimed warm-up child of each:
* ``trl-best``: ``DPOTrainer(precompute_ref_log_probs=True)``: construction (TRL tokenises and
  runs its precompute pass, timed apart) + ``train()``;
* ``trl-live``: ``DPOTrainer(ref_model=copy, precompute_ref_log_probs=False)``: construction +
  ``train()``;
* ``winnow``: ``tokenize_pairs`` + ``score_tokenized`` (curation's pass) + ``WinnowDPOTrainer``
  construction (TRL's tokenisation; no reference pass, the columns are there) + ``train()``;
* ``winnow-padded`` (optional): the same with ``packing="off"``, to separate the two gains.
Same initial weights, pairs, batch size, seed (same batches in the same order), lr schedule,
fp32 (bf16 on GPU with --dtype bf16) and thread count. The loss is logged every step.

``--conversational``: the same pairs in TRL's conversational layout (message lists, made by
:func:`benchmarks.common.as_conversations`, as B2 does) through the tokenizer's chat template in
every arm: TRL's arms tokenise them by their own chat-template path; Winnow's arm runs
``tokenize_conversations`` + ``score_tokenized`` for its reference columns and trains
``WinnowDPOTrainer`` on the conversational frame with them, as ``training/stages.py`` does for
conversational shards. The layout is built before the clock starts, in every arm.

Reported: wall time of the whole path (and its phases), the ratio against each TRL arm (of
medians, and the median of the per-round ratios), tokens/s (the epoch's real tokens, TRL's
sequences without padding, over the whole path), the padding share of TRL's training batches
and of its precompute pass, the tokens Winnow's packed rows ran, peak memory (RSS of the child;
on CUDA ``max_memory_allocated``) and, on a GPU, model-FLOPs utilisation.

Run (CPU, two sizes: the winnow-tiny shape and a ~23M model; ~25 min on 2 shared cores):
    nice -n 5 .venv/bin/python benchmarks/bench_b3_training.py --size tiny --size medium
Conversations (chat template), tiny:
    nice -n 5 .venv/bin/python benchmarks/bench_b3_training.py --size tiny --conversational
GPU, a ~0.5B config in bf16 (see benchmarks/gpu_b2_b3.sh):
    .venv/bin/python benchmarks/bench_b3_training.py --size 0.5b --device cuda --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ARMS = ("trl-best", "trl-live", "winnow", "winnow-padded")
# Shapes: tiny = winnow-tiny (training/tiny_config.py); medium ~23M params; 0.5b ~Qwen2-0.5B-like
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(hidden=128, layers=2, heads=4, kv_heads=4, intermediate=256, vocab=512, pairs=256, scale=0.4,
                 batch_size=16, max_length=512, lr=5e-4),
    "medium": dict(hidden=512, layers=6, heads=8, kv_heads=8, intermediate=1376, vocab=8192, pairs=24, scale=0.6,
                   batch_size=8, max_length=512, lr=1e-4),
    "0.5b": dict(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, vocab=32000, pairs=2048, scale=2.0,
                 batch_size=16, max_length=1024, lr=1e-5),
}
# Dense bf16 peak TFLOP/s by card name, for MFU; --peak-tflops overrides
_PEAK_BF16 = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


# --------------------------------------------------------------------------- preparation


def prepare(size: str, spec: dict[str, Any], out: Path, seed: int) -> dict[str, Any]:
    """Write the model (random init from a Llama config), its tokenizer and the pairs under ``out``."""
    import polars as pl
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.common import hh_like_pairs
    from training.models import train_tokenizer

    data = hh_like_pairs(spec["pairs"], seed, vocabulary=400 if spec["vocab"] <= 1024 else 3000, scale=spec["scale"])
    frame = pl.DataFrame(data)
    texts = [*frame["prompt"][:2000], *frame["chosen"][:2000], *frame["rejected"][:2000]]
    tokenizer = train_tokenizer(texts, min(spec["vocab"], 8192), model_max_length=1 << 20)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=max(len(tokenizer), spec["vocab"]), hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"], num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv_heads"], max_position_embeddings=max(1024, spec["max_length"]),
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "model")
    tokenizer.save_pretrained(out / "model")
    frame.write_parquet(out / "pairs.parquet")
    return {"params": sum(p.numel() for p in model.parameters())}


# ------------------------------------------------------------------------------- one arm


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _cpu_s() -> float:
    """CPU seconds of this process (user + system): on a shared machine, less noisy than wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_pairs(work: Path, spec: dict[str, Any], max_steps: int | None, conversational: bool):  # noqa: ANN201
    """The benchmark's pairs (a polars frame): plain text, or the same pairs as TRL's message lists."""
    import polars as pl

    from benchmarks.common import as_conversations

    frame = pl.read_parquet(work / "pairs.parquet")
    if max_steps:
        frame = frame.head(max_steps * spec["batch_size"])
    if conversational:
        names = ("prompt", "chosen", "rejected")
        conversations = as_conversations(*(frame[c].to_list() for c in names))
        frame = pl.DataFrame(dict(zip(names, conversations, strict=True)))
    return frame


def tokenize(tokenizer, frame, spec: dict[str, Any], conversational: bool):  # noqa: ANN001, ANN201
    """Winnow's tokenisation of the pairs, as curation runs it: plain text or through the chat template."""
    from curation.lm.tokenization import tokenize_conversations, tokenize_pairs

    columns = [frame[c].to_list() for c in ("prompt", "chosen", "rejected")]
    if conversational:
        return tokenize_conversations(tokenizer, *columns, max_length=spec["max_length"],
                                      truncation_mode="keep_start")
    return tokenize_pairs(tokenizer, *columns, spec["max_length"], "keep_start")


def child(arm: str, work: Path, spec: dict[str, Any], args: argparse.Namespace, result: Path) -> None:
    """Run one arm in this (fresh) process and write its numbers to ``result``."""
    import copy

    import datasets
    import torch
    import transformers
    from datasets import Dataset
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import DPOConfig, DPOTrainer

    from curation.lm.loading import load_model, load_tokenizer
    from curation.lm.logprobs import score_tokenized
    from training.objectives import Objective
    from training.trainer import REF_COLUMNS, WinnowDPOTrainer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    torch.set_num_threads(args.threads)
    tokenizer = load_tokenizer(work / "model")
    base = load_model(work / "model", device=device, dtype=dtype)
    frame = load_pairs(work, spec, args.max_steps, args.conversational)
    columns = [frame[c].to_list() for c in ("prompt", "chosen", "rejected")]
    losses: list[float] = []

    class Losses(TrainerCallback):
        def on_log(self, a, state, control, logs=None, **kw) -> None:  # noqa: ANN001
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    def config(precompute: bool) -> DPOConfig:
        return DPOConfig(
            output_dir=str(work / f"out-{arm}"), learning_rate=spec["lr"], num_train_epochs=1,
            per_device_train_batch_size=spec["batch_size"], lr_scheduler_type="linear", warmup_steps=0.1,
            logging_steps=1, max_length=spec["max_length"], truncation_mode="keep_start",
            precompute_ref_log_probs=precompute, loss_type=["sigmoid"], beta=0.1, seed=args.seed,
            bf16=args.dtype == "bf16", use_cpu=device.type != "cuda", gradient_checkpointing=False,
            save_strategy="no", report_to=[], disable_tqdm=True, dataloader_num_workers=0,
        )

    class Counting:
        """TRL's collator, counting the tokens of the padded batches it builds."""

        def __init__(self, inner: Any) -> None:
            self.inner, self.padded, self.real = inner, 0, 0

        def __call__(self, examples: list[dict]) -> dict:
            out = self.inner(examples)
            self.padded += out["input_ids"].numel()
            self.real += int(out["attention_mask"].sum())
            return out

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    phases: dict[str, float] = {}
    stats: dict[str, Any] = {"arm": arm, "conversational": args.conversational}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    stats["rss_before_mb"] = _rss_mb()
    sync()
    cpu0 = _cpu_s()
    t0 = time.perf_counter()
    if arm.startswith("trl"):
        precompute = arm == "trl-best"

        class TimedDPOTrainer(DPOTrainer):
            def _precompute_ref_logps(self, dataset, name, batch_size):  # noqa: ANN001, ANN202
                sync()
                start = time.perf_counter()
                out = super()._precompute_ref_logps(dataset, name, batch_size)
                sync()
                phases["reference pass"] = time.perf_counter() - start
                return out

        dataset = Dataset.from_dict({"prompt": columns[0], "chosen": columns[1], "rejected": columns[2]})
        ref = None if precompute else copy.deepcopy(base)
        trainer = TimedDPOTrainer(model=base, ref_model=ref, args=config(precompute), train_dataset=dataset,
                                  processing_class=tokenizer, callbacks=[Losses()])
        sync()
        phases["trainer init (tokenise)"] = time.perf_counter() - t0 - phases.get("reference pass", 0.0)
    else:
        tokens = tokenize(tokenizer, frame, spec, args.conversational)
        phases["tokenise"] = time.perf_counter() - t0
        start = time.perf_counter()
        ref = score_tokenized(base, tokens, progress=False).select(REF_COLUMNS)
        sync()
        phases["reference pass"] = time.perf_counter() - start
        start = time.perf_counter()
        shard = frame.hstack(ref).drop_nulls(REF_COLUMNS)
        dataset = Dataset.from_polars(shard)
        trainer = WinnowDPOTrainer(model=base, args=config(True), train_dataset=dataset, processing_class=tokenizer,
                                   callbacks=[Losses()], objective=Objective.from_preset("dpo"),
                                   packing="off" if arm == "winnow-padded" else args.winnow_packing)
        stats["packing"] = trainer.packing.reason
        sync()
        phases["trainer init (tokenise)"] = time.perf_counter() - start
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    counting = Counting(trainer.data_collator)
    trainer.data_collator = counting
    sync()
    start = time.perf_counter()
    trainer.train()
    sync()
    phases["train"] = time.perf_counter() - start
    stats["total_s"] = time.perf_counter() - t0
    stats["cpu_s"] = _cpu_s() - cpu0
    stats.update(phases=phases, loss=losses, steps=trainer.state.global_step, batch_tokens_padded=counting.padded,
                 batch_tokens_real=counting.real)
    # tokens the policy's forwards ran: the packed rows, or TRL's padded batches
    stats["tokens_run"] = trainer.packing_tokens["packed"] if arm == "winnow" else counting.padded
    stats["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        stats["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    result.write_text(json.dumps(stats))


# ---------------------------------------------------------------------------------- report


def epoch_stats(work: Path, spec: dict[str, Any], max_steps: int | None, conversational: bool) -> dict[str, Any]:
    """Token counts of the epoch (TRL's sequences), the padding of TRL's precompute pass, length spread."""
    import numpy as np

    from curation.lm.loading import load_tokenizer

    frame = load_pairs(work, spec, max_steps, conversational)
    tp = tokenize(load_tokenizer(work / "model"), frame, spec, conversational)
    k = tp.keep
    p = np.minimum(tp.prompt_lengths, spec["max_length"])[k]
    c, r = tp.chosen_lengths[k], tp.rejected_lengths[k]
    seq = np.concatenate([p + c, p + r])
    # TRL's precompute pass: batches of batch_size pairs in dataset order, padded to their longest
    b = spec["batch_size"]
    padded = sum(2 * len(p[i:i + b]) * int(max((p + c)[i:i + b].max(), (p + r)[i:i + b].max()))
                 for i in range(0, len(p), b))
    real = int(seq.sum())
    return {"pairs": int(k.sum()), "real_tokens": real, "completion_tokens": int(c.sum() + r.sum()),
            "precompute_padding": 1 - real / padded,
            "prompt_pct": np.percentile(tp.prompt_lengths[k], [0, 50, 90, 100]).astype(int).tolist(),
            "completion_pct": np.percentile(np.concatenate([c, r]), [0, 50, 90, 100]).astype(int).tolist(),
            "truncated": float((tp.chosen_truncated | tp.rejected_truncated)[k].mean())}


def train_flops(spec: dict[str, Any], vocab: int, real: int, completion: int) -> float:
    """Model FLOPs of one epoch's training (forward + backward = 3x forward) on the real tokens;
    the LM head counted on completion tokens only, attention scores left out (an underestimate)."""
    d, kv = spec["hidden"], spec["kv_heads"] * (spec["hidden"] // spec["heads"])
    layer = 2 * d * d + 2 * d * kv + 3 * d * spec["intermediate"]
    return 3 * 2.0 * (real * spec["layers"] * layer + completion * d * vocab)


def report(size: str, spec: dict[str, Any], params: int, ep: dict[str, Any], runs: list[dict[str, Any]],
           args: argparse.Namespace, machine: str) -> dict[str, Any]:
    by = {a: [r for r in runs if r["arm"] == a] for a in args.arm}
    med = {a: statistics.median(r["total_s"] for r in rs) for a, rs in by.items()}
    rounds = len(by[args.arm[0]])
    kind = "conversations (chat template)" if args.conversational else "plain text"
    lines = [f"\n**B3, {size}, {kind}**: Llama {spec['layers']} layers x {spec['hidden']} (ffn {spec['intermediate']}, vocab "
             f"{spec['vocab']}, {spec['heads']}/{spec['kv_heads']} heads), {params / 1e6:.2f} M params, {args.dtype} on "
             f"{args.device}, {args.threads} torch thread(s). {ep['pairs']} HH-like pairs (prompt tokens min/median/"
             f"p90/max {ep['prompt_pct']}, completions {ep['completion_pct']}; max_length {spec['max_length']} "
             f"keep_start cuts {100 * ep['truncated']:.0f}% of pairs), batch {spec['batch_size']} pairs, "
             f"{by[args.arm[0]][0]['steps']} steps, lr {spec['lr']} linear, seed {args.seed}. {rounds} rounds, "
             f"arms alternating in rotated order, each a fresh process, after an untimed warm-up of each.\n",
             f"Machine: {machine}\n",
             "| arm | whole path s (median) | rounds | CPU s (median) | phases s (median) | tokens/s | tokens run / "
             "real | padding share | peak memory MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    flops = train_flops(spec, spec["vocab"], ep["real_tokens"], ep["completion_tokens"])
    for arm, rs in by.items():
        phase_names = list(rs[0]["phases"])
        phases = ", ".join(f"{k} {statistics.median(r['phases'][k] for r in rs):.2f}" for k in phase_names)
        each = ", ".join(f"{r['total_s']:.1f}" for r in rs)
        run = statistics.median(r["tokens_run"] for r in rs)
        if arm.startswith("trl"):
            pad = statistics.median(1 - r["batch_tokens_real"] / r["batch_tokens_padded"] for r in rs)
            padding = f"{100 * pad:.0f}% train" + (f", {100 * ep['precompute_padding']:.0f}% precompute"
                                                   if arm == "trl-best" else "")
        else:
            padding = "0% train" if "packed" in rs[0].get("packing", "") else \
                f"{100 * statistics.median(1 - r['batch_tokens_real'] / r['batch_tokens_padded'] for r in rs):.0f}% train"
        mem = statistics.median(r.get("peak_cuda_mb", r["peak_rss_mb"]) for r in rs)
        base = statistics.median(r["rss_before_mb"] for r in rs)
        memtxt = f"{mem:.0f}" + ("" if "peak_cuda_mb" in rs[0] else f" (RSS; {base:.0f} after loading)")
        mfu = ""
        if args.device == "cuda" and args.peak:
            t = statistics.median(r["phases"]["train"] for r in rs)
            mfu = f"; train MFU {100 * flops / t / (args.peak * 1e12):.1f}%"
        cpu = statistics.median(r["cpu_s"] for r in rs)
        lines.append(f"| {arm} | {med[arm]:.2f} | {each} | {cpu:.1f} | {phases}{mfu} | {ep['real_tokens'] / med[arm]:.0f} | "
                     f"{run / ep['real_tokens']:.2f} | {padding} | {memtxt} |")
    out: dict[str, Any] = {"size": size, "kind": kind, "medians": med, "runs": runs, "epoch": ep, "params": params}
    lines.append("")
    for target in ("trl-best", "trl-live"):
        if "winnow" not in by or target not in by:
            continue
        ratio = med["winnow"] / med[target]
        paired = statistics.median(w["total_s"] / t["total_s"] for w, t in zip(by["winnow"], by[target], strict=True))
        cpu = statistics.median(w["cpu_s"] / t["cpu_s"] for w, t in zip(by["winnow"], by[target], strict=True))
        goal = "; target <= 0.5x: " + ("met" if ratio <= 0.5 else "missed") if target == "trl-best" else ""
        lines.append(f"- **Winnow / {target}: {ratio:.3f}x** wall (ratio of medians{goal}); per round "
                     f"{paired:.3f}x (median); CPU time {cpu:.3f}x.")
        out[f"ratio_{target}"] = ratio
    if "winnow" in by and "winnow-padded" in by:
        lines.append(f"- Packing alone (Winnow packed / Winnow padded, training phase): "
                     f"{statistics.median(r['phases']['train'] for r in by['winnow']) / statistics.median(r['phases']['train'] for r in by['winnow-padded']):.3f}x.")
    if "winnow" in by:
        lines.append(f"- Winnow's training: {by['winnow'][0].get('packing', '?')}.")
    if "trl-best" in by and "winnow" in by:
        diff = max(abs(a - b) for w, t in zip(by["winnow"], by["trl-best"], strict=True)
                   for a, b in zip(w["loss"], t["loss"], strict=True))
        n = len(by["trl-best"][0]["loss"])
        lines.append(f"- Loss curves ({n} logged steps): max |loss_TRL-best - loss_Winnow| = {diff:.2e}.")
        out["curve_diff"] = diff
    if "trl-best" in by and "trl-live" in by:
        diff = max(abs(a - b) for w, t in zip(by["trl-live"], by["trl-best"], strict=True)
                   for a, b in zip(w["loss"], t["loss"], strict=True))
        lines.append(f"- TRL live vs TRL best loss curves: max diff {diff:.2e}.")
    print("\n".join(lines), flush=True)
    return out


def machine_line(args: argparse.Namespace, load_start: float) -> str:
    import torch

    from benchmarks.common import describe_machine

    gpu = torch.cuda.get_device_name(0) if args.device == "cuda" else "none"
    load = os.getloadavg()[0]
    return (describe_machine(("torch", "transformers", "trl", "accelerate", "datasets"), gpu, args.threads)
            + f"; load average {load_start:.1f} at start, {load:.1f} at the end (shared machine)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", action="append", choices=sorted(SIZES), help="model size(s); default tiny")
    ap.add_argument("--arm", action="append", choices=ARMS, help=f"arms (default: {', '.join(ARMS[:3])})")
    ap.add_argument("--pairs", type=int, default=None, help="override the size's number of pairs")
    ap.add_argument("--max-steps", type=int, default=None, help="only the first N batches' pairs (smoke runs)")
    ap.add_argument("--conversational", action="store_true",
                    help="the same pairs as message lists through the chat template (TRL's conversational layout)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on CPU, as training "
                                                              "uses at width <= 256; all cores above)")
    ap.add_argument("--peak-tflops", type=float, default=None)
    ap.add_argument("--winnow-packing", choices=["auto", "on"], default="auto",
                    help="the winnow arm's packing (on: also on CUDA without flash-attn)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-size", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.size = args.size or ["tiny"]
    args.arm = args.arm or list(ARMS[:3])
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.child:
        spec = dict(SIZES[args.child_size])
        if args.pairs:
            spec["pairs"] = args.pairs
        child(args.child, Path(args.workdir), spec, args, Path(args.child_out))
        return

    root = Path(args.workdir or tempfile.mkdtemp(prefix="winnow_b3_"))
    results = []
    for size in args.size:
        spec = dict(SIZES[size])
        if args.pairs:
            spec["pairs"] = args.pairs
        if args.threads is None:
            args.threads = 1 if args.device == "cpu" and spec["hidden"] <= 256 else (os.cpu_count() or 1)
        work = root / size
        params = prepare(size, spec, work, args.seed)["params"]
        if args.device == "cuda":
            name = torch.cuda.get_device_name(0)
            args.peak = args.peak_tflops or next((v for k, v in _PEAK_BF16.items() if k in name), None)
        else:
            args.peak = None

        def launch(arm: str, tag: str, steps: int | None = None, work: Path = work, size: str = size) -> dict[str, Any]:
            out = work / f"{tag}-{arm}.json"
            cmd = [sys.executable, __file__, "--child", arm, "--child-size", size, "--child-out", str(out),
                   "--workdir", str(work), "--device", args.device, "--dtype", args.dtype,
                   "--threads", str(args.threads), "--seed", str(args.seed), "--winnow-packing", args.winnow_packing]
            if args.pairs:
                cmd += ["--pairs", str(args.pairs)]
            if args.conversational:
                cmd.append("--conversational")
            if steps or args.max_steps:
                cmd += ["--max-steps", str(steps or args.max_steps)]
            env = dict(os.environ, HF_DATASETS_CACHE=tempfile.mkdtemp(prefix="winnow_b3_ds_"))
            subprocess.run(cmd, check=True, env=env)
            return json.loads(out.read_text())

        load_start = os.getloadavg()[0]
        for arm in args.arm:  # warm-up (page cache, .pyc, allocator): one step of each, untimed
            launch(arm, "warm", 1)
        runs = []
        for r in range(args.rounds):
            order = args.arm[r % len(args.arm):] + args.arm[: r % len(args.arm)]
            for arm in order:
                runs.append(launch(arm, f"round{r}"))
                print(f"  {size} round {r + 1} {arm:14s} {runs[-1]['total_s']:.2f} s", file=sys.stderr, flush=True)
        ep = epoch_stats(work, spec, args.max_steps, args.conversational)
        results.append(report(size, spec, params, ep, runs, args, machine_line(args, load_start)))
        args.threads = None if "--threads" not in sys.argv else args.threads
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
