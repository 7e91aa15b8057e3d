#!/usr/bin/env bash
# GPU benchmark batch A: transformer video step (720p, 81 f) and the launch-bound T2I 640×640 step,
# ours (native and folded GQA) vs diffusers in the same process on the same card. Results land in $OUT.
#   bash tools/gpu_bench_a.sh [720p|t2i|all]
set -u
export PYTHONUNBUFFERED=1
part=${1:-all}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"
if [ "$part" != t2i ]; then
  python3 tools/bench_sdpa.py 2>&1 | tee "$OUT/sdpa_720p.log" | grep -i cudnn
  python3 tools/bench_transformer.py --attn cudnn --ours eager,blocks,cudagraph --gqa native,fold \
    --diffusers eager,regional --profile --out "$OUT" 2>&1 | grep -v -i warn | tee "$OUT/t2v_720p.log" | tail -40
fi
if [ "$part" != 720p ]; then
  python3 tools/bench_transformer.py --attn cudnn --height 640 --width 640 --frames 1 --text-len 128 \
    --ours eager,blocks,cudagraph,cudagraph_batched --gqa native,fold --diffusers eager,regional --kernel-sum \
    --iters 20 --warmup 5 --out "$OUT" 2>&1 | grep -v -i warn | tee "$OUT/t2i_640.log" | tail -12
fi
