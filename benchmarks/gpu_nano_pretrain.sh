#!/usr/bin/env bash
# Nano pretraining on one GPU: four recipes of one world side by side for SECS seconds each,
# then the log of every run and its most useful checkpoints (bf16) are packed into OUT.
#
#   OUT=runs/gpu bash benchmarks/gpu_nano_pretrain.sh                 # text world, on a CUDA machine
#   WORLD=shapes OUT=runs/gpu_shapes bash benchmarks/gpu_nano_pretrain.sh
#   DEVICE=cpu SECS=60 EVAL_EVERY=20 OUT=/tmp/g bash benchmarks/gpu_nano_pretrain.sh   # smoke test
#
# Text runs: v32 = varied layout, batch 32; v128 = batch 128; q128 = batch 128 with the quote
# embedding; s128 = q128 on the simple layout (the shipped text recipe).
# Shapes runs, all batch 128: s128 = simple layout (fixed slots); v128 = varied layout;
# s128h4 = simple, 4 heads (width 256); s128p8h4 = simple, patch 8, 4 heads.
set -u
WORLD=${WORLD:-text}; DEVICE=${DEVICE:-cuda}; SECS=${SECS:-450}; EVAL_EVERY=${EVAL_EVERY:-500}; EVAL_N=${EVAL_N:-128}
OUT=${OUT:?set OUT}; RUNS=${RUNS:-/tmp/nano_gpu_runs_$WORLD}
mkdir -p "$OUT" "$RUNS"
common=(--world "$WORLD" --seed 0 --steps 100000 --device "$DEVICE" --threads 2 --eval-every "$EVAL_EVERY"
        --eval-n "$EVAL_N" --eval-n-early "$EVAL_N" --eval-start 0)
launch() {  # name, extra args...
  local name=$1; shift
  timeout -s TERM "$SECS" python -m dgpo_bench_backbones.nano.pretrain "${common[@]}" --out "$RUNS/$name" "$@" \
    >"$RUNS/$name.log" 2>&1 &
}
if [ "$WORLD" = text ]; then
  launch v32 --batch-size 32 --workers 1
  launch v128 --batch-size 128 --workers 3
  launch q128 --batch-size 128 --workers 3 --quote-max-len 16
  launch s128 --batch-size 128 --workers 3 --quote-max-len 16 --layout simple
else
  launch s128 --batch-size 128 --workers 3 --layout simple
  launch v128 --batch-size 128 --workers 3
  launch s128h4 --batch-size 128 --workers 3 --layout simple --heads 4
  launch s128p8h4 --batch-size 128 --workers 3 --layout simple --patch-size 8 --heads 4
fi
wait
python benchmarks/pack_pretrain_runs.py "$RUNS" "$OUT"
