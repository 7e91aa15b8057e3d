#!/usr/bin/env bash
# The video step of this tree against an older tree's, same card, same run, with diffusers measured in the same
# run (this tree's bench_transformer.py). Usage on the GPU machine:
#   bash tools/bench_before_after.sh BASELINE_DIR 720p|t2i
# BASELINE_DIR holds the older tree (e.g. `git archive <commit> cosmos3_compiled tools tests | tar -x -C baseline`).
# Results: $OUT/{new,old}/bench_transformer_*.json; the two tables print last.
set -euo pipefail
base=$1
case ${2:-720p} in
  720p) args=(--attn cudnn --fused-qk 1 --ours cudagraph --iters 7) ;;
  t2i) args=(--attn cudnn --fused-qk 1 --height 640 --width 640 --frames 1 --text-len 128 --ours cudagraph,cudagraph_batched
             --iters 20 --warmup 5) ;;
  *) echo "second argument: 720p or t2i" >&2; exit 2 ;;
esac
out=${OUT:-bench_out}
mkdir -p "$out/new" "$out/old"
python3 tools/bench_transformer.py "${args[@]}" --diffusers eager,regional --out "$out/new" > "$out/new/log.txt" 2>&1
(cd "$base" && PYTHONPATH="$PWD:${PYTHONPATH:-}" python3 tools/bench_transformer.py "${args[@]}" --diffusers '' \
   --out "$out/old" > "$out/old/log.txt" 2>&1)
echo "== this tree"; tail -6 "$out/new/log.txt"
echo "== baseline $base"; tail -4 "$out/old/log.txt"
