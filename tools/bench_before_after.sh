#!/usr/bin/env bash
# The video step of this tree against an older tree's, same card, same run, with diffusers measured in the same
# run (this tree's bench_transformer.py). Usage on the GPU machine:
#   bash tools/bench_before_after.sh BASELINE_DIR 720p|t2i [ROUNDS]
# With ROUNDS (e.g. 2) the two trees then alternate old, new, old, new ... in fresh processes without diffusers,
# each with --kernel-sum, so an order or warm-card effect shows up as such.
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
if [ -z "${AB_ONLY:-}" ]; then  # AB_ONLY=1: only the alternating rounds
  python3 tools/bench_transformer.py "${args[@]}" --diffusers eager,regional --out "$out/new" > "$out/new/log.txt" 2>&1
  (cd "$base" && PYTHONPATH="$PWD:${PYTHONPATH:-}" python3 tools/bench_transformer.py "${args[@]}" --diffusers '' \
     --out "$out/old" > "$out/old/log.txt" 2>&1)
fi
for r in $(seq 1 "${3:-0}"); do
  (cd "$base" && PYTHONPATH="$PWD:${PYTHONPATH:-}" python3 tools/bench_transformer.py "${args[@]}" --diffusers '' \
     --kernel-sum --out "$out/old_ab$r" > "$out/old_ab$r.txt" 2>&1)
  python3 tools/bench_transformer.py "${args[@]}" --diffusers '' --kernel-sum --out "$out/new_ab$r" > "$out/new_ab$r.txt" 2>&1
done
if [ -z "${AB_ONLY:-}" ]; then
  echo "== this tree"; tail -6 "$out/new/log.txt"
  echo "== baseline $base"; tail -4 "$out/old/log.txt"
fi
for r in $(seq 1 "${3:-0}"); do
  echo "== round $r: baseline, then this tree"; tail -1 "$out/old_ab$r.txt"; tail -1 "$out/new_ab$r.txt"
done
