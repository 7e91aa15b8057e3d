#!/usr/bin/env python3
"""libx264 settings against the MP4 save's tail: 81 frames of 1280x720 arrive at the compiled VAE decode's pace
(CPU pacing, --decode-s over all frames) into an encoder thread; for each setting this prints the seconds from
the last frame to the finished file, the whole encode's CPU-side time one-shot, the file size, and the PSNR of
the decoded MP4 against the source frames (quality at the same crf).

    python tools/probe_x264.py [--content noise,textured,smooth] [--settings NAME,...] [--out DIR]

Settings are named `<thread type>[-la<N>][-th<N>][-p<preset>]`: rc-lookahead N (x264's default for preset
medium is 40), N threads, a libx264 preset (default medium). A probe for choosing the product's encoder settings, not part of the pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import sys
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_video_stream import make_video  # noqa: E402
from cosmos3_compiled.media import read_video_frames  # noqa: E402
from cosmos3_compiled.postprocess import to_uint8_frames  # noqa: E402


def parse(name: str) -> tuple[str, dict]:
    thread_type, *rest = name.split("-")
    options = {"crf": "18"}
    for part in rest:
        if part.startswith("la"):
            options["rc-lookahead"] = part[2:]
        elif part.startswith("th"):
            options["threads"] = part[2:]
        elif part.startswith("p"):
            options["preset"] = part[1:]
        else:
            raise ValueError(name)
    return thread_type.upper(), options


def open_x264(path: Path, height: int, width: int, options: dict, thread_type: str):
    """An MP4 container at `path` with one 24 fps libx264 yuv420p stream: (container, stream)."""
    container = av.open(str(path), mode="w", format="mp4")
    stream = container.add_stream("libx264", rate=Fraction(24))
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    stream.options = dict(options)
    stream.codec_context.thread_type = thread_type
    return container, stream


def encode(frames: np.ndarray, path: Path, setting: str, decode_s: float) -> dict:
    thread_type, options = parse(setting)
    container, stream = open_x264(path, frames.shape[1], frames.shape[2], options, thread_type)
    q: queue.SimpleQueue = queue.SimpleQueue()
    flush = {}

    def run():
        while (item := q.get()) is not None:
            for packet in stream.encode(av.VideoFrame.from_ndarray(item, format="rgb24")):
                container.mux(packet)
        t0 = time.perf_counter()
        for packet in stream.encode(None):
            container.mux(packet)
        flush["s"] = time.perf_counter() - t0
        container.close()

    worker = threading.Thread(target=run)
    t0 = time.perf_counter()
    worker.start()
    step = decode_s / len(frames)
    for i, frame in enumerate(frames):  # frame i is ready at (i + 1) * step
        delay = t0 + (i + 1) * step - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        q.put(frame)
    t_last = time.perf_counter()
    q.put(None)
    worker.join()
    t_done = time.perf_counter()
    return {"tail_s": t_done - t_last, "total_s": t_done - t0, "flush_s": flush["s"]}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--content", default="noise,textured,smooth")
    ap.add_argument("--settings", default="SLICE,FRAME,FRAME-la20,FRAME-la10,SLICE-la10")
    ap.add_argument("--decode-s", type=float, default=2.8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    out = Path(args.out or os.environ.get("OUT") or tempfile.mkdtemp())
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for content in args.content.split(","):
        frames = to_uint8_frames(make_video(content, 81, 720, 1280, device)).cpu().numpy()
        for setting in args.settings.split(","):
            for rep in range(args.repeats):
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "v.mp4"
                    paced = encode(frames, path, setting, args.decode_s)
                    one_shot = encode(frames, path, setting, 0.0)
                    decoded = read_video_frames(path)
                    rows.append({"content": content, "setting": setting, "repeat": rep, **paced,
                                 "one_shot_s": one_shot["total_s"], "mb": path.stat().st_size / 1e6,
                                 "psnr_db": psnr(decoded, frames)})
                    print(json.dumps(rows[-1]), flush=True)
    meta = {"cpus": os.cpu_count(), "av": av.__version__, "decode_s": args.decode_s, "rows": rows}
    (out / "probe_x264.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{os.cpu_count()} CPUs, av {av.__version__}; frames paced over {args.decode_s} s")
    print("| content | setting | tail after last frame s | one-shot s | MB | PSNR dB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['content']} | {r['setting']} | {r['tail_s']:.2f} | {r['one_shot_s']:.2f} | {r['mb']:.1f} | "
              f"{r['psnr_db']:.2f} |")


if __name__ == "__main__":
    main()
