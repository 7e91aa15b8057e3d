#!/usr/bin/env python3
"""Write the embedded default model as an official-layout (diffusers) checkpoint folder, fp32 safetensors.

Running `cosmos3-generate checkpoint=<folder>` on the result gives the same frames (same sha256) as the
embedded default with `model=<preset> model.init_seed=<seed>` and no checkpoint.

`--distilled` writes the few-step distilled checkpoints' scheduler instead (Cosmos3-Super-*-4Step: a
FlowMatchEulerDiscreteScheduler on a fixed 4-step schedule, scheduler_config.json as shipped); the same weights then
run 4 steps with guidance 1.

Example: python tools/make_tiny_checkpoint.py /tmp/cosmos3-debug --preset debug --seed 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

PRESETS = ("debug", "debug_edge")


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", type=Path, help="checkpoint folder to write (created; must be empty or absent)")
    ap.add_argument("--preset", choices=PRESETS, default="debug", help="tiny model size (default: debug)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights = model.init_seed (default: 0)")
    ap.add_argument("--distilled", action="store_true",
                    help="the distilled 4-step checkpoints' scheduler (FlowMatchEuler, fixed schedule) instead of UniPC")
    args = ap.parse_args(argv)
    if args.output.exists() and (not args.output.is_dir() or any(args.output.iterdir())):
        ap.error(f"{args.output} exists and is not an empty folder; pick a new path")

    from cosmos3_compiled.components import write_checkpoint  # noqa: E402  (after argparse: --help stays fast)

    folder = write_checkpoint(args.output, name=args.preset, seed=args.seed, distilled=args.distilled)
    kind = ", distilled 4-step scheduler" if args.distilled else ""
    print(f"wrote {args.preset} (seed {args.seed}{kind}) to {folder}")
    return folder


if __name__ == "__main__":
    main()
