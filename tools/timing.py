"""Timing helper shared by the benchmark scripts: CUDA events on a GPU, perf_counter on the CPU."""

from __future__ import annotations

import time

import torch


def time_calls(fn, warmup: int, iters: int, device: torch.device | str = "cuda") -> list[float]:
    """Seconds per call of `fn` for `iters` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    if torch.device(device).type != "cuda":
        out = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return out
    torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end) / 1e3)
    return out
