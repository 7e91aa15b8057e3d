#!/usr/bin/env python3
"""Joint sound on one GPU: the whole denoising step with and without the sound segment, and the audio decode.

Random weights (Nano preset with its audio head: sound_gen, sound_dim 64, sound_latent_fps 25), bf16. In one run,
on the same card:
  1. the compiled whole step (both CFG branches, CFG combine, UniPC update; with sound also the sound segment's
     tokens in every layer and its own UniPC update), regional inductor compile + one CUDA graph of the step, as
     `compile=cudagraph` runs it: median of CUDA-event timed replays, without sound then with it;
  2. the sound decoder at the released tokenizer's size (48 kHz stereo, dec_dim 320, strides 2·4·5·6·8) on the
     request's sound latents: median seconds;
  3. peak GPU memory of each phase.
Prints a markdown table last; the JSON goes to --out (default $OUT).

GPU (H100): python tools/bench_sound.py --height 720 --width 1280 --frames 189 --out $OUT
CPU dry run (checks the script, times nothing useful):
    python tools/bench_sound.py --device cpu --preset debug --height 32 --width 48 --frames 9 --iters 1 --compile eager \
        --audio-size tiny --out /tmp/bench_sound
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from cosmos3_compiled.audio import RELEASED, TINY, build_random_audio_decoder  # noqa: E402
from cosmos3_compiled.checkpoint import build_random  # noqa: E402
from cosmos3_compiled.compile import apply_compile, capture_cuda_graph, compile_counters  # noqa: E402
from cosmos3_compiled.config import preset, replace  # noqa: E402
from cosmos3_compiled.model import fused_qk_rope_supported  # noqa: E402
from cosmos3_compiled.schema import CompileConfig  # noqa: E402
from cosmos3_compiled.scheduler import COSMOS3_SCHEDULER_CONFIG, FlowUniPCScheduler  # noqa: E402
from cosmos3_compiled.stages.denoise import DenoiseStep  # noqa: E402
from timing import time_calls  # noqa: E402


def peak_gib(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def reset_peak(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def time_step(model, args, dev, latent, sound_len: int) -> dict:
    """The whole denoising step (2 CFG branches) at `latent`, with `sound_len` sound latent frames (0: none)."""
    reset_peak(dev)
    cfg = model.cfg
    gen = torch.Generator().manual_seed(0)
    branches = []
    for text_len in (args.text_len, args.text_len - 17):  # cond and uncond prompts differ in length
        b = model.setup_branch(text_len, latent, fps=args.fps, sound_len=sound_len)
        model.text_pass(torch.randint(0, cfg.vocab_size, (text_len,), generator=gen), b)
        branches.append(b)
    latents = torch.randn(1, cfg.latent_channel, *latent, generator=gen).to(dev)
    sound = torch.randn(cfg.sound_dim, sound_len, generator=gen).to(dev) if sound_len else None
    run = FlowUniPCScheduler.from_config(COSMOS3_SCHEDULER_CONFIG).prepare(args.steps, latents.shape, dev)
    sound_run = run.sibling(sound.shape) if sound_len else None
    step = DenoiseStep(model, run, branches, latents, 6.0, sound=sound, sound_run=sound_run)
    i = args.steps // 2  # a mid-schedule step: second-order predictor and corrector both on
    step.timestep.fill_(float(run.timesteps[i]))
    run.load_(i)
    before = compile_counters()
    t0 = time.perf_counter()
    with torch.no_grad():
        if dev.type == "cuda":
            graph, _ = capture_cuda_graph(step)  # compiles on its first (real) call, then captures
            call = graph.replay
        else:
            step()
            call = step
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        first_s = time.perf_counter() - t0
        times = time_calls(call, args.warmup, args.iters, dev)
    counted = {k: v - before[k] for k, v in compile_counters().items()}
    n_vision = branches[0].vision_len
    out = {"sound_len": sound_len, "video_tokens": n_vision, "tokens_per_branch": n_vision + sound_len,
           "compile_and_capture_s": first_s, "step_median_s": statistics.median(times), "step_all_s": times,
           "peak_memory_gib": peak_gib(dev), **counted}
    del step, branches, latents, sound, run, sound_run
    if dev.type == "cuda":
        del graph
    return out


def time_audio_decode(args, dev, dtype, sound_len: int) -> dict:
    """The released-size sound decoder on [64, sound_len] latents (random weights)."""
    reset_peak(dev)
    audio_cfg = RELEASED if args.audio_size == "released" else TINY
    t0 = time.perf_counter()
    decoder = build_random_audio_decoder(audio_cfg, dtype, dev, seed=1)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    build_s = time.perf_counter() - t0
    params = sum(p.numel() for p in decoder.parameters())
    latents = torch.randn(audio_cfg.latent_dim, sound_len, generator=torch.Generator().manual_seed(3)).to(dev)
    with torch.no_grad():
        times = time_calls(lambda: decoder(latents), args.warmup, args.iters, dev)
        waveform = decoder(latents)
    out = {"audio_config": audio_cfg.to_dict(), "parameters": params, "build_s": build_s,
           "latent_frames": sound_len, "samples": waveform.shape[1], "channels": waveform.shape[0],
           "decode_median_s": statistics.median(times), "decode_all_s": times, "peak_memory_gib": peak_gib(dev)}
    del decoder, latents, waveform
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="nano", help="transformer size (nano; debug for a dry run)")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (quick runs)")
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--frames", type=int, default=189)
    ap.add_argument("--fps", type=float, default=24.0)
    ap.add_argument("--text-len", type=int, default=256, help="cond prompt tokens (uncond: 17 fewer)")
    ap.add_argument("--steps", type=int, default=35, help="schedule length (one mid-schedule step is timed)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--attn", default="cudnn", help="attention backend of the step: auto|cudnn|flash|efficient|math|fa4")
    ap.add_argument("--compile", default="default",
                    help="inductor mode of the regional compile (default | max_autotune_no_cudagraphs | eager)")
    ap.add_argument("--audio-size", choices=("released", "tiny"), default="released",
                    help="sound decoder size (released: the shipped tokenizer's decoder)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    args = ap.parse_args(argv)

    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    audio_cfg = RELEASED if args.audio_size == "released" else TINY
    cfg = replace(preset(args.preset), sound_gen=True, sound_dim=audio_cfg.latent_dim,
                  sound_latent_fps=audio_cfg.sampling_rate / audio_cfg.hop)
    if args.layers:
        cfg = replace(cfg, num_hidden_layers=args.layers)
    latent = ((args.frames - 1) // 4 + 1, args.height // 16, args.width // 16)
    sound_len = audio_cfg.latent_len(args.frames, args.fps)
    results: dict = {"config": vars(args), "latent": latent, "torch": torch.__version__,
                     "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"}

    t0 = time.perf_counter()
    model = build_random(cfg, seed=0, dtype=dtype, device=dev)
    attn = args.attn if dev.type == "cuda" else "auto"
    results["attention"] = attn
    model.set_attention_backend(attn)
    model.set_fused_qk_rope(fused_qk_rope_supported(dev, cfg.head_dim))
    if args.compile != "eager":
        apply_compile(model, CompileConfig(mode=args.compile, scope="blocks", fullgraph=True))
    results["model_init_s"] = time.perf_counter() - t0
    print(f"model ready in {results['model_init_s']:.1f} s; latent {latent}, sound latent frames {sound_len}",
          flush=True)

    results["without_sound"] = time_step(model, args, dev, latent, 0)
    print(f"step without sound: {results['without_sound']['step_median_s']:.4f} s", flush=True)
    results["with_sound"] = time_step(model, args, dev, latent, sound_len)
    print(f"step with sound:    {results['with_sound']['step_median_s']:.4f} s", flush=True)
    del model
    results["audio_decode"] = time_audio_decode(args, dev, dtype, sound_len)
    print(f"audio decode:       {results['audio_decode']['decode_median_s']:.4f} s", flush=True)

    a, b, d = results["without_sound"], results["with_sound"], results["audio_decode"]
    results["sound_step_overhead"] = b["step_median_s"] / a["step_median_s"] - 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_sound.json").write_text(json.dumps(results, indent=2) + "\n")

    def gib(x):
        return "n/a" if x is None else f"{x:.1f}"

    print(f"\n### Joint sound, {results['device_name']}, {args.preset} random weights ({dtype}), "
          f"{args.width}x{args.height}x{args.frames}, CFG (2 branches), attention {attn}, compile {args.compile}"
          + (" + whole-step CUDA graph" if dev.type == "cuda" else ""))
    print("| what | tokens / branch | median s | compile+capture s | graph breaks | peak GiB |")
    print("|---|---|---|---|---|---|")
    for name, r in (("step, no sound", a), ("step, with sound", b)):
        print(f"| {name} | {r['tokens_per_branch']} | {r['step_median_s']:.4f} | {r['compile_and_capture_s']:.1f} "
              f"| {r['graph_breaks']} | {gib(r['peak_memory_gib'])} |")
    print(f"| audio decode ({args.audio_size}, {d['parameters'] / 1e6:.0f} M params, {d['samples']} samples) | "
          f"{d['latent_frames']} | {d['decode_median_s']:.4f} | — | — | {gib(d['peak_memory_gib'])} |")
    print(f"\nsound segment: {100 * results['sound_step_overhead']:+.2f} % step time; JSON: {out / 'bench_sound.json'}")
    return results


if __name__ == "__main__":
    main()
