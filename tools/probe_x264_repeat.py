#!/usr/bin/env python3
"""Are two libx264 encodes of the same frames byte-identical? Encodes the same 9 frames `--reps` times (each on
a fresh thread, as Mp4Writer does) while two other threads keep allocating (torch matmuls), and counts the
encodes whose packets differ from the first. Found this way (2 CPU cores, av 18.1.0): at 48x32 and 64x64 some
encodes differ with frame, slice or single-threaded x264 alike, none with `--x264-params mbtree=0`,
`rc-lookahead=0` or `asm=0`; at 96x128, 128x128 and 1280x720 none differed.

    python tools/probe_x264_repeat.py --size 64x64 --reps 60 [--x264-params mbtree=0] [--thread-type FRAME]
"""

from __future__ import annotations

import argparse
import threading

import av
import numpy as np
import torch

from probe_x264 import open_x264  # tools/, this script's folder


def frames_for(height: int, width: int, n: int = 9) -> np.ndarray:
    yy, xx = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([torch.stack([(xx * 5 + t) % 256, (yy * 7 + 2 * t) % 256, (xx + yy) * 3 % 256], -1)
                        for t in range(n)]).to(torch.uint8).numpy()


def encode(frames: np.ndarray, path: str, thread_type: str, x264_params: str | None) -> list[bytes]:
    options = {"crf": "18", **({"x264-params": x264_params} if x264_params else {})}
    container, stream = open_x264(path, frames.shape[1], frames.shape[2], options, thread_type)
    packets = []
    for frame in [*frames, None]:
        av_frame = None if frame is None else av.VideoFrame.from_ndarray(frame, format="rgb24")
        for packet in stream.encode(av_frame):
            packets.append(bytes(packet))
            container.mux(packet)
    container.close()
    return packets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="64x64", help="HxW")
    ap.add_argument("--reps", type=int, default=60)
    ap.add_argument("--thread-type", default="FRAME")
    ap.add_argument("--x264-params", default=None)
    ap.add_argument("--path", default="/tmp/probe_x264_repeat.mp4")
    args = ap.parse_args()
    height, width = map(int, args.size.split("x"))
    frames = frames_for(height, width)
    stop = threading.Event()

    def busy():
        a = torch.randn(512, 512)
        while not stop.is_set():
            a @ a

    busy_threads = [threading.Thread(target=busy) for _ in range(2)]
    for thread in busy_threads:
        thread.start()

    def on_thread():
        out = []
        worker = threading.Thread(target=lambda: out.append(encode(frames, args.path, args.thread_type, args.x264_params)))
        worker.start()
        worker.join()
        return out[0]

    first = on_thread()
    differing = sum(on_thread() != first for _ in range(args.reps))
    stop.set()
    for thread in busy_threads:
        thread.join()
    print(f"{args.size} thread_type={args.thread_type} x264-params={args.x264_params}: "
          f"{differing} of {args.reps} encodes differ from the first (av {av.__version__})")


if __name__ == "__main__":
    main()
