#!/usr/bin/env bash
# GPU batch: FlashAttention-4 (flash-attn-4, optional) against cuDNN SDPA — attention alone at the Nano 720p
# shape, the 720p video step with diffusers in the same process, and the launch-bound T2I 640×640 step,
# each with and without the fused q/k-norm + RoPE + K/V-write Triton kernel (--fused-qk).
# Needs flash-attn-4 importable (see docs/benchmarks for how it was carried to the lent machine). Results in $OUT.
#   bash tools/gpu_bench_fa4.sh [720p|t2i|all]
set -u
export PYTHONUNBUFFERED=1
part=${1:-all}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, importlib.metadata as m; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'flash-attn-4', m.version('flash-attn-4'), 'nvidia-cutlass-dsl-libs-cu13', m.version('nvidia-cutlass-dsl-libs-cu13'))" 2>&1 | tee -a "$OUT/gpu.txt"
if [ "$part" != t2i ]; then
  python3 tools/bench_sdpa.py --fa4 2>&1 | grep -v -i warn | tee "$OUT/sdpa_720p.log" | grep -i -E "cudnn|fa4"
  python3 tools/bench_transformer.py --attn cudnn,fa4 --fused-qk 0,1 --ours eager,cudagraph \
    --diffusers eager,regional --profile --out "$OUT" 2>&1 | grep -v -i -E "warn|generate_mlir" | tee "$OUT/t2v_720p.log" | tail -12
fi
if [ "$part" != 720p ]; then
  python3 tools/bench_transformer.py --attn cudnn,fa4 --fused-qk 0,1 --height 640 --width 640 --frames 1 --text-len 128 \
    --ours eager,cudagraph,cudagraph_batched --diffusers '' --kernel-sum --iters 20 --warmup 5 --out "$OUT" 2>&1 \
    | grep -v -i -E "warn|generate_mlir" | tee "$OUT/t2i_640.log" | tail -14
fi
