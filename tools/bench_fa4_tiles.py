#!/usr/bin/env python3
"""FlashAttention-4's sm90 forward at the Nano 720p video-attention shape, per tile configuration.

flash-attn-4 picks 128x128 tiles (register-sourced P@V, intra-warpgroup overlap) for head_dim 128 on Hopper;
its C++ FA3 ancestor uses 128x176 for non-causal head_dim 128. This times the kernel over a grid of
(tile_m, tile_n, mma_pv_is_rs, intra_wg_overlap, pack_gqa) through the package's `_flash_attn_fwd`, at the
shape one video step runs 36 times per branch (q [1, 19320, 32, 128], k/v [1, 19576, 8, 128], bf16,
token-major), and checks each output against the default configuration's.

GPU (sm90):  python tools/bench_fa4_tiles.py [--configs default,128x160,128x176:noov ...] [--iters 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import time_back_to_back  # noqa: E402

DEFAULT_CONFIGS = ("default,128x128,128x144,128x160,128x176,128x192,128x176:nors,128x176:noov,128x128:nopack,"
                   "128x176:nopack,192x128,192x112:nors,64x256")


def parse(name: str) -> dict:
    """'128x176[:nors][:noov][:nopack]' → keyword arguments of _flash_attn_fwd ('default': none)."""
    if name == "default":
        return {}
    tile, *flags = name.split(":")
    m, n = (int(v) for v in tile.split("x"))
    kw = {"tile_mn": (m, n), "mma_pv_is_rs": "nors" not in flags, "intra_wg_overlap": "noov" not in flags}
    if "nopack" in flags:
        kw["pack_gqa"] = False
    return kw


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--video", type=int, default=19320)
    ap.add_argument("--text", type=int, default=256)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleave: every round times every config once, so clock drift hits all of them alike")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from flash_attn.cute.interface import _flash_attn_fwd

    out_dir = Path(args.out or os.environ.get("OUT") or tempfile.mkdtemp())
    out_dir.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    n, m = args.video, args.video + args.text
    q = torch.randn((1, n, 32, 128), generator=gen, device="cuda", dtype=torch.bfloat16)
    k = torch.randn((1, m, 8, 128), generator=gen, device="cuda", dtype=torch.bfloat16)
    v = torch.randn((1, m, 8, 128), generator=gen, device="cuda", dtype=torch.bfloat16)
    tflop = 4 * n * m * 32 * 128 / 1e12
    reference = None
    calls, errors, diffs = {}, {}, {}
    with torch.no_grad():
        for name in args.configs.split(","):
            kw = parse(name)
            call = lambda kw=kw: _flash_attn_fwd(q, k, v, **kw)[0]  # noqa: E731
            try:
                out = call()  # JIT-compiles this configuration
            except Exception as err:  # a tile the kernel cannot build (shared memory, registers, asserts)
                errors[name] = f"{type(err).__name__}: {str(err)[:160]}"
                print(name, "failed:", errors[name], flush=True)
                continue
            if reference is None:
                reference = out.float()
            diffs[name] = (out.float() - reference).abs().max().item()
            calls[name] = call
        medians = {name: [] for name in calls}
        for _ in range(args.rounds):
            for name, call in calls.items():
                medians[name].append(statistics.median(time_back_to_back(call, 2, args.iters)))
    rows = []
    for name in args.configs.split(","):
        if name in errors:
            rows.append({"config": name, "error": errors[name]})
        elif name in calls:
            secs = statistics.median(medians[name])
            rows.append({"config": name, "ms": secs * 1e3, "tflops": tflop / secs, "round_ms": [t * 1e3 for t in medians[name]],
                         "max_abs_vs_first": diffs[name]})
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "video": n, "keys": m,
              "tflop": tflop, "rows": rows}
    (out_dir / "bench_fa4_tiles.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['device']}, torch {torch.__version__}; q [1,{n},32,128], k/v [1,{m},8,128] bf16, {tflop:.3f} TFLOP")
    print("| config | ms, median of rounds (each round) | TFLOP/s | max abs vs first row |")
    print("|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['config']} | failed: {r['error'][:60]} | | |")
        else:
            rounds = " / ".join(f"{t:.2f}" for t in r["round_ms"])
            print(f"| {r['config']} | {r['ms']:.3f} ({rounds}) | {r['tflops']:.0f} | {r['max_abs_vs_first']:.2e} |")


if __name__ == "__main__":
    main()
