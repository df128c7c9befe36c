#!/usr/bin/env bash
# One prepared run for a lent GPU machine (see README, "Scaling out"): the digits Table 2 with a larger
# sample count, and sampling throughput per solver at NFE 5 in fp32/bf16/fp16. Results go to
# outputs/gpu_check/ (paste them into the README with the card's name).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/gpu_check}
mkdir -p "$OUT"
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || { python3 -m venv .venv && .venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1 -e ".[test]"; PY=.venv/bin/python; }
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
"$PY" benchmarks/throughput.py --device cuda --batch 4096 --precisions fp32,bf16,fp16 | tee "$OUT/throughput.md"
# the digits Table 2 with 10k samples per cell on the GPU (resumable: finished cells are skipped)
"$PY" -m amedlab -m experiments=table2_digits hydra/launcher=basic device=cuda eval.seeds=0-9999 eval.batch_size=2500 \
    distill.accelerator=gpu sweep_dir="$OUT/table2_digits_10k" hydra.sweep.dir="$OUT/table2_digits_10k" \
    | tee "$OUT/table2.log"
"$PY" -m amedlab stage=table sweep_dir="$OUT/table2_digits_10k" | tee "$OUT/table2.md"
