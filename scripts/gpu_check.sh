#!/usr/bin/env bash
# One prepared run for a GPU machine (see docs/scaling.md): sampling throughput per solver at
# NFE 5 in fp32/bf16/fp16, and the digits Table 2 with 10k samples per cell on the GPU. Results go to
# outputs/gpu_check/ (paste them into docs/scaling.md with the card's name).
#
#   scripts/gpu_check.sh             # on the GPU machine
#   scripts/gpu_check.sh --dry-run   # anywhere, on the CPU, in seconds: composes and checks every
#                                    # command below (no install, no compute, nothing written)
# PY=<python> uses an environment that already has torch (else .venv, created with the tested pins).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-}" in
    --dry-run) DRY=1 ;;
    "") DRY=0 ;;
    *) echo "usage: scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
esac
OUT=${OUT:-outputs/gpu_check}
SWEEP="$OUT/table2_digits_10k"
PINS="torch==2.14.1 torchvision==0.29.1"   # the tested pair (the Makefile's PINS)
PY=${PY:-.venv/bin/python}

THROUGHPUT=(benchmarks/throughput.py --device cuda --batch 4096 --precisions fp32,bf16,fp16)
# The digits Table 2 on the GPU, cells one after another (the basic launcher: one process holds the
# GPU), AMED distilled on the GPU (the Trainer runs where the model is). Resumable: finished cells skip.
TABLE2=(experiments=table2_digits hydra/launcher=basic device=cuda eval.seeds=0-9999 eval.batch_size=2500
        sweep_dir="$SWEEP" hydra.sweep.dir="$SWEEP")
TABLE=(stage=table sweep_dir="$SWEEP")

if [ "$DRY" = 1 ]; then
    [ -x "$PY" ] || PY=python3
    echo "dry run with $PY: nothing installed, sampled or written"
    echo "+ $PY ${THROUGHPUT[*]}"
    "$PY" "${THROUGHPUT[@]}" --dry-run
    echo "+ $PY -m amedlab -m ${TABLE2[*]}"
    # every cell composes (the launcher and Hydra's settings included) and passes evaluate's checks
    "$PY" scripts/check_sweep.py "${TABLE2[@]}"
    echo "+ $PY -m amedlab ${TABLE[*]}"
    "$PY" -m amedlab "${TABLE[@]}" --cfg job > /dev/null
    echo "dry run: every command composes"
    exit 0
fi

mkdir -p "$OUT"
[ -x "$PY" ] || { python3 -m venv .venv && .venv/bin/pip install -q $PINS -e ".[test]"; PY=.venv/bin/python; }
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
"$PY" "${THROUGHPUT[@]}" | tee "$OUT/throughput.md"
"$PY" -m amedlab -m "${TABLE2[@]}" | tee "$OUT/table2.log"
"$PY" -m amedlab "${TABLE[@]}" | tee "$OUT/table2.md"
