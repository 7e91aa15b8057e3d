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
  local t0=$SECONDS
  if [ "$n" = 1 ]; then
    python3 -m cosmos3_compiled.cli "${common[@]}" "$@" hydra.run.dir="$work/$name" > "$OUT/$name.log" 2>&1
  else
    python3 -m torch.distributed.run --nproc-per-node "$n" -m cosmos3_compiled.cli "${common[@]}" "$@" \
      hydra.run.dir="$work/$name" > "$OUT/$name.log" 2>&1
  fi
  local rc=$?
  echo "$name: rc $rc in $((SECONDS - t0)) s (process wall, incl. start-up and the float frames' write)"
  cp "$work/$name/metrics.json" "$OUT/metrics_$name.json" 2>/dev/null || { grep -v -i warn "$OUT/$name.log" | tail -8; }
  return $rc
}
runs=()
run one_gpu 1 && runs+=("$work/one_gpu")
# the whole-step CUDA graph with the collectives inside it; if capture fails, the same with compile=default
for layout in "cfg parallel=cfg" "ulysses2 parallel=ulysses"; do
  set -- $layout
  if run "$1" 2 "$2" parallel.vae_rows=true; then runs+=("$work/$1")
  elif run "$1_default" 2 "$2" parallel.vae_rows=true compile=default; then runs+=("$work/$1_default"); fi
done
python3 tools/compare_runs.py "${runs[@]}" --out "$OUT/parallel.md"
