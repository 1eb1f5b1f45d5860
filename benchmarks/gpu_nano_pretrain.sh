#!/usr/bin/env bash
# Nano text-world pretraining on one GPU: four recipes side by side for SECS seconds each,
# then the log of every run and its most useful checkpoints (bf16) are packed into OUT.
#
#   OUT=runs/gpu bash benchmarks/gpu_nano_pretrain.sh            # on a CUDA machine
#   DEVICE=cpu SECS=60 EVAL_EVERY=20 OUT=/tmp/g bash benchmarks/gpu_nano_pretrain.sh   # smoke test
#
# Runs: v32 = the shipped recipe (varied layout, batch 32); v128 = batch 128;
# q128 = batch 128 with the quote embedding; s128 = q128 on the simple layout.
set -u
DEVICE=${DEVICE:-cuda}; SECS=${SECS:-450}; EVAL_EVERY=${EVAL_EVERY:-500}; EVAL_N=${EVAL_N:-128}
OUT=${OUT:?set OUT}; RUNS=${RUNS:-/tmp/nano_gpu_runs}
mkdir -p "$OUT" "$RUNS"
common=(--world text --seed 0 --steps 100000 --device "$DEVICE" --threads 2 --eval-every "$EVAL_EVERY"
        --eval-n "$EVAL_N" --eval-n-early "$EVAL_N")
launch() {  # name, extra args...
  local name=$1; shift
  timeout -s TERM "$SECS" python -m dgpo_bench_backbones.nano.pretrain "${common[@]}" --out "$RUNS/$name" "$@" \
    >"$RUNS/$name.log" 2>&1 &
}
launch v32 --batch-size 32 --workers 1
launch v128 --batch-size 128 --workers 3
launch q128 --batch-size 128 --workers 3 --quote-max-len 16
launch s128 --batch-size 128 --workers 3 --quote-max-len 16 --text-layout simple
wait
python benchmarks/pack_pretrain_runs.py "$RUNS" "$OUT"
