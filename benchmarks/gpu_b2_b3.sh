#!/usr/bin/env bash
# B2 and B3 on one GPU with a ~0.5B Llama config in bf16, with model-FLOPs utilisation
# (shared/spec/BENCHMARKS.md: "On a GPU ... MFU of at least 40% of the card's bf16 peak in training").
#
# Prepared for a device machine; run from the repository root:
#     bash benchmarks/gpu_b2_b3.sh            # ~10 min on an H100/H200-class card
# Writes benchmarks/gpu-results/{machine.txt,packing-tests.txt,b2.md,b3.md,b3-packing-on.md}.
# Steps, each bounded by `timeout`, so one slow step cannot eat the device time of the others:
#   1. packed == padded on CUDA (tests/test_packing.py, gpu-marked: per-segment SDPA in fp32; varlen
#      FlashAttention in bf16 when flash-attn is installed);
#   2. B2, reference log-probs vs TRL's precompute pass, HH-like lengths, bf16 autocast, MFU;
#   3. B3, the whole path to a trained stage vs TRL's best and TRL's live reference, bf16, MFU
#      (Winnow packs on CUDA only with flash-attn: packing=auto logs which it chose);
#   4. B3's Winnow arm with packing forced on (per-segment SDPA when flash-attn is missing).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
OUT=${OUT:-benchmarks/gpu-results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1 TQDM_DISABLE=1
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; "$PY" -c \
  "import torch, importlib.util as u; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
   'flash_attn', bool(u.find_spec('flash_attn')))"; } > "$OUT/machine.txt" 2>&1
timeout 120 "$PY" -m pytest tests/test_packing.py -q -m gpu -p no:cacheprovider > "$OUT/packing-tests.txt" 2>&1
timeout 180 "$PY" benchmarks/bench_b2_logprobs.py --hidden 896 --layers 24 --heads 14 --kv-heads 2 \
    --intermediate 4864 --vocab 32000 --pairs 1024 --data hh --scale 2 --max-length 1024 --dtype bf16 \
    --rounds 2 --variants padded,packed > "$OUT/b2.md" 2>&1
timeout 300 "$PY" benchmarks/bench_b3_training.py --size 0.5b --device cuda --dtype bf16 --rounds 2 \
    --pairs 1024 --arm trl-best --arm trl-live --arm winnow > "$OUT/b3.md" 2>&1
timeout 120 "$PY" benchmarks/bench_b3_training.py --size 0.5b --device cuda --dtype bf16 --rounds 1 \
    --pairs 512 --arm trl-best --arm winnow --winnow-packing on > "$OUT/b3-packing-on.md" 2>&1
tail -n 40 "$OUT"/*.txt "$OUT"/*.md
