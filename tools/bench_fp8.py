#!/usr/bin/env python3
"""GPU benchmark of the FP8 video step against our bf16 step, same random weights, same run, same card.

The FP8 checkpoint comes from `tools/make_nano_checkpoint.py DST --fp8 --seed S` (ModelOpt format); the bf16 model
is the same seeded weights drawn again (`checkpoint.build_random`, seed S) before quantization. Both are compiled
as the product compiles them (regional inductor blocks) and each step is captured in its own CUDA graph. For
every request shape: the bf16 step, the shipped policy's W8A16 step (steps 0-2 and N-3..N-1), its W8A8 step (the
steps between: the video MLP W8A8, the video attention projections W8A16, as the reference classifies them) and
policy=a8 (every linear W8A8); median of back-to-back calls (CUDA events), compile + capture seconds, peak memory,
PSNR of the velocity against bf16. Then `torch._scaled_mm` at the Nano GEMM shapes (the FP8 ceiling) against
bf16 GEMMs and our compiled `Fp8Linear` (input quantization included), in TFLOP/s.

Prints a markdown table last; everything as JSON under --out.
Example (H100): python tools/bench_fp8.py --checkpoint /tmp/cosmos3-nano-fp8 --out /tmp/out
CPU dry run:    python tools/bench_fp8.py --checkpoint /tmp/dbg-fp8 --preset debug --device cpu --eager \
                    --shapes 32x48x5 --iters 2 --out /tmp/bench_fp8_dry
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]


def parse_shape(text: str) -> tuple[int, int, int]:
    h, w, f = (int(v) for v in text.lower().split("x"))
    return h, w, f


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", type=Path, required=True, help="FP8 checkpoint folder (make_nano_checkpoint --fp8)")
    ap.add_argument("--preset", default="nano", help="the preset the checkpoint was written from (default: nano)")
    ap.add_argument("--seed", type=int, default=0, help="the seed it was written with (default: 0)")
    ap.add_argument("--shapes", default="720x1280x81,720x1280x189", help="HxWxF request sizes, comma separated")
    ap.add_argument("--text-len", type=int, default=300, help="text tokens of the branch (default: 300)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed calls after the capture (default: 1)")
    ap.add_argument("--iters", type=int, default=5, help="timed calls per step (default: 5)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--attention", default="auto", help="model.attention_backend (default: auto)")
    ap.add_argument("--eager", action="store_true", help="no compile and no CUDA graph (CPU dry runs)")
    ap.add_argument("--gemm-m", default="19320", help="GEMM rows M, comma separated (default: 19320, Nano 720p x 81)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/out"))
    args = ap.parse_args()

    import torch  # after argparse: --help stays fast

    from bench_transformer import flops, psnr
    from cosmos3_compiled import fp8
    from cosmos3_compiled.checkpoint import build_random, load_transformer
    from cosmos3_compiled.compile import apply_compile, capture_cuda_graph, compile_counters
    from cosmos3_compiled.config import preset
    from cosmos3_compiled.model import fused_qk_rope_supported
    from cosmos3_compiled.schema import CompileConfig
    from timing import graph_or_eager, time_back_to_back

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def gib(nbytes: int) -> float:
        return nbytes / 2**30

    results: dict = {"versions": {"torch": torch.__version__, "cuda": torch.version.cuda},
                     "device": torch.cuda.get_device_name() if cuda else "cpu", "args": {k: str(v) for k, v in
                                                                                       vars(args).items()}}
    cfg = preset(args.preset)
    t0 = time.perf_counter()
    bf16 = build_random(cfg, seed=args.seed, dtype=torch.bfloat16, device=dev)
    sync()
    results["build_bf16_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    quant = load_transformer(args.checkpoint / "transformer", dtype=torch.bfloat16, device=dev)
    sync()
    results["load_fp8_s"] = time.perf_counter() - t0
    if not fp8.is_fp8_model(quant):
        raise SystemExit(f"bench_fp8: {args.checkpoint} is not an FP8 checkpoint (make_nano_checkpoint.py --fp8)")
    results["weights_gib"] = {name: gib(sum(t.numel() * t.element_size() for t in m.parameters()))
                              for name, m in (("bf16", bf16), ("fp8", quant))}
    qc = fp8.read_quantization_config(args.checkpoint / "transformer")
    shipped, every_a8 = fp8.Fp8Policy.resolve(qc), fp8.Fp8Policy.resolve(qc, "a8")
    for m in (bf16, quant):
        m.set_attention_backend(args.attention)
        m.set_fused_qk_rope(fused_qk_rope_supported(dev, cfg.head_dim))
        if not args.eager:  # as compile=cudagraph compiles the step; room for every regime and shape
            apply_compile(m, CompileConfig(mode="default", scope="blocks", fullgraph=True, recompile_limit=32))
    # (label, model, policy, a step of a 35-step run that runs the regime)
    configs = [("bf16", bf16, None, 0), ("fp8 W8A16 step (shipped policy)", quant, shipped, 0),
               ("fp8 W8A8 step (shipped policy)", quant, shipped, 10), ("fp8 every linear W8A8 (policy=a8)", quant,
                                                                        every_a8, 10),
               ("fp8 W8A8 step + FP8 attention (precision.fp8_attention)", quant,
                dataclasses.replace(shipped, fp8_attention=True), 10)]
    rows = []
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (args.text_len,), generator=gen)
    for shape_text in args.shapes.split(","):
        h, w, f = parse_shape(shape_text)
        latent = ((f - 1) // 4 + 1, h // 16, w // 16)
        latents = torch.randn(1, cfg.latent_channel, *latent, generator=gen).to(dev)
        ts = torch.tensor(500.0, device=dev)
        grid = bf16.patch_grid(latent)
        n_video = grid[0] * grid[1] * grid[2]
        fl = flops(cfg, n_video, args.text_len)
        total_tflop = fl["linear_tflop"] + fl["attention_tflop"]
        ref_out = None
        for label, model, policy, step in configs:
            if policy is not None:
                fp8.set_step_regime(model, policy, step, 35)
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            branch = model.setup_branch(args.text_len, latent, fps=24.0)
            model.text_pass(ids, branch)
            graphs_before = compile_counters()["unique_graphs"]
            t0 = time.perf_counter()
            graph = static_out = None
            if cuda and not args.eager:
                graph, static_out = capture_cuda_graph(lambda: model(latents, ts, branch))
            call = graph_or_eager(graph, static_out, lambda: model(latents, ts, branch))
            if graph is None:
                call()
            sync()
            compile_s = time.perf_counter() - t0
            times = time_back_to_back(call, args.warmup, args.iters, dev)
            med = statistics.median(times)
            out = call().float().cpu()
            sync()
            row = {"shape": shape_text, "tokens": n_video, "config": label, "median_s": med, "all_s": times,
                   "compile_capture_s": compile_s, "graphs_compiled": compile_counters()["unique_graphs"] - graphs_before,
                   "tflops_nominal": total_tflop / med}
            if cuda:
                row["peak_gib"] = gib(torch.cuda.max_memory_allocated())
            if ref_out is None:
                ref_out, ref_med = out, med
            else:
                row["psnr_vs_bf16_db"] = psnr(out, ref_out)
                row["speedup_vs_bf16"] = ref_med / med
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "all_s"}), flush=True)
            del graph, branch, call
        results.setdefault("flops", {})[shape_text] = fl
    results["steps"] = rows
    del bf16, quant, configs
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    # ---- GEMMs at Nano shapes: bf16, the `_scaled_mm` ceiling, our compiled Fp8Linear in both regimes
    d, f_, hd, hq, hkv = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_attention_heads,
                          cfg.num_key_value_heads)
    gemms = {"qkv": (d, (hq + 2 * hkv) * hd), "out": (hq * hd, d), "gate_up": (d, 2 * f_), "down": (f_, d)}
    m_rows = [int(m) for m in args.gemm_m.split(",")]
    gemm_rows = []
    for m in m_rows:
        for name, (k, n) in gemms.items():
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            wt = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k ** 0.5
            w8, ws = fp8.quantize_weight(wt)
            xs = (x.float().abs().amax() / fp8.FP8_MAX).reshape(())
            x8 = fp8.quantize_input(x, xs)
            lin = fp8.Fp8Linear(k, n, False, device=dev)
            lin.weight.data, lin.weight_scale.data, lin.input_scale.data = w8, ws.to(dev), xs
            lin.setup_buffers()
            tflop = 2 * m * k * n / 1e12
            calls = {
                "bf16 F.linear": lambda: torch.nn.functional.linear(x, wt),
                "_scaled_mm fp8 (ceiling)": lambda: fp8.scaled_mm(x8, w8, xs, ws, None, torch.bfloat16),
            }
            for mode in ("a8", "a16"):
                fn = lin if args.eager else torch.compile(lin, fullgraph=True, dynamic=False)

                def ours(fn=fn, mode=mode):
                    lin.mode = mode
                    return fn(x)

                calls[{"a8": "Fp8Linear W8A8 (compiled: input quantization + _scaled_mm)",
                       "a16": "Fp8Linear W8A16 (compiled: dequantisation + GEMM)"}[mode]] = ours
            for label, fn in calls.items():
                med = statistics.median(time_back_to_back(fn, 3, max(5, args.iters), dev))
                gemm_rows.append({"M": m, "gemm": name, "K": k, "N": n, "impl": label, "median_ms": med * 1e3,
                                  "tflops": tflop / med})
            del x, wt, w8, x8, lin
    results["gemms"] = gemm_rows
    (args.out / "bench_fp8.json").write_text(json.dumps(results, indent=2) + "\n")

    print(f"\n{results['device']}, torch {torch.__version__}; weights GiB: "
          f"{ {k: round(v, 2) for k, v in results['weights_gib'].items()} }; text {args.text_len} tokens\n")
    print("| shape | step | median s | speedup vs bf16 | PSNR vs bf16 dB | nominal TFLOP/s | compile+capture s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['config']} | {r['median_s']:.4f} | {r.get('speedup_vs_bf16', 1.0):.3f} | "
              f"{r.get('psnr_vs_bf16_db', float('inf')):.1f} | {r['tflops_nominal']:.0f} | "
              f"{r['compile_capture_s']:.1f} | {r.get('peak_gib', float('nan')):.1f} |")
    print("\n| M | GEMM (K→N) | impl | ms | TFLOP/s |\n|---|---|---|---|---|")
    for g in gemm_rows:
        print(f"| {g['M']} | {g['gemm']} ({g['K']}→{g['N']}) | {g['impl']} | {g['median_ms']:.3f} | {g['tflops']:.0f} |")


if __name__ == "__main__":
    main()
