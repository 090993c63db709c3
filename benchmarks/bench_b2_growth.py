"""B2 growth: Winnow's reference log-prob pass at 10k, 100k and 1M pairs, so its cost curve is visible.

Why: BENCHMARKS.md asks for B2 at three sizes (linear, or better). The ratio against TRL is
bench_b2_logprobs.py's job (TRL's pass at 1M pairs would take days on this CPU); here only
Winnow's pass runs: ``tokenize_pairs`` + ``score_tokenized`` (default layout) on HH-like pairs
(:func:`benchmarks.common.hh_like_pairs`), the winnow-tiny shape, one torch thread, each size
in a fresh child process (peak RSS is its own). The pairs are generated once per size into
``--workdir`` (parquet) and read by the child untimed.

Run: ``nice -n 5 .venv/bin/python benchmarks/bench_b2_growth.py --sizes 10k,100k,1M``
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def count(text: str) -> int:
    text = text.strip().lower()
    scale = {"k": 1_000, "m": 1_000_000}.get(text[-1:], 1)
    return int(float(text.rstrip("km")) * scale)


def prepare(work: Path, sizes: list[int], seed: int, scale: float) -> None:
    """The tiny model and tokenizer (trained on the first 3000 pairs) and one parquet per size."""
    import polars as pl
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.common import hh_like_pairs
    from training.models import train_tokenizer
    from training.tiny_config import TinyModelConfig

    work.mkdir(parents=True, exist_ok=True)
    if not (work / "model").is_dir():
        seed_pairs = hh_like_pairs(3000, seed, scale=scale)
        tokenizer = train_tokenizer([*seed_pairs["prompt"], *seed_pairs["chosen"]], TinyModelConfig().vocab_size,
                                    model_max_length=1 << 20)
        tiny = TinyModelConfig()
        torch.manual_seed(seed)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=tiny.hidden_size, intermediate_size=tiny.intermediate_size,
            num_hidden_layers=tiny.num_layers, num_attention_heads=tiny.num_heads, max_position_embeddings=1024,
            tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id))
        model.save_pretrained(work / "model")
        tokenizer.save_pretrained(work / "model")
    for n in sizes:
        path = work / f"pairs-{n}.parquet"
        if not path.is_file():
            pl.DataFrame(hh_like_pairs(n, seed + n, scale=scale)).write_parquet(path)


def child(work: Path, n: int, max_length: int, out: Path) -> None:
    import polars as pl
    import torch

    from curation.lm.loading import load_model, load_tokenizer
    from curation.lm.logprobs import score_tokenized
    from curation.lm.tokenization import tokenize_pairs

    torch.set_num_threads(1)
    tokenizer, model = load_tokenizer(work / "model"), load_model(work / "model", device="cpu")
    frame = pl.read_parquet(work / f"pairs-{n}.parquet")
    columns = [frame[c].to_list() for c in ("prompt", "chosen", "rejected")]
    del frame
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    tp = tokenize_pairs(tokenizer, *columns, max_length, "keep_start")
    t1 = time.perf_counter()
    scores = score_tokenized(model, tp, progress=False)
    t2 = time.perf_counter()
    after = resource.getrusage(resource.RUSAGE_SELF)
    tokens = int((tp.prompt_lengths.clip(max=max_length) * 2 + tp.chosen_lengths + tp.rejected_lengths)[tp.keep].sum())
    out.write_text(json.dumps({
        "pairs": n, "tokens": tokens, "tokenise_s": t1 - t0, "score_s": t2 - t1, "total_s": t2 - t0,
        "cpu_s": (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime),
        "peak_rss_mb": after.ru_maxrss / 1024, "scored": int(scores["ref_chosen_logps"].is_not_null().sum())}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10k,100k,1M")
    ap.add_argument("--scale", type=float, default=0.3, help="HH-like lengths stretched by this (tokens ~ words)")
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="winnow_b2g_"))
    if args.child:
        child(work, args.child, args.max_length, Path(args.child_out))
        return
    from benchmarks.common import describe_machine

    sizes = [count(s) for s in args.sizes.split(",") if s.strip()]
    prepare(work, sizes, args.seed, args.scale)
    rows = []
    for n in sizes:
        out = work / f"result-{n}.json"
        subprocess.run([sys.executable, __file__, "--child", str(n), "--child-out", str(out), "--workdir", str(work),
                        "--max-length", str(args.max_length)], check=True)
        rows.append(json.loads(out.read_text()))
        print(f"  {n} pairs: {rows[-1]['total_s']:.1f} s", file=sys.stderr, flush=True)
    load = os.getloadavg()[0]
    print(f"\n**B2 growth** (Winnow's reference pass alone, winnow-tiny shape, 1 thread, HH-like pairs x{args.scale}, "
          f"max_length {args.max_length})\n\nMachine: {describe_machine(('torch', 'transformers', 'tokenizers'))}; "
          f"load average at the end {load:.1f} (shared machine)\n")
    print("| pairs | tokens | tokenise s | score s | total s | CPU s | pairs/s (wall) | pairs/s (CPU) | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['pairs']:,} | {r['tokens']:,} | {r['tokenise_s']:.1f} | {r['score_s']:.1f} | {r['total_s']:.1f} | "
              f"{r['cpu_s']:.1f} | {r['pairs'] / r['total_s']:,.0f} | {r['pairs'] / r['cpu_s']:,.0f} | "
              f"{r['peak_rss_mb']:,.0f} |")


if __name__ == "__main__":
    main()
