#!/usr/bin/env python3
"""Benchmark the Wan2.2 VAE decode: ours (eager / compiled chunk body, optional channels_last_3d) against
diffusers' AutoencoderKLWan with the same random weights, in the same run on the same card.

Real Wan2.2 sizes (base 160, decoder 256, z 48) with random weights (meta → to_empty → small random
fill); default latent [1, 48, 21, 45, 80] → video [1, 3, 81, 720, 1280], bf16. Reports the median decode
time (CUDA events), peak extra memory (max_memory_allocated minus what was allocated before the call,
including the output video), achieved TFLOP/s, and PSNR / max-abs against diffusers and against our
eager decode. Full results go to JSON + a markdown report under $OUT (or --out); the table prints last.

GPU:    python tools/bench_vae.py
        python tools/bench_vae.py --no-diffusers --ours compiled_cl --memory-trace compiled_cl --cudnn-benchmark 0
        python tools/bench_vae.py --truth --ours eager_cl,eager_cl_t2,compiled_cl_exact,compiled_cl_exact_t2
                                                   (+ PSNR against an fp32 decode; tile-major in 2 strips)
        python tools/bench_vae.py --no-diffusers --ours compiled_cl_exact_t2 --profile compiled_cl_exact_t2
                                                   (+ GPU kernel time by kind: convolutions vs the rest)
Smoke:  python tools/bench_vae.py --smoke          (tiny widths on the CPU, checks the script end to end)

Memory floor: the causal histories and the output video (sizes in the report, measured ones in
docs/benchmarks/) are live at every peak; the rest is the working set of one output frame plus whatever
workspace cuDNN's chosen algorithms take (`--memory-trace` shows it; `--cudnn-benchmark 0`
lets cuDNN's heuristics choose instead of the fastest-measured algorithm).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cosmos3_compiled.checkpoint_io import assign_strict  # noqa: E402
from cosmos3_compiled.compile import apply_compile_vae  # noqa: E402
from cosmos3_compiled.progress import set_progress_enabled  # noqa: E402
from cosmos3_compiled.vae import VAEConfig, WanVAE, build_vae, wan22_config  # noqa: E402
from timing import gpu_kernels  # noqa: E402  (tools/, this script's folder)

WAN22 = wan22_config()
# A mode is `eager` or `compiled`, plus any of: `_cl` (channels_last_3d), `_autotune` (compiled with max-autotune-no-cudagraphs), `_exact` (compiled with inductor's
# emulate_precision_casts: intermediates rounded to bf16 where eager rounds them), `_t<N>` (tile-major decode
# in N column strips, WanVAE.tiles; its eager reference is the eager mode with the same strips when run).
MODE_FLAGS = ("cl", "autotune", "exact")


def tile_flag(flags) -> str | None:
    """The `t<N>` flag (tile-major decode in N column strips) among a mode's flags, if any."""
    return next((f for f in flags if f[:1] == "t" and f[1:].isdigit()), None)


def parse_mode(mode: str) -> tuple[str, set[str]]:
    base, *flags = mode.split("_")
    compiled_only = set(flags) & {"autotune", "exact"}
    known = set(MODE_FLAGS) | {tile_flag(flags)}
    if base not in ("eager", "compiled") or not set(flags) <= known or (compiled_only and base != "compiled"):
        sys.exit(f"bad --ours mode {mode!r}: eager|compiled + any of _cl, _t<N> "
                 "(_autotune, _exact when compiled)")
    return base, set(flags)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def random_weights(cfg: dict, device: torch.device, dtype: torch.dtype, seed: int):
    """diffusers' VAE built on meta, materialised with to_empty, filled with fan-in-scaled random values."""
    from diffusers import AutoencoderKLWan

    with torch.device("meta"):
        ref = AutoencoderKLWan(**cfg)
    ref = ref.to_empty(device=device).to(dtype).eval().requires_grad_(False)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen, device=device))
            elif name.endswith("bias"):
                p.copy_(0.01 * torch.randn(p.shape, generator=gen, device=device))
            else:
                fan_in = p[0].numel()
                p.copy_(torch.randn(p.shape, generator=gen, device=device) / math.sqrt(fan_in))
    return ref


def ours_from(ref, cfg: dict, dtype: torch.dtype, channels_last: bool) -> WanVAE:
    """Our decoder-only VAE sharing the reference's tensors (assign, no copy) except where re-laid out."""
    vae = build_vae(VAEConfig.from_dict(cfg), with_encoder=False)
    state = ref.state_dict()
    ignore = frozenset(k for k in state if k.startswith(("encoder.", "quant_conv.")))
    assign_strict(vae, state, dtype, ignore=ignore, where="random weights")
    vae.eval().requires_grad_(False)
    return vae.apply_channels_last_3d() if channels_last else vae


def decoder_flops(vae_cfg: dict, latent_shape: tuple[int, ...], dtype: torch.dtype) -> tuple[float, float]:
    """(FLOPs of one decode, bytes of the causal histories carried between chunks), on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    vae = build_vae(VAEConfig.from_dict(vae_cfg), with_encoder=False).to(dtype)
    b, c, t, h, w = latent_shape
    x = torch.empty(b, c, 1, h, w, device="meta", dtype=dtype)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        _, hist = vae.decoder_first_chunk(x)
        first = counter.get_total_flops()
        if t > 1:  # one later latent frame: the head, then the tail per output frame
            k = vae.decoder.head_histories
            (feats, src), _ = vae.decoder_head(x, hist[:k])
            for j in range(feats.shape[2]):
                vae.decoder_tail(*vae.decoder.tail_frame(feats, src, j), hist[k:])
    steady = counter.get_total_flops() - first
    return first + (t - 1) * steady, float(sum(v.numel() * v.element_size() for v in hist))


class Timer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def run(self, fn):
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = fn()
            b.record()
            b.synchronize()
            return out, a.elapsed_time(b) / 1e3
        t0 = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - t0


def measure(fn, device: torch.device, warmup: int, iters: int) -> dict:
    """Warm-up (first call timed on its own: compile), then median of `iters`; peak extra memory over them."""
    timer = Timer(device)
    first_s = None
    for i in range(warmup):
        video, s = timer.run(fn)
        first_s = s if i == 0 else first_s
        del video
    gc.collect()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    times, video = [], None
    for _ in range(iters):
        video = None  # free the previous output before the next call
        video, s = timer.run(fn)
        times.append(s)
    peak = (torch.cuda.max_memory_allocated() - before) / 2**30 if cuda else None
    return {"first_call_s": first_s, "times_s": times, "median_s": statistics.median(times), "peak_extra_gib": peak}, video


def memory_trace(fn, top: int = 12) -> dict:
    """Replay the CUDA allocator's event history over one call: the allocations live at its peak,
    grouped by the innermost Python frame in our code, diffusers or inductor output (cuDNN workspaces
    show up as allocations made by the conv call itself)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.memory._record_memory_history(enabled="all", stacks="python", max_entries=2_000_000)
    try:
        video = fn()
        torch.cuda.synchronize()
        del video
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    events = snap["device_traces"][torch.cuda.current_device()]
    live: dict[int, dict] = {}
    cur = peak = 0
    at_peak: dict[int, dict] = {}
    for e in events:
        if e["action"] == "alloc":
            live[e["addr"]] = e
            cur += e["size"]
            if cur > peak:
                peak, at_peak = cur, dict(live)
        elif e["action"] == "free_completed" and e["addr"] in live:
            cur -= live.pop(e["addr"])["size"]

    def where(e: dict) -> str:
        frames = e.get("frames") or []
        keep = [f for f in frames if any(k in f["filename"] for k in ("cosmos3_compiled", "diffusers", "torchinductor"))]
        f = (keep or frames or [{"filename": "?", "line": 0, "name": "?"}])[0]
        return f"{Path(f['filename']).name}:{f['line']} {f['name']}"

    groups: dict[str, list[int]] = {}
    for e in at_peak.values():
        groups.setdefault(where(e), []).append(e["size"])
    rows = sorted(groups.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {
        "peak_gib": peak / 2**30,
        "events": len(events),
        "top": [{"where": k, "gib": sum(v) / 2**30, "count": len(v), "largest_gib": max(v) / 2**30} for k, v in rows],
    }


def kernel_kind(name: str) -> str:
    """Coarse kind of a GPU kernel from its name: convolutions (cuDNN / CUTLASS implicit GEMM), inductor's
    generated kernels, GEMMs, copies and the rest."""
    low = name.lower()
    if "triton" in low:
        return "inductor (triton)"
    if any(k in low for k in ("conv", "fprop", "implicit", "dgrad", "xmma", "cudnn")):
        return "convolution"
    if any(k in low for k in ("gemm", "cutlass", "cublas", "nvjet")):
        return "gemm"
    if any(k in low for k in ("copy", "memcpy", "memset", "fill")):
        return "copy / fill"
    if any(k in low for k in ("flash", "fmha", "attention")):
        return "attention"
    return "other"


def kernel_profile(fn, device: torch.device, top: int = 15) -> dict:
    """One call under torch.profiler: summed GPU kernel time by `kernel_kind`, and the `top` kernels."""
    kernels: dict[str, list[float]] = {}
    for name, s in gpu_kernels(fn) if device.type == "cuda" else []:
        kernels.setdefault(name, []).append(s)
    kinds: dict[str, float] = {}
    for name, ts in kernels.items():
        kinds[kernel_kind(name)] = kinds.get(kernel_kind(name), 0.0) + sum(ts)
    rows = sorted(kernels.items(), key=lambda kv: -sum(kv[1]))[:top]
    return {
        "kernel_s": sum(kinds.values()),
        "launches": sum(len(ts) for ts in kernels.values()),
        "by_kind_s": dict(sorted(kinds.items(), key=lambda kv: -kv[1])),
        "top": [{"name": n[:160], "s": sum(ts), "calls": len(ts), "kind": kernel_kind(n)} for n, ts in rows],
    }


def compare(x: torch.Tensor, ref: torch.Tensor) -> dict:
    """PSNR over the [-1, 1] range (peak-to-peak 2) and max |x - ref|, computed frame by frame in fp32."""
    se, n, mx = 0.0, 0, 0.0
    for f in range(ref.shape[2]):
        d = x[:, :, f].float() - ref[:, :, f].float()
        se += d.pow(2).sum().item()
        n += d.numel()
        mx = max(mx, d.abs().max().item())
    mse = se / n
    return {"psnr_db": float("inf") if mse == 0 else 10 * math.log10(4.0 / mse), "max_abs": mx}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latent", default="21,45,80", help="latent T,h,w (video 1+4(T-1) frames of 16h x 16w)")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument(
        "--ours",
        default="eager,eager_cl,compiled_cl",
        help="comma list of modes: eager|compiled + optional _cl (channels_last_3d), _autotune (compiled, max-autotune-no-cudagraphs), "
        "_exact (compiled, intermediates rounded as in eager), _t<N> (tile-major decode in N column strips)",
    )
    ap.add_argument("--no-diffusers", action="store_true", help="skip the diffusers baseline")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls before timing (the first also compiles)")
    ap.add_argument("--iters", type=int, default=3, help="timed calls; the median is reported")
    ap.add_argument("--cudnn-benchmark", type=int, default=1, help="torch.backends.cudnn.benchmark for every mode (1/0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--memory-trace",
        default="",
        help="comma list of modes (or 'diffusers') to trace once more with the CUDA allocator history: "
        "prints what is live at the peak",
    )
    ap.add_argument(
        "--profile",
        default="",
        help="comma list of modes to profile once more (torch.profiler): GPU kernel time by kind and the top kernels",
    )
    ap.add_argument(
        "--truth",
        action="store_true",
        help="also decode once in fp32 (same weights upcast, TF32 off) and report every mode's PSNR against it",
    )
    ap.add_argument("--smoke", action="store_true", help="tiny widths and latent on the CPU, fp32: checks the script")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"), help="folder for JSON + markdown")
    args = ap.parse_args()

    cfg = dict(WAN22)
    if args.smoke:
        cfg.update(base_dim=8, decoder_base_dim=8)
        device, dtype, latent = torch.device("cpu"), torch.float32, (3, 3, 4)
    else:
        if not torch.cuda.is_available():
            sys.exit("needs a CUDA device (use --smoke on the CPU)")
        device, dtype = torch.device("cuda"), DTYPES[args.dtype]
        latent = tuple(int(v) for v in args.latent.split(","))
    g = torch.Generator().manual_seed(args.seed + 1)
    cfg["latents_mean"] = (0.2 * torch.randn(cfg["z_dim"], generator=g)).tolist()
    cfg["latents_std"] = (0.5 + torch.rand(cfg["z_dim"], generator=g)).tolist()
    modes = [m for m in args.ours.split(",") if m]
    for m in modes:
        parse_mode(m)
    traced = {m for m in args.memory_trace.split(",") if m}
    profiled = {m for m in args.profile.split(",") if m}
    if args.smoke:
        traced = set()  # the allocator history is CUDA-only
    torch.backends.cudnn.benchmark = bool(args.cudnn_benchmark)  # fixed shapes: let cuDNN pick its fastest algorithms
    set_progress_enabled(False)

    z = torch.randn(1, cfg["z_dim"], *latent, generator=torch.Generator().manual_seed(args.seed)).to(device)
    ref = random_weights(cfg, device, dtype, args.seed)
    total_flops, history_bytes = decoder_flops(cfg, tuple(z.shape), dtype)
    mean = torch.tensor(cfg["latents_mean"], dtype=dtype, device=device).view(1, -1, 1, 1, 1)
    inv_std = (1.0 / torch.tensor(cfg["latents_std"], dtype=dtype, device=device)).view(1, -1, 1, 1, 1)

    results: dict[str, dict] = {}
    videos: dict[str, torch.Tensor] = {}
    truth = None
    with torch.no_grad():
        if args.truth:
            # fp32 decode of the same (rounded) weights: the rounding-free answer each dtype path approximates
            tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            vae32 = ours_from(ref, cfg, torch.float32, channels_last=False)
            t0 = time.perf_counter()
            truth = vae32.decode_frames(z)
            print(f"fp32 truth decoded in {time.perf_counter() - t0:.1f} s", flush=True)
            del vae32
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
        if not args.no_diffusers:
            # The Cosmos3 pipeline's decode: de-normalise in the VAE dtype, then vae.decode(...).sample.
            results["diffusers"], videos["diffusers"] = measure(
                lambda: ref.decode(z.to(dtype) / inv_std + mean).sample, device, args.warmup, args.iters
            )
            if "diffusers" in traced:
                results["diffusers"]["memory_trace"] = memory_trace(lambda: ref.decode(z.to(dtype) / inv_std + mean).sample)
            if truth is not None:
                results["diffusers"]["vs_fp32"] = compare(videos["diffusers"], truth)
            print(f"diffusers: {json.dumps(results['diffusers'])}", flush=True)
        for mode in modes:
            base, flags = parse_mode(mode)
            vae = ours_from(ref, cfg, dtype, channels_last="cl" in flags)
            tiled = tile_flag(flags)
            vae.tiles = int(tiled[1:]) if tiled else 1
            if base == "compiled":
                torch.compiler.reset()
                apply_compile_vae(vae, "max_autotune_no_cudagraphs" if "autotune" in flags else "default",
                                  channels_last=False, emulate_casts="exact" in flags)  # layout: set above
            results[mode], video = measure(lambda: vae.decode_frames(z), device, args.warmup, args.iters)
            if "diffusers" in videos:
                results[mode]["vs_diffusers"] = compare(video, videos["diffusers"])
            if truth is not None:
                results[mode]["vs_fp32"] = compare(video, truth)
            # our eager reference: the eager run with the same layout when there is one (channels_last_3d
            # alone changes cuDNN's conv algorithms, hence bf16 rounding), else plain eager
            prefs = ("eager_cl" if "cl" in flags else "eager", "eager")
            if tiled:  # a tile-major decode is its own eager reference (conv shapes, so cuDNN algorithms, differ)
                prefs = tuple(f"{m}_{tiled}" for m in prefs) + prefs
            ref_mode = next((m for m in prefs if m in videos), None)
            if ref_mode is not None and mode != ref_mode:
                results[mode]["vs_ours_eager"] = compare(video, videos[ref_mode])
                results[mode]["eager_reference"] = ref_mode
            if base == "eager" and flags <= {"cl"} | ({tiled} if tiled else set()):
                videos[mode] = video
            del video
            if mode in traced:
                results[mode]["memory_trace"] = memory_trace(lambda: vae.decode_frames(z))
            if mode in profiled:
                results[mode]["profile"] = kernel_profile(lambda: vae.decode_frames(z), device)
            del vae
            print(f"{mode}: {json.dumps(results[mode])}", flush=True)  # partial results survive a timeout
    if "diffusers" in videos and "eager" in videos:
        results["diffusers"]["vs_ours_eager"] = compare(videos["diffusers"], videos["eager"])

    for r in results.values():
        r["tflops"] = total_flops / r["median_s"] / 1e12
    card = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    env = {
        "device": card,
        "torch": torch.__version__,
        "diffusers": __import__("diffusers").__version__,
        "dtype": str(dtype),
        "latent": list(z.shape),
        "video": [1, 3, 1 + cfg["scale_factor_temporal"] * (latent[0] - 1), *(cfg["scale_factor_spatial"] * v for v in latent[1:])],
        "decode_tflop": total_flops / 1e12,
        "history_gib": history_bytes / 2**30,  # causal state carried between chunks: a floor for peak memory
        "video_gib": math.prod(z.shape[:1]) * 3 * (1 + cfg["scale_factor_temporal"] * (latent[0] - 1))
        * math.prod(cfg["scale_factor_spatial"] * v for v in latent[1:]) * torch.finfo(dtype).bits / 8 / 2**30,
        "cudnn_benchmark": bool(args.cudnn_benchmark),
        "config": {k: v for k, v in cfg.items() if not k.startswith("latents_")},
        "date": time.strftime("%Y-%m-%d"),
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench_vae.json").write_text(json.dumps({"env": env, "results": results}, indent=2))
    table = markdown(env, results)
    for name, r in results.items():
        if "profile" in r:
            p = r["profile"]
            lines = [f"{name}: GPU kernels {p['kernel_s']:.3f} s over {p['launches']} launches; by kind:"]
            lines += [f"  {s:7.3f} s  {k}" for k, s in p["by_kind_s"].items()]
            lines += [f"  {x['s']:7.3f} s {x['calls']:6d} x  [{x['kind']}] {x['name'][:100]}" for x in p["top"]]
            table = "\n".join(lines) + "\n\n" + table
        if "memory_trace" in r:
            t = r["memory_trace"]
            lines = [f"{name}: allocator peak {t['peak_gib']:.2f} GiB over the call; live at the peak:"]
            lines += [f"  {x['gib']:6.2f} GiB  {x['count']:4d} x (largest {x['largest_gib']:.2f})  {x['where']}" for x in t["top"]]
            table = "\n".join(lines) + "\n\n" + table
    slug = "".join(ch if ch.isalnum() else "_" for ch in card.lower()).strip("_") or "cpu"
    (out_dir / f"vae_{slug}_{time.strftime('%Y%m%d')}.md").write_text(table + "\n")
    print(table)


def markdown(env: dict, results: dict) -> str:
    def fmt(v, spec):
        return "—" if v is None else format(v, spec)

    lines = [
        f"Wan2.2 VAE decode, latent {env['latent']} → video {env['video']}, {env['dtype']}, {env['device']}, "
        f"torch {env['torch']}, diffusers {env['diffusers']}, {env['decode_tflop']:.0f} TFLOP per decode; "
        f"causal histories {env['history_gib']:.2f} GiB and the output video {env['video_gib']:.2f} GiB are "
        "part of every peak",
        "",
        "| mode | median s | first call s | TFLOP/s | peak extra GiB | PSNR vs diffusers dB | max abs vs diffusers "
        "| our eager ref | PSNR vs it dB | max abs vs it | PSNR vs fp32 dB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        vd, ve = r.get("vs_diffusers", {}), r.get("vs_ours_eager", {})
        lines.append(
            f"| {name} | {r['median_s']:.3f} | {fmt(r['first_call_s'], '.1f')} | {r['tflops']:.3g} | "
            f"{fmt(r['peak_extra_gib'], '.2f')} | {fmt(vd.get('psnr_db'), '.1f')} | {fmt(vd.get('max_abs'), '.2e')} | "
            f"{r.get('eager_reference', '—')} | {fmt(ve.get('psnr_db'), '.1f')} | {fmt(ve.get('max_abs'), '.2e')} | "
            f"{fmt(r.get('vs_fp32', {}).get('psnr_db'), '.1f')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
