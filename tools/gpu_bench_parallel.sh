#!/usr/bin/env bash
# Multi-GPU batch (2 GPUs): Nano 1280×720×81, bf16, CFG 4, whole-step CUDA graph — one GPU, CFG-parallel
# and Ulysses-2, the last two with the row-parallel VAE decode; then frames vs one GPU.
#   OUT=<folder> STEPS=6 bash tools/gpu_bench_parallel.sh
set -u
export PYTHONUNBUFFERED=1
steps=${STEPS:-6}
work=${WORK:-/tmp/cosmos3_parallel}
mkdir -p "$OUT" "$work"
export TORCHINDUCTOR_CACHE_DIR="$work/inductor"
common=(experiment=nano_t2v_720p compile.offload_text_tower=false sampler.num_inference_steps=$steps
        output.frames=float32 output.video=false output.progress=false)
run() {  # name nproc overrides...
  local name=$1 n=$2; shift 2
  local t0=$(date +%s.%N)
  if [ "$n" = 1 ]; then
    python3 -m cosmos3_compiled.cli "${common[@]}" "$@" hydra.run.dir="$work/$name" > "$OUT/$name.log" 2>&1
  else
    python3 -m torch.distributed.run --nproc-per-node "$n" -m cosmos3_compiled.cli "${common[@]}" "$@" \
      hydra.run.dir="$work/$name" > "$OUT/$name.log" 2>&1
  fi
  echo "$name: rc $? in $(echo "$(date +%s.%N) - $t0" | bc) s"
  cp "$work/$name/metrics.json" "$OUT/metrics_$name.json" 2>/dev/null || tail -5 "$OUT/$name.log"
}
run one_gpu 1
run cfg 2 parallel=cfg parallel.vae_rows=true
run ulysses2 2 parallel=ulysses parallel.vae_rows=true
python3 tools/compare_runs.py "$work/one_gpu" "$work/cfg" "$work/ulysses2" --out "$OUT/parallel.md"
