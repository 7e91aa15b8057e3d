#!/usr/bin/env python3
"""GPU benchmark of the Cosmos3 video step vs diffusers' forward, same weights, same run, same card.

Nano-size random weights, bf16. Prints a markdown table last; full results as JSON under $OUT.
Example (H100): python tools/bench_transformer.py --preset nano --height 720 --width 1280 --frames 81
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tools")]

from cosmos3_compiled.checkpoint import build_random  # noqa: E402
from cosmos3_compiled.compile import apply_compile, capture_cuda_graph, compile_counters, reset_compile  # noqa: E402
from cosmos3_compiled.config import preset, replace  # noqa: E402
from cosmos3_compiled.schema import CompileConfig  # noqa: E402
from timing import gpu_kernels, graph_or_eager, profiled_back_to_back, time_back_to_back, time_calls  # noqa: E402

CEILINGS = {"matmul_tflops": 770.0, "sdpa_cudnn_tflops": 636.0}


def psnr(x: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.float()
    mse = (x.float() - ref).pow(2).mean().item()
    peak = ref.abs().max().item()
    return float("inf") if mse == 0 else 10 * math.log10(peak * peak / mse)


def recompile(model, mode: str, scope: str) -> None:
    """Drop every compiled graph and restore plain forwards, then compile the model another way."""
    apply_compile(reset_compile(model), CompileConfig(mode=mode, scope=scope, fullgraph=True))


def kernel_times(activities: list[tuple[str, float]]) -> list[float]:
    """The kernels' seconds among the profiler's GPU activities (memsets and memcpys left out)."""
    return [s for name, s in activities if "Memset" not in name and "Memcpy" not in name]


def kernel_sum(fn, iters: int) -> dict:
    """Sum of GPU kernel time and kernel launches per call, from the profiler (CUPTI also sees graph replays)."""
    kernels = kernel_times(gpu_kernels(fn, iters))
    return {"kernel_s": sum(kernels) / iters, "kernels_per_call": len(kernels) / iters}


def flops(cfg, n_video: int, n_text: int) -> dict:
    d, f, hd, hq, hkv, layers = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_attention_heads,
                                 cfg.num_key_value_heads, cfg.num_hidden_layers)
    per_token = 2 * (d * (hq + 2 * hkv) * hd + hq * hd * d + d * 2 * f + f * d) * layers
    linear = per_token * n_video
    attn = 4 * n_video * (n_video + n_text) * hq * hd * layers
    return {"linear_tflop": linear / 1e12, "attention_tflop": attn / 1e12}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="nano")
    ap.add_argument("--layers", type=int, default=None, help="override layer count (quick runs)")
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--text-len", type=int, default=256)
    ap.add_argument("--fps", type=float, default=24.0)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--attn", default="cudnn", help="comma list of attention backends for ours: auto|cudnn|flash|efficient|math|fa4")
    ap.add_argument("--fused-qk", default="0",
                    help="comma list of 0/1: video step's q/k norm + RoPE + K/V writes as one Triton kernel (1)")
    ap.add_argument("--ours", default="eager,blocks,cudagraph",
                    help="comma list of: eager, blocks, full, blocks_<compile mode>, cudagraph[:<compile mode>] "
                         "(regional compile, then one CUDA graph of the whole step), cudagraph_batched (both CFG branches "
                         "as one batch; times reported per branch)")
    ap.add_argument("--kernel-sum", action="store_true",
                    help="also profile each 'ours' mode: sum of its GPU kernel times and launches per step")
    ap.add_argument("--diffusers", default="eager,regional", help="comma list of: eager, regional ('' to skip)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--offload-text-tower", action="store_true",
                    help="text-tower weights in host memory (Super on one GPU); the text pass streams them")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of the last 'ours' mode")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args()

    dev = torch.device(args.device)
    cfg = preset(args.preset)
    if args.layers:
        cfg = replace(cfg, num_hidden_layers=args.layers)
    latent = ((args.frames - 1) // 4 + 1, args.height // 16, args.width // 16)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    def cuda_time(fn, warmup, iters):
        return time_calls(fn, warmup, iters, dev)

    results: dict = {"config": vars(args), "latent": latent, "torch": torch.__version__,
                     "device_name": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"}
    t0 = time.perf_counter()
    model = build_random(cfg, seed=0, dtype=dtype, device=dev, fuse=False, offload_text_tower=args.offload_text_tower)
    sync()
    results["init_s"] = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, cfg.latent_channel, *latent, generator=gen).to(dev)
    ids = torch.randint(0, cfg.vocab_size, (args.text_len,), generator=gen)
    timestep = 870
    rows = []
    n_video = math.prod(model.patch_grid(latent))
    fl = flops(cfg, n_video, args.text_len)
    results["flops"] = fl
    total_tflop = fl["linear_tflop"] + fl["attention_tflop"]

    ref_out = None
    if args.diffusers:
        from diffusers import Cosmos3OmniTransformer
        from dit_reference import reference_velocity

        with torch.device("meta"):
            ref = Cosmos3OmniTransformer(**{k: v for k, v in cfg.to_dict().items() if k != "rope_scaling"})
        state = dict(model.state_dict())
        state["norm.weight"] = torch.ones(cfg.hidden_size, device=dev, dtype=dtype)
        state["lm_head.weight"] = torch.empty(cfg.vocab_size, cfg.hidden_size, device=dev, dtype=dtype)
        ref.load_state_dict(state, assign=True, strict=True)
        ref.rotary_emb.inv_freq = ref.rotary_emb.inv_freq  # non-persistent buffer: rebuild on device below
        ref.rotary_emb.register_buffer(
            "inv_freq", 1.0 / (cfg.rope_theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float32, device=dev)
                                                   / cfg.head_dim)), persistent=False)
        ref.eval().requires_grad_(False)
        del state

        def run_ref():
            return reference_velocity(ref, ids.tolist(), latents, timestep, args.fps)

        with torch.no_grad():
            for mode in args.diffusers.split(","):
                compile_s = 0.0
                if mode == "regional":
                    ref.compile_repeated_blocks(fullgraph=True)
                    t0 = time.perf_counter()
                    run_ref()
                    sync()
                    compile_s = time.perf_counter() - t0
                times = cuda_time(run_ref, args.warmup, args.iters)
                out = run_ref()
                if ref_out is None:
                    ref_out = out.float().cpu()
                med = statistics.median(times)
                back_to_back = statistics.median(time_back_to_back(run_ref, 1, args.iters, dev))
                rows.append({"impl": f"diffusers {mode}", "median_s": med, "back_to_back_s": back_to_back,
                             "compile_s": compile_s,
                             "tflops": total_tflop / med, "psnr_vs_diffusers_eager": psnr(out.cpu(), ref_out)})
        del ref, run_ref
        gc.collect()
        torch._dynamo.reset()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    model.setup_buffers()
    model.set_attention_backend(args.attn.split(",")[0])
    branch = model.setup_branch(args.text_len, latent, fps=args.fps)
    t0 = time.perf_counter()
    model.text_pass(ids, branch)
    sync()
    results["text_pass_s"] = time.perf_counter() - t0
    ts = torch.tensor(float(timestep), device=dev)
    eager_out = None
    with torch.no_grad():
        for attn, fused, mode in [(a, f, m) for a in args.attn.split(",") for f in args.fused_qk.split(",")
                                  for m in args.ours.split(",")]:
            model.set_fused_qk_rope(fused == "1")
            if attn != model.attention.name:  # the path fixes the K/V buffer layout: new branch
                model.set_attention_backend(attn)
                branch = model.setup_branch(args.text_len, latent, fps=args.fps)
                model.text_pass(ids, branch)
            compile_s = 0.0
            graph = static_out = None
            per_call_branches = 1
            if mode == "cudagraph_batched":  # both CFG branches (uncond prompt 25 tokens shorter) as one batch
                recompile(model, "default", "blocks")
                uncond = model.setup_branch(args.text_len - 25, latent, fps=args.fps)
                model.text_pass(ids[: args.text_len - 25], uncond)
                pair, per_call_branches = [branch, uncond], 2
                tables = model.setup_batched(pair)
                t0 = time.perf_counter()
                graph, outs = capture_cuda_graph(lambda: model.forward_batched(latents, ts, pair, *tables))
                static_out = outs[0]
                sync()
                compile_s = time.perf_counter() - t0
            elif mode.startswith("cudagraph"):
                recompile(model, mode.partition(":")[2] or "default", "blocks")
                t0 = time.perf_counter()
                graph, static_out = capture_cuda_graph(lambda: model(latents, ts, branch))
                sync()
                compile_s = time.perf_counter() - t0
            elif mode == "eager":
                recompile(model, "eager", "blocks")
            else:
                scope, _, cmode = mode.partition("_")
                recompile(model, cmode or "default", scope)
                t0 = time.perf_counter()
                model(latents, ts, branch)
                sync()
                compile_s = time.perf_counter() - t0
            call = graph_or_eager(graph, static_out, lambda: model(latents, ts, branch))
            times = cuda_time(call, args.warmup, args.iters)
            # the same calls queued back to back (no sync in between), as the denoise loop runs its steps
            back_to_back = statistics.median(time_back_to_back(call, 2, args.iters, dev)) / per_call_branches
            out = call().float().cpu()
            if eager_out is None:
                eager_out = out
            med = statistics.median(times) / per_call_branches  # seconds per CFG branch
            row = {"impl": f"ours {mode} ({attn}{', fused qk' if fused == '1' else ''})", "median_s": med,
                   "back_to_back_s": back_to_back, "compile_s": compile_s, "tflops": total_tflop / med, "psnr_vs_ours_eager": psnr(out, eager_out)}
            if ref_out is not None:
                row["psnr_vs_diffusers_eager"] = psnr(out, ref_out)
            row.update(compile_counters())
            if args.kernel_sum and dev.type == "cuda":
                row.update(kernel_sum(call, 3))
                row["wall_over_kernels"] = med * per_call_branches / row["kernel_s"]
                row["back_to_back_over_kernels"] = back_to_back * per_call_branches / row["kernel_s"]
                # wall and kernel time of the SAME calls (one profiled back-to-back loop)
                times_p, acts = profiled_back_to_back(call, args.iters)
                kernels_p = sum(kernel_times(acts)) / args.iters
                row["same_calls_wall_s"] = statistics.median(times_p) / per_call_branches
                row["same_calls_kernel_s"] = kernels_p / per_call_branches
                row["same_calls_wall_over_kernels"] = statistics.median(times_p) / kernels_p
                row["kernel_s"] /= per_call_branches
                row["kernels_per_call"] /= per_call_branches
            rows.append(row)
    if args.profile and dev.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
            model(latents, ts, branch)
            sync()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=90)
        (Path(args.out) / "profile.txt").parent.mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "profile.txt").write_text(table)
        print(table)
    if dev.type == "cuda":
        results["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    results["rows"] = rows
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"bench_transformer_{args.height}x{args.width}x{args.frames}.json").write_text(json.dumps(results, indent=2))
    print(f"\n{results['device_name']}, torch {torch.__version__}, latent {latent}, {n_video} video tokens, "
          f"{args.text_len} text tokens; {fl['linear_tflop']:.1f} + {fl['attention_tflop']:.1f} TFLOP per step")
    print("| impl | median s | back-to-back s | TFLOP/s | compile s | kernel-sum s | wall/kernels | back-to-back/kernels "
          "| same calls: wall/kernels | launches | PSNR vs diffusers eager | PSNR vs ours eager |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    nan = float("nan")
    for r in rows:
        print(f"| {r['impl']} | {r['median_s']:.4f} | {r.get('back_to_back_s', nan):.4f} | {r['tflops']:.0f} | "
              f"{r['compile_s']:.1f} | {r.get('kernel_s', nan):.4f} | {r.get('wall_over_kernels', nan):.3f} | "
              f"{r.get('back_to_back_over_kernels', nan):.3f} | {r.get('same_calls_wall_over_kernels', nan):.3f} | "
              f"{r.get('kernels_per_call', nan):.0f} | "
              f"{r.get('psnr_vs_diffusers_eager', nan):.1f} | {r.get('psnr_vs_ours_eager', nan):.1f} |")


if __name__ == "__main__":
    main()
