#!/usr/bin/env python
"""Compare finished cosmos3-generate run folders against a reference run (e.g. multi-GPU layouts vs one GPU).

    python tools/compare_runs.py REF_DIR RUN_DIR [RUN_DIR ...] [--out table.md]

Each folder holds metrics.json (and frames.safetensors when run with output.frames=float32|uint8). One row
per folder: parallel layout, processes, first / steady denoise step, decode seconds, peak GPU memory of rank
0, max |Δ| and PSNR of the frames vs REF_DIR's, sha256. Prints a markdown table; --out also writes it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_compile_modes import frame_diff, load_frames  # noqa: E402

HEAD = ["run", "parallel", "processes", "first step s", "steady step s", "decode s", "peak GiB (rank 0)",
        "max abs vs ref", "PSNR vs ref", "sha256"]


def _layout(metrics: dict) -> tuple[str, int]:
    par = metrics.get("parallel") or {}
    if not par:
        return "none", 1
    parts = ["cfg"] if par.get("cfg") else []
    if (par.get("ulysses") or 1) > 1:
        parts.append(f"ulysses-{par['ulysses']}")
    if par.get("vae_rows"):
        parts.append("row-parallel decode")
    return " + ".join(parts) or "none", int(par.get("world_size", 1))


def _f(x, digits: int = 3) -> str:
    if x is None:
        return "—"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def row(run: Path, ref_frames) -> list[str]:
    metrics = json.loads((run / "metrics.json").read_text())
    layout, world = _layout(metrics)
    steps = metrics.get("steps") or {}
    max_abs, psnr = frame_diff(load_frames(run), ref_frames)
    psnr_s = "identical" if psnr is not None and math.isinf(psnr) else (f"{psnr:.1f} dB" if psnr is not None else "—")
    return [run.name, layout, str(world), _f(steps.get("first_s")), _f(steps.get("steady_median_s"), 4),
            _f(metrics["seconds"].get("decode"), 2), _f(metrics.get("peak_memory_gib"), 1),
            "—" if max_abs is None else f"{max_abs:.3g}", psnr_s, f"`{str(metrics.get('sha256', ''))[:16]}`"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ref", type=Path)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    missing = [str(p) for p in [args.ref, *args.runs] if not (p / "metrics.json").is_file()]
    if missing:
        print(f"error: no metrics.json in {', '.join(missing)}", file=sys.stderr)
        return 2
    ref_frames = load_frames(args.ref)
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for run in [args.ref, *args.runs]:
        lines.append("| " + " | ".join(row(run, ref_frames)) + " |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
