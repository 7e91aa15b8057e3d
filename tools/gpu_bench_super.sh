#!/usr/bin/env bash
# Cosmos3 Super size (random weights, `model=super`, no checkpoint) on one GPU with room for its 64 GB video tower
# (an H200): the text tower stays in host memory (page-locked), whole-step CUDA graph, compiled VAE, each run a
# fresh process. Results under $OUT (<run>/metrics.json, <run>/log.txt, a summary line per run).
#   PART=cfg  bash tools/gpu_bench_super.sh   the 35-step model's step (CFG 6) at 720p x 81, STEPS steps (default 4)
#   PART=t2i  bash tools/gpu_bench_super.sh   the 4-step distilled schedule (model.distilled=true), T2I 1024 x 1024
#   PART=i2v  bash tools/gpu_bench_super.sh   the same, I2V at 720p x 189 (an image made here)
#   PART=cfg189 bash tools/gpu_bench_super.sh the CFG step at 720p x 189 (STEPS steps)
# PART takes a comma list, run in order.
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; STEPS=${STEPS:-4}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee -a "$OUT/machine.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/machine.txt"
grep -E "MemTotal|MemAvailable" /proc/meminfo | tr -s ' ' | tee -a "$OUT/machine.txt"
COMMON=(model=super device=cuda dtype=bfloat16 compile=cudagraph compile.vae=default compile.offload_text_tower=true
        compile.pin_text_tower=true output.progress=false
        prompt="A lighthouse on a rocky coast at dusk, waves breaking below, gulls circling the lamp.")
run() {  # run NAME OVERRIDES...
  local name=$1; shift
  mkdir -p "$OUT/$name"
  local t0=$(date +%s.%N)
  timeout "${RUN_TIMEOUT:-400}" python -m cosmos3_compiled.cli "${COMMON[@]}" "$@" output.dir="$OUT/$name" > "$OUT/$name/log.txt" 2>&1
  local rc=$? t1=$(date +%s.%N)
  rm -f "$OUT/$name/video.mp4"
  python - "$OUT/$name" "$rc" "$t0" "$t1" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
from pathlib import Path
folder, rc, t0, t1 = Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
try:
    m = json.loads((folder / "metrics.json").read_text())
except OSError:
    tail = (folder / "log.txt").read_text(errors="replace").strip().splitlines()[-3:]
    print(f"{folder.name}: rc {rc}, {t1 - t0:.1f} s, no metrics.json: {' | '.join(tail)}")
    raise SystemExit
s, st = m["seconds"], m.get("steps", {})
print(f"{folder.name}: rc {rc}, process {t1 - t0:.1f} s; seconds {json.dumps({k: round(v, 2) for k, v in s.items()})}; "
      f"steps {json.dumps({k: v for k, v in st.items() if not isinstance(v, list)})}; "
      f"peak GiB {m.get('peak_memory_gib')}; compile {json.dumps(m.get('compile'))}")
PY
}
IFS=, read -ra parts <<< "${PART:-cfg,t2i}"
for part in "${parts[@]}"; do
  case $part in
    cfg) run super_cfg_81 num_frames=81 sampler.num_inference_steps="$STEPS" ;;
    cfg189) run super_cfg_189 num_frames=189 sampler.num_inference_steps="$STEPS" ;;
    t2i) run super_4step_t2i model.distilled=true num_frames=1 height=1024 width=1024 ;;
    i2v)
      python -c "
from PIL import Image
import numpy as np
y, x = np.mgrid[0:720, 0:1280]
rgb = np.stack([(x * 255 // 1279), (y * 255 // 719), ((x + y) % 256)], -1).astype(np.uint8)
Image.fromarray(rgb).save('/tmp/super_i2v.png')"
      run super_4step_i2v model.distilled=true num_frames=189 image=/tmp/super_i2v.png ;;
    *) echo "unknown PART $part"; exit 2 ;;
  esac
done
