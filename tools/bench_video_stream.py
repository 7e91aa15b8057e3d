#!/usr/bin/env python3
"""How long the MP4 save takes after the last decoded frame, by content: the product's streamed path
(`frame_sink.FrameSink`: uint8 on a side stream → pinned host → libx264 thread, sha256 thread) against the
one-shot path it replaced (uint8 + copy + sha256 + `write_mp4` after the whole decode).

The random-weight Nano video is noise-like, and libx264 (crf 18, preset medium) encodes noise several times
slower than natural video, so the end-to-end benchmark's save tail says little about a real checkpoint. This
script replays the decode's timing with chosen content: a video tensor [1, 3, F, H, W] on the GPU whose frames
are "finished" one at a time by a GPU busy-wait (`torch.cuda._sleep`) paced like the compiled 720p VAE
decode (--decode-s over all frames), so the CPU runs ahead and frames become ready on the GPU
at the decode's pace, exactly as in `WanVAE.decode_frames(on_frames=...)`.

Content: `noise` (uniform, like the random-weight output), `smooth` (moving gradients), `textured`
(low-frequency noise drifting across the frame: textured but compressible, between the two).

GPU:   python tools/bench_video_stream.py [--content noise,textured,smooth] [--out DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cosmos3_compiled.media import write_mp4  # noqa: E402
from cosmos3_compiled.postprocess import to_uint8_frames  # noqa: E402
from cosmos3_compiled.frame_sink import FrameSink  # noqa: E402


def make_video(content: str, frames: int, height: int, width: int, device: str) -> torch.Tensor:
    """[1, 3, F, H, W] bf16 in [-1, 1] with the chosen content (seeded)."""
    gen = torch.Generator(device=device).manual_seed(0)
    if content == "noise":
        return torch.rand((1, 3, frames, height, width), generator=gen, device=device).mul_(2).sub_(1).bfloat16()
    t = torch.arange(frames, device=device, dtype=torch.float32).view(frames, 1, 1)
    y = torch.arange(height, device=device, dtype=torch.float32).view(1, height, 1)
    x = torch.arange(width, device=device, dtype=torch.float32).view(1, 1, width)
    if content == "smooth":
        chans = [torch.sin((x + 6 * t) / 97.0) * torch.cos((y - 4 * t) / 61.0),
                 torch.sin((x + y + 5 * t) / 143.0), torch.cos((x - 3 * t) / 211.0) * 0.8]
        video = torch.stack([c.expand(frames, height, width) for c in chans])
    elif content == "textured":
        cell = 24  # low-frequency noise: one random value per 24×24 cell, bilinear in between, drifting 2 px
        # down and 1 px right per frame
        rows, cols = (height + 2 * frames) // cell + 2, (width + frames) // cell + 2
        base = torch.rand((1, 3, rows, cols), generator=gen, device=device) * 2 - 1
        up = torch.nn.functional.interpolate(base, scale_factor=cell, mode="bilinear", align_corners=False)[0]
        video = torch.stack([up[:, 2 * i: 2 * i + height, i: i + width] for i in range(frames)], dim=1)
    else:
        raise ValueError(f"unknown content {content!r}")
    return video.unsqueeze(0).clamp_(-1, 1).bfloat16()


def cycles_per_second() -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(10_000_000)
    start.record()
    torch.cuda._sleep(200_000_000)
    end.record()
    end.synchronize()
    return 200_000_000 / (start.elapsed_time(end) / 1e3)


def paced_decode(video: torch.Tensor, on_frames, decode_s: float, hz: float) -> None:
    """Frame i is 'decoded' after decode_s / F seconds of GPU work; on_frames is called as the real decode does."""
    n = video.shape[2]
    per_frame = int(decode_s / n * hz)
    for i in range(n):
        torch.cuda._sleep(per_frame)
        if on_frames is not None:
            on_frames(i, i + 1)


def run_streamed(video, decode_s, hz, out: Path) -> dict:
    stream = FrameSink(out)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    paced_decode(video, stream.start(video, fps=24.0), decode_s, hz)
    torch.cuda.synchronize()
    t_decoded = time.perf_counter()
    frames = stream.frames_uint8()
    digest = stream.sha256()
    stream.finish()
    t_done = time.perf_counter()
    return {"decode_s": t_decoded - t0, "after_decode_s": t_done - t_decoded, "sha256": digest,
            "mb": (out / "video.mp4").stat().st_size / 1e6, "encoder": stream.timings, "frames": frames.shape[0]}


def run_one_shot(video, decode_s, hz, out: Path) -> dict:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    paced_decode(video, None, decode_s, hz)
    torch.cuda.synchronize()
    t_decoded = time.perf_counter()
    frames = to_uint8_frames(video).cpu()
    digest = hashlib.sha256(frames.numpy().data).hexdigest()
    write_mp4(frames, out / "video.mp4", fps=24.0)
    t_done = time.perf_counter()
    return {"decode_s": t_decoded - t0, "after_decode_s": t_done - t_decoded, "sha256": digest,
            "mb": (out / "video.mp4").stat().st_size / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--content", default="noise,textured,smooth")
    ap.add_argument("--frames", type=int, default=81)
    ap.add_argument("--height", type=int, default=720)
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--decode-s", type=float, default=2.8, help="paced decode time over all frames (set it to the compiled 720p VAE decode measured on the card)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None, help="folder for results.json (default: $OUT or a temp dir)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs CUDA (the decode pacing is GPU work)")
    import os

    out = Path(args.out or os.environ.get("OUT") or tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    hz = cycles_per_second()
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cpus": os.cpu_count(),
               "decode_s": args.decode_s, "runs": []}
    for content in args.content.split(","):
        video = make_video(content, args.frames, args.height, args.width, "cuda")
        for rep in range(args.repeats):
            for name, fn in (("streamed", run_streamed), ("one-shot", run_one_shot)):
                with tempfile.TemporaryDirectory() as tmp:
                    r = fn(video, args.decode_s, hz, Path(tmp))
                results["runs"].append({"content": content, "path": name, "repeat": rep, **r})
        shas = {r["sha256"] for r in results["runs"] if r["content"] == content}
        assert len(shas) == 1, f"{content}: streamed and one-shot frames differ"
    (out / "video_stream.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"{results['device']}, {results['cpus']} CPUs, torch {results['torch']}; decode paced at {args.decode_s} s")
    print("| content | path | repeat | decode s | after the decode s | MP4 MB | encoder flush s |")
    print("|---|---|---|---|---|---|---|")
    for r in results["runs"]:
        flush = r.get("encoder", {}).get("flush")
        print(f"| {r['content']} | {r['path']} | {r['repeat']} | {r['decode_s']:.2f} | {r['after_decode_s']:.2f} | "
              f"{r['mb']:.1f} | {'' if flush is None else f'{flush:.2f}'} |")


if __name__ == "__main__":
    main()
