#!/usr/bin/env bash
# GPU batch C: end-to-end Nano 1280×720×81, 35 steps, guidance 4 (text tower offloaded, whole-step CUDA
# graph), then the launch-bound T2I 640×640 step with max-autotune kernels under our CUDA graph.
set -u
export PYTHONUNBUFFERED=1
start=$SECONDS
python3 -m cosmos3_compiled.cli experiment=nano_t2v_720p output.progress=false hydra.run.dir="$OUT/e2e" \
  2> "$OUT/e2e_stderr.txt" | tail -2
echo "process wall s: $((SECONDS - start))"
tail -3 "$OUT/e2e_stderr.txt"
python3 -c "
import json; m = json.load(open('$OUT/e2e/metrics.json'))
print({k: round(v, 2) for k, v in m['seconds'].items()}, 'peak GiB', round(m.get('peak_memory_gib', 0), 2))
print('first step', round(m['steps']['first_s'], 3), 'steady', round(m['steps']['steady_median_s'], 4), m['compile'])"
rm -f "$OUT/e2e/video.mp4"
python3 tools/bench_transformer.py --attn cudnn --height 640 --width 640 --frames 1 --text-len 128 \
  --ours "cudagraph,cudagraph:max_autotune_no_cudagraphs" --diffusers '' --kernel-sum --iters 20 --warmup 5 \
  --out "$OUT" 2>&1 | grep -v -i warn | tee "$OUT/t2i_640_autotune.log" | tail -4
