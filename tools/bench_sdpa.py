#!/usr/bin/env python3
"""Micro-benchmark of SDPA at the Nano video-step shape: backends x K/V layout x GQA handling.

Example: python tools/bench_sdpa.py --n 19320 --text 256
"""

import argparse
import statistics

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from timing import time_calls  # noqa: E402


def bench(fn, iters=10):
    return statistics.median(time_calls(fn, warmup=3, iters=iters))


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=19320)
    ap.add_argument("--text", type=int, default=256)
    ap.add_argument("--hq", type=int, default=32)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--fa4", action="store_true", help="also time FlashAttention-4 (needs flash-attn-4)")
    args = ap.parse_args()
    n, m, hq, hkv, d = args.n, args.n + args.text, args.hq, args.hkv, args.d
    flop = 4 * n * m * hq * d
    dev, dt = "cuda", torch.bfloat16
    q_tok = torch.randn(n, hq, d, device=dev, dtype=dt)
    k_tok = torch.randn(m, hkv, d, device=dev, dtype=dt)
    v_tok = torch.randn(m, hkv, d, device=dev, dtype=dt)
    layouts = {
        "token-major (BSHD view)": (q_tok.transpose(0, 1)[None], k_tok.transpose(0, 1)[None], v_tok.transpose(0, 1)[None]),
        "head-major (BHSD contiguous)": (q_tok.transpose(0, 1).contiguous()[None], k_tok.transpose(0, 1).contiguous()[None],
                                         v_tok.transpose(0, 1).contiguous()[None]),
    }
    print("| backend | layout | gqa | ms | TFLOP/s |\n|---|---|---|---|---|")
    for bname in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
        for lname, (q, k, v) in layouts.items():
            for gqa in ("native", "expanded", "folded"):
                qq, kk, vv = q, k, v
                if gqa == "expanded":
                    kk, vv = k.repeat_interleave(hq // hkv, 1), v.repeat_interleave(hq // hkv, 1)
                elif gqa == "folded":  # query heads sharing a KV head end to end: [1, Hkv, groups·N, D] (copy if strided)
                    qq = q.reshape(1, hkv, (hq // hkv) * n, d)
                try:
                    with sdpa_kernel(getattr(SDPBackend, bname)):
                        t = bench(lambda: F.scaled_dot_product_attention(qq, kk, vv, enable_gqa=gqa == "native"))
                    print(f"| {bname} | {lname} | {gqa} | {t*1e3:.2f} | {flop / t / 1e12:.0f} |")
                except RuntimeError as err:
                    print(f"| {bname} | {lname} | {gqa} | failed: {str(err)[:60]} | |")
    if args.fa4:  # FlashAttention-4 kernels (optional package), native GQA, fed the same storage as views
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        from cosmos3_compiled.attention import check_backend, fa4_attention

        check_backend("fa4", torch.device(dev), dt)
        ref = None
        for lname, (q, k, v) in layouts.items():
            qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))  # [1, L, H, D] views
            t = bench(lambda: fa4_attention(qt, kt, vt, False))
            out = fa4_attention(qt, kt, vt, False).transpose(1, 2)
            if ref is None:
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
            err = (out.float() - ref.float()).abs().max().item()
            print(f"| FA4 (flash-attn-4) | {lname} | native | {t*1e3:.2f} | {flop / t / 1e12:.0f} | max abs vs cuDNN {err:.2e}")


if __name__ == "__main__":
    main()
