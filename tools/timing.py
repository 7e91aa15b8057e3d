"""Timing helpers shared by the benchmark scripts: CUDA events on a GPU, perf_counter on the CPU, and the
profiler's GPU kernel times."""

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


def gpu_kernels(fn, iters: int = 1) -> list[tuple[str, float]]:
    """(name, seconds) of every GPU activity (kernels, memcpy, memset) the profiler records over `iters` calls
    of `fn`; CUPTI also sees kernels replayed from a CUDA graph."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return [
        (e.name, (e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total) / 1e6)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    ]
