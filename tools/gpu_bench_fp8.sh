#!/usr/bin/env bash
# FP8 on one GPU, in one go: a Nano-size FP8 checkpoint with random weights in NVIDIA's ModelOpt format
# (tools/make_nano_checkpoint.py --fp8), the video step at 720p x 81 and 720p x 189 in each regime against our bf16
# step of the same weights, PSNR of the FP8 velocity, the _scaled_mm ceiling at Nano GEMM shapes
# (tools/bench_fp8.py), then the plain command at the reference's 1280x720x189 with the shipped policy, in a fresh
# process. A short table last. Results under $OUT (bench_fp8.json, e2e/…/metrics.json, logs).
# Usage on the device: bash tools/gpu_bench_fp8.sh     (CKPT=/tmp/cosmos3-nano-fp8, OUT=/tmp/out by default)
#   PART=bench or PART=e2e runs one half (the checkpoint is written first either way when missing). The plain
#   command runs in /tmp/fp8_e2e; its metrics.json and the tail of its log are copied to $OUT (the device tool
#   returns files at most two folders deep).
set -u
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; CKPT=${CKPT:-/tmp/cosmos3-nano-fp8}; PART=${PART:-bench,e2e}
E2E=${E2E:-/tmp/fp8_e2e}
SHAPES=${SHAPES:-720x1280x81,720x1280x189}; ITERS=${ITERS:-3}
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  df -h /tmp | tail -1; } > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
if [ ! -f "$CKPT/model_index.json" ]; then
  /usr/bin/time -f "make_nano_checkpoint --fp8 %e s wall" timeout 240 python tools/make_nano_checkpoint.py "$CKPT" \
    --device cuda --fp8 > "$OUT/make_checkpoint.log" 2>&1; tail -3 "$OUT/make_checkpoint.log"
fi
du -sb "$CKPT/transformer" | tee -a "$OUT/machine.txt"
if [[ ",$PART," == *,bench,* ]]; then
  /usr/bin/time -f "bench_fp8 %e s wall" timeout "${BENCH_TIMEOUT:-240}" python tools/bench_fp8.py --checkpoint "$CKPT" \
    --shapes "$SHAPES" --iters "$ITERS" --out "$OUT" > "$OUT/bench_fp8.log" 2>&1
  tail -c 4000 "$OUT/bench_fp8.log"
fi
if [[ ",$PART," == *,e2e,* ]]; then
  mkdir -p "$E2E" && cd "$E2E" || exit 1
  /usr/bin/time -f "e2e %e s wall" timeout "${E2E_TIMEOUT:-300}" python -m cosmos3_compiled.cli checkpoint="$CKPT" \
    prompt="A red fox trots through fresh snow at dawn, steam rising from its breath." > log.txt 2>&1
  tail -c 1500 log.txt | tr '\r' '\n' | tail -6
  tail -c 20000 log.txt > "$OUT/e2e_log.txt"
  found=$(ls outputs/*/*/metrics.json 2>/dev/null | head -1)
  [ -n "$found" ] && cp "$found" "$OUT/e2e_metrics.json"
  cd - > /dev/null
fi
python - "$OUT" <<'PY'
import glob, json, sys
out = sys.argv[1]
rows = []
try:
    bench = json.load(open(f"{out}/bench_fp8.json"))
    print(f"\n{bench['device']}; weights GiB {bench['weights_gib']}")
    print("| shape | step | median s | vs bf16 | PSNR dB | peak GiB |\n|---|---|---|---|---|---|")
    for r in bench["steps"]:
        print(f"| {r['shape']} | {r['config']} | {r['median_s']:.3f} | {r.get('speedup_vs_bf16', 1):.2f}x | "
              f"{r.get('psnr_vs_bf16_db', float('inf')):.1f} | {r.get('peak_gib', float('nan')):.1f} |")
    g = {(x["gemm"], x["impl"]): x for x in bench["gemms"] if x["M"] == 19320}
    print("| GEMM M=19320 | bf16 TFLOP/s | _scaled_mm ceiling | our W8A8 linear | our W8A16 linear |\n|---|---|---|---|---|")
    for name in ("qkv", "out", "gate_up", "down"):
        cells = [g.get((name, k), {}).get("tflops", float("nan")) for k in (
            "bf16 F.linear", "_scaled_mm fp8 (ceiling)", "Fp8Linear W8A8 (compiled: input quantization + _scaled_mm)",
            "Fp8Linear W8A16 (compiled: dequantisation + GEMM)")]
        print(f"| {name} | " + " | ".join(f"{c:.0f}" for c in cells) + " |")
except (OSError, KeyError, ValueError) as err:
    print("bench_fp8: no results", err)
found = glob.glob(f"{out}/e2e_metrics.json")
if not found:
    print("e2e: no metrics.json (see e2e_log.txt)")
else:
    m = json.load(open(found[0]))
    s, st = m["seconds"], m.get("steps", {})
    print(f"\ne2e 1280x720x189 shipped policy: total {s.get('total', float('nan')):.1f} s "
          f"(load {s.get('load', 0):.1f}, denoise {s.get('denoise', 0):.1f}, decode {s.get('decode', 0):.1f}); "
          f"step median by regime {st.get('steady_median_s_by_regime')}; first step {st.get('first_s', 0):.1f} s; "
          f"text passes at {st.get('text_pass_steps')}; peak {m.get('peak_memory_gib', float('nan')):.1f} GiB; "
          f"compile {m.get('compile')}")
PY
