#!/usr/bin/env bash
# GPU benchmark batch B: cold vs warm compile of the video step (two processes sharing an inductor
# cache dir) and the Wan2.2 VAE decode (ours vs diffusers). Results land in $OUT.
set -u
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=/tmp/cosmos3_cache_$$
for run in cold warm; do
  python3 tools/bench_transformer.py --attn cudnn --ours blocks --diffusers '' --iters 2 --warmup 0 \
    --out "$OUT/compile_$run" 2>&1 | grep -E "^\| ours" | sed "s/^/$run: /" | tee -a "$OUT/compile_warm.log"
done
python3 tools/bench_vae.py --out "$OUT" 2>&1 | grep -v -i warn | tee "$OUT/vae.log" | tail -12
