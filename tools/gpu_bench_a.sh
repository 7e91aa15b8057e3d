#!/usr/bin/env bash
# GPU benchmark batch A: transformer video step (720p, 81 f) and the launch-bound T2I 640×640 step,
# ours vs diffusers in the same process on the same card. Results land in $OUT.
set -u
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a "$OUT/gpu.txt"
python3 tools/bench_transformer.py --attn cudnn --ours eager,blocks,cudagraph --diffusers eager,regional \
  --out "$OUT" 2>&1 | grep -v -i warn | tee "$OUT/t2v_720p.log" | tail -8
python3 tools/bench_transformer.py --attn cudnn --height 640 --width 640 --frames 1 --text-len 128 \
  --ours eager,blocks,cudagraph --diffusers eager,regional --kernel-sum --iters 20 --warmup 5 \
  --out "$OUT" 2>&1 | grep -v -i warn | tee "$OUT/t2i_640.log" | tail -8
