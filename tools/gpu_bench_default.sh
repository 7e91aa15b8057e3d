#!/usr/bin/env bash
# The plain command on one GPU: a Nano-size checkpoint written by tools/make_nano_checkpoint.py, then
# `cosmos3-generate checkpoint=<it> prompt=...` with no other overrides (the reference's 1280x720x189, 35 steps,
# CFG 6; every `auto` resolved on this machine), in a fresh process. Results under $OUT (metrics.json, logs).
# Usage on the device: bash tools/gpu_bench_default.sh [RUNS]   (RUNS fresh processes, the first one cold)
#   SWEEP=1 bash tools/gpu_bench_default.sh 1 run2: one fresh process running the plain command as a two-job
#   sweep (`-m seed=0,1`): job 0 is a cold process (warm compile cache if an earlier run left one), job 1 the
#   next request of a process that already holds the models.
#   EXTRA="num_frames=81": overrides added to the plain command.
#   DROP_CACHES=1: ask the kernel to drop the page cache first (needs root), so the load reads the disk.
set -u
OUT=${OUT:-/tmp/out}; RUNS=${1:-1}; CKPT=${CKPT:-/tmp/cosmos3-nano}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch, huggingface_hub; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'hub', huggingface_hub.__version__)"
  df -h /tmp | tail -1; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
if [ ! -f "$CKPT/model_index.json" ]; then
  /usr/bin/time -f "make_nano_checkpoint %e s wall" python tools/make_nano_checkpoint.py "$CKPT" --device cuda \
    > "$OUT/make_checkpoint.log" 2>&1; tail -3 "$OUT/make_checkpoint.log"
fi
du -sb "$CKPT/transformer" | tee -a "$OUT/machine.txt"
SWEEP=${SWEEP:-0}; TAG=${TAG:-run}
for i in $(seq 1 "$RUNS"); do
  if [ "${DROP_CACHES:-0}" = 1 ]; then
    sync; (echo 3 > /proc/sys/vm/drop_caches) 2> /dev/null && echo "page cache dropped" || echo "page cache NOT dropped (no permission)"
  fi
  mkdir -p "$OUT/$TAG$i" && cd "$OUT/$TAG$i" || exit 1
  if [ "$SWEEP" = 1 ]; then set -- -m seed=0,1 hydra.sweep.dir=sweep; else set --; fi
  set -- "$@" ${EXTRA:-}  # EXTRA="num_frames=81": overrides added to the plain command (word-split)
  launch=$(date +%s.%N)
  /usr/bin/time -f "$TAG$i %e s wall" python -m cosmos3_compiled.cli "$@" checkpoint="$CKPT" \
    prompt="A red fox trots through fresh snow at dawn, steam rising from its breath." > log.txt 2>&1
  ended=$(date +%s.%N)
  tail -c 1500 log.txt | tr '\r' '\n' | tail -6
  # launch → each video.mp4 complete (its mtime: written under a temporary name, renamed when whole), and the
  # process exit after the last one
  for v in $(find . -name video.mp4 | sort); do
    python3 -c "import sys; l, m, e = map(float, sys.argv[2:]); print(f'{sys.argv[1]}: launch to video {m - l:.2f} s, then {e - m:.2f} s to exit')" \
      "$v" "$launch" "$(stat -c %.9Y "$v")" "$ended" | tee -a timeline.txt
  done
  cd - > /dev/null
  find "$OUT/$TAG$i" -name video.mp4 -size +1M -delete
  for f in $(find "$OUT/$TAG$i" -name metrics.json | sort); do echo "== $f"; python - "$f" <<'PY'
import json, sys
m = json.load(open(sys.argv[1]))
s = m["seconds"]; st = m.get("steps", {})
print({k: round(v, 2) for k, v in s.items()})
print("auto:", json.dumps(m.get("auto"), indent=1))
print("read:", m.get("transformer_read"), "peak GiB:", m.get("peak_memory_gib"), "compile:", m.get("compile"))
print("steps:", {k: v for k, v in st.items() if not isinstance(v, list)})
print("decode_warmup:", m.get("decode_warmup"))
PY
  done
done
