#!/usr/bin/env bash
# GPU batch: end to end, Nano 1280×720×81, 35 steps, guidance 4, text tower offloaded and page-locked,
# whole-step CUDA graph, compiled VAE — as a two-job Hydra sweep in ONE process: job 0 loads and compiles
# (cold process), job 1 is the next request served by the same process (`keep_loaded`: models resident).
#   bash tools/gpu_bench_e2e.sh [cudnn|fa4] [extra overrides...]     (results in $OUT/e2e_<backend>/)
# The per-request run of docs/benchmarks (Nano section 4):
#   bash tools/gpu_bench_e2e.sh fa4 seed=0,1,2 output.preset=faster
set -u
export PYTHONUNBUFFERED=1
backend=${1:-cudnn}
shift || true
dir="$OUT/e2e_$backend"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__)"
start=$SECONDS
python3 -m cosmos3_compiled.cli -m experiment=nano_t2v_720p model.attention_backend="$backend" \
  compile.vae=default compile.pin_text_tower=true compile.cache_dir=/tmp/c3cache output.progress=false \
  seed=0,1 "$@" hydra.sweep.dir="$dir" > "$dir.stdout.txt" 2> "$dir.stderr.txt"
echo "process rc $? wall s: $((SECONDS - start))"
grep -E "page-locked|shape bucket|sha256" "$dir.stderr.txt" "$dir.stdout.txt" | cut -c1-200
tail -3 "$dir.stderr.txt"
rm -f "$dir"/*/video.mp4
python3 - "$dir" <<'PY'
import json, sys
from pathlib import Path
jobs = {job.name: json.loads((job / "metrics.json").read_text()) for job in sorted(Path(sys.argv[1]).glob("[0-9]*"))}
Path(sys.argv[1] + ".jobs.json").write_text(json.dumps(jobs, indent=1) + "\n")  # every job's metrics in one file
for name, m in jobs.items():
    job = Path(name)
    s = m["seconds"]
    other = s["total"] - sum(v for k, v in s.items() if k != "total")
    print(f"job {job.name} ({m['models']}): " + ", ".join(f"{k} {v:.2f}" for k, v in s.items()),
          f"| unaccounted {other:.2f} | first step {m['steps']['first_s']:.3f} steady {m['steps']['steady_median_s']:.4f}"
          f" | encoder {m.get('video_encoder')} | at start {m.get('memory_gib_at_start', 0):.3f} GiB | peak {m.get('peak_memory_gib', 0):.2f} GiB | {m['compile']}")
PY
