"""Timing helpers shared by the benchmark scripts: CUDA events on a GPU, perf_counter on the CPU, and the
profiler's GPU kernel times."""

from __future__ import annotations

import time

import torch


def graph_or_eager(graph, static_out, fn):
    """The benchmarked step as a no-argument call: replay `graph` (a captured CUDA graph) and return its static
    output tensor, or, when nothing was captured (`graph` None: eager, compiled, or a CPU run), call `fn`."""
    if graph is None:
        return fn

    def call():
        graph.replay()
        return static_out
    return call


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


def time_back_to_back(fn, warmup: int, iters: int, device: torch.device | str = "cuda") -> list[float]:
    """Seconds per call of `fn` when calls are queued one after another with no host sync in between, as the
    denoise loop runs its steps: an event after every call, all read after the last one. `time_calls` waits for
    each call instead, so each of its times also holds the launch latency of a GPU that went idle."""
    for _ in range(warmup):
        fn()
    if torch.device(device).type != "cuda":
        return time_calls(fn, 0, iters, device)
    torch.cuda.synchronize()
    events = [torch.cuda.Event(enable_timing=True) for _ in range(iters + 1)]
    events[0].record()
    for i in range(iters):
        fn()
        events[i + 1].record()
    events[-1].synchronize()
    return [a.elapsed_time(b) / 1e3 for a, b in zip(events, events[1:])]


def gpu_kernels(fn, iters: int = 1) -> list[tuple[str, float]]:
    """(name, seconds) of every GPU activity (kernels, memcpy, memset) the profiler records over `iters` calls
    of `fn`; CUPTI also sees kernels replayed from a CUDA graph."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return _gpu_activities(prof)


def profiled_back_to_back(fn, iters: int) -> tuple[list[float], list[tuple[str, float]]]:
    """Per-call seconds of `iters` back-to-back calls and the GPU activities of those same calls, both taken in
    one profiled loop, so a wall ÷ kernel-time ratio is not skewed by the GPU clocking differently between a
    timing loop and a separate profiling burst."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        times = time_back_to_back(fn, 0, iters)
    return times, _gpu_activities(prof)


def _gpu_activities(prof) -> list[tuple[str, float]]:
    """(name, seconds) of every GPU activity a finished profiler recorded."""
    return [
        (e.name, (e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total) / 1e6)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    ]
