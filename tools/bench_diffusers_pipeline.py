#!/usr/bin/env python3
"""diffusers 0.42.1 `Cosmos3OmniPipeline` end to end on a checkpoint folder, on one GPU: the reference's own
pipeline on the same checkpoint and request as ours, for the same-card comparison of docs/benchmarks.

Times (CUDA events at every step end through `callback_on_step_end`): load, text + latents before the first step,
each denoising step, and what follows the last step (VAE decode + postprocess). With fewer steps than the
request's 35, the per-step median is extrapolated to 35 and reported as such. bf16, eager (the reference's
default), PyTorch's SDPA dispatch as diffusers ships it.
Example: python tools/bench_diffusers_pipeline.py /tmp/cosmos3-nano --steps 3 --out $OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def load_pipeline(folder: Path, dtype: torch.dtype, device: str = "cuda"):
    from diffusers import Cosmos3OmniPipeline

    try:
        import accelerate  # noqa: F401  (diffusers keeps the time embedder in fp32 only through accelerate's path)
    except ImportError:
        raise SystemExit("bench_diffusers_pipeline: needs accelerate for diffusers' from_pretrained of this model")
    pipe = Cosmos3OmniPipeline.from_pretrained(folder, dtype=dtype, enable_safety_checker=False)
    fill_text_head(pipe.transformer)
    return pipe.to(device)


def fill_text_head(model: torch.nn.Module) -> None:
    """Give the text tower's final norm and LM head (left meta by from_pretrained when a checkpoint written by
    our tools omits them: the video pipeline reads neither's output) ones and zeros, so the model can run."""
    for name, param in list(model.named_parameters()):
        if param.is_meta:
            owner, _, leaf = name.rpartition(".")
            fill = torch.ones if name.endswith("norm.weight") else torch.zeros
            setattr(model.get_submodule(owner), leaf, torch.nn.Parameter(fill(param.shape, dtype=model.dtype),
                                                                          requires_grad=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", type=Path)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--frames", type=int, default=189)
    ap.add_argument("--steps", type=int, default=3, help="denoising steps actually run (default 3)")
    ap.add_argument("--request-steps", type=int, default=35, help="steps the per-step median is extrapolated to")
    ap.add_argument("--guidance", type=float, default=6.0)
    ap.add_argument("--prompt", default="A red fox trots through fresh snow at dawn, steam rising from its breath.")
    ap.add_argument("--out", type=Path, default=Path("."))
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    t0 = time.perf_counter()
    pipe = load_pipeline(args.checkpoint, torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()

    start = torch.cuda.Event(enable_timing=True)
    ends: list[torch.cuda.Event] = []

    def on_step_end(pipeline, step, timestep, kwargs):
        ends.append(torch.cuda.Event(enable_timing=True))
        ends[-1].record()
        return kwargs

    done = torch.cuda.Event(enable_timing=True)
    start.record()
    t1 = time.perf_counter()
    out = pipe(prompt=args.prompt, height=args.height, width=args.width, num_frames=args.frames,
               num_inference_steps=args.steps, guidance_scale=args.guidance,
               generator=torch.Generator("cpu").manual_seed(0), output_type="pt",
               callback_on_step_end=on_step_end)
    done.record()
    done.synchronize()
    wall = time.perf_counter() - t1
    marks = [start.elapsed_time(e) / 1e3 for e in ends]
    steps = [b - a for a, b in zip(marks, marks[1:])]
    per_step = statistics.median(steps) if steps else marks[0]
    after = start.elapsed_time(done) / 1e3 - marks[-1]
    before_first_step = marks[0] - (per_step if steps else 0.0)
    result = {
        "torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "checkpoint": str(args.checkpoint),
        "request": {"height": args.height, "width": args.width, "frames": args.frames, "guidance": args.guidance,
                    "steps_run": args.steps, "steps_extrapolated_to": args.request_steps},
        "load_s": load_s, "before_first_step_s": before_first_step, "step_s": steps, "step_median_s": per_step,
        "after_last_step_s": after, "wall_s": wall,
        "extrapolated_total_s": load_s + before_first_step + per_step * args.request_steps + after,
        "extrapolated_request_s": before_first_step + per_step * args.request_steps + after,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
        "frames_shape": list(out.video.shape),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "diffusers_pipeline.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in result.items() if k != "step_s"}))


if __name__ == "__main__":
    main()
