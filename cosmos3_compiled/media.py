"""Writing frames: H.264 MP4 through PyAV, PNG through Pillow."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image


def write_mp4(frames: torch.Tensor, path: Path, fps: float, crf: int = 18) -> None:
    """uint8 frames [F, H, W, 3] → H.264 (yuv420p) MP4 at `fps`; H and W must be even."""
    arr = frames.numpy()
    f, h, w, _ = arr.shape
    from fractions import Fraction

    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf)}
        for i in range(f):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr[i]), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_png(frame: torch.Tensor, path: Path) -> None:
    Image.fromarray(frame.numpy()).save(str(path), format="PNG")


def read_video_frames(path: Path) -> np.ndarray:
    """Decode an MP4 back to uint8 [F, H, W, 3] (used by tests to check the file plays)."""
    with av.open(str(path)) as container:
        return np.stack([fr.to_ndarray(format="rgb24") for fr in container.decode(video=0)])
