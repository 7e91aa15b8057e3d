"""Decoded video [1, 3, F, H, W] in [-1, 1] → frames, without full-size float temporaries.

Matches diffusers' `VideoProcessor.postprocess_video`: the decoded video is cast to fp32, mapped with
(x · 0.5 + 0.5).clamp(0, 1), and uint8 frames are round(x · 255) (round half to even, like numpy).
The helpers below work one frame at a time on the video's own device, so only the result (uint8 for
`to_uint8_frames`) needs to cross to the host. `FrameStream` does what `to_uint8_frames(video).cpu()` does
for a video still being decoded, range by range, without blocking the decode.
"""

from __future__ import annotations

import hashlib
from typing import Callable

import torch
from torch import Tensor

from .media import FrameConsumer


def _check_video(video: Tensor) -> None:
    if not isinstance(video, Tensor) or video.ndim != 5 or video.shape[0] != 1 or video.shape[1] != 3:
        raise ValueError(f"video must be [1, 3, F, H, W]; got {tuple(getattr(video, 'shape', ()))}")
    if not video.is_floating_point():
        raise ValueError(f"video must be floating point in [-1, 1], got {video.dtype}")


def to_unit_range_(video: Tensor) -> Tensor:
    """In place: x · 0.5 + 0.5 clamped to [0, 1] (in the video's own dtype). Returns `video`."""
    _check_video(video)
    return video.mul_(0.5).add_(0.5).clamp_(0.0, 1.0)


def _unit_frame(frame: Tensor) -> Tensor:
    """One frame [3, H, W] (any float dtype) → fp32 [H, W, 3] in [0, 1]."""
    unit = frame.to(torch.float32, copy=True)  # a copy even for fp32 input: the video stays untouched
    return unit.mul_(0.5).add_(0.5).clamp_(0.0, 1.0).permute(1, 2, 0)


def _uint8_frames_into(video: Tensor, f0: int, f1: int, out: Tensor) -> Tensor:
    """Frames [f0, f1) of video [1, 3, F, H, W] → round(unit · 255) into uint8 out [f1 - f0, H, W, 3] (on
    the video's device), one frame at a time. The one place this arithmetic is written. Returns `out`."""
    for i in range(f0, f1):
        out[i - f0] = _unit_frame(video[0, :, i]).mul_(255.0).round_()
    return out


@torch.no_grad()
def to_uint8_frames(video: Tensor) -> Tensor:
    """[1, 3, F, H, W] in [-1, 1] → uint8 [F, H, W, 3] on the same device (round(unit · 255))."""
    _check_video(video)
    _, _, f, h, w = video.shape
    return _uint8_frames_into(video, 0, f, torch.empty(f, h, w, 3, dtype=torch.uint8, device=video.device))


class FrameStream:
    """`to_uint8_frames(video).cpu()` for a video that is still being decoded, a range of frames at a time.

    Called as `stream(f0, f1)` (it is `WanVAE.decode_frames`' `on_frames`) once frames [f0, f1) of `video`
    are final in stream order, every frame once and in order. It converts them with `to_uint8_frames`'
    arithmetic into `frames` (uint8 [F, H, W, 3] on the host) and hands that slice to `sink(slice, ready)`.

    On CUDA the calling thread never waits for the device: the conversion runs on a side stream behind an
    event recorded on the caller's (decode) stream, into a small device buffer that is copied non_blocking
    into pinned `frames`; `ready` is an event on the side stream that the consumer synchronizes on before
    reading the slice. On the CPU the conversion runs inline, straight into `frames`, and `ready` is None.
    """

    def __init__(self, video: Tensor, sink: Callable[[Tensor, torch.cuda.Event | None], None]) -> None:
        _check_video(video)
        _, _, f, h, w = video.shape
        self.video, self.sink = video, sink
        self.frames = torch.empty(f, h, w, 3, dtype=torch.uint8, pin_memory=video.is_cuda)
        self._side = None
        if video.is_cuda:
            self._side = torch.cuda.Stream(video.device)
            video.record_stream(self._side)  # freed early (a failed decode), its memory waits for the side stream
        self._last: torch.cuda.Event | None = None  # the latest range's copy
        self._next = 0  # the first frame not handed over yet

    @torch.no_grad()
    def __call__(self, f0: int, f1: int) -> None:
        if f0 != self._next or not f0 < f1 <= self.frames.shape[0]:
            n = self.frames.shape[0]
            raise ValueError(f"frames [{f0}, {f1}) out of order: expected [{self._next}, ...) of {n}")
        self._next = f1
        host = self.frames[f0:f1]
        if self._side is None:
            self.sink(_uint8_frames_into(self.video, f0, f1, host), None)
            return
        decoded = torch.cuda.Event()
        decoded.record(torch.cuda.current_stream(self.video.device))
        with torch.cuda.stream(self._side):  # temporaries below belong to the side stream
            self._side.wait_event(decoded)
            staged = torch.empty(host.shape, dtype=torch.uint8, device=self.video.device)
            host.copy_(_uint8_frames_into(self.video, f0, f1, staged), non_blocking=True)
            ready = torch.cuda.Event(blocking=True)  # a waiting consumer sleeps instead of spinning on a core
            ready.record(self._side)
        self._last = ready
        self.sink(host, ready)

    def result(self) -> Tensor:
        """`frames`, once every frame has been handed over and copied (waits for the last copy)."""
        if self._next != self.frames.shape[0]:
            raise RuntimeError(f"only {self._next} of {self.frames.shape[0]} frames were streamed")
        if self._last is not None:
            self._last.synchronize()
        return self.frames


@torch.no_grad()
def to_float_frames(video: Tensor) -> Tensor:
    """[1, 3, F, H, W] in [-1, 1] → float32 [F, H, W, 3] in [0, 1] on the same device."""
    _check_video(video)
    _, _, f, h, w = video.shape
    out = torch.empty(f, h, w, 3, dtype=torch.float32, device=video.device)
    for i in range(f):
        out[i] = _unit_frame(video[0, :, i])
    return out


class StreamHasher(FrameConsumer):
    """sha256 of uint8 frames handed over range by range, in order (a `FrameStream` sink): hashed on a
    background thread as they arrive (hashlib releases the GIL on large buffers), so the digest of the whole
    video is ready as soon as its last range is. The same digest as hashing all frames' bytes at once."""

    def __init__(self) -> None:
        self._sha = hashlib.sha256()
        super().__init__("frame-sha256", "frame sha256")

    def __call__(self, frames: Tensor, ready=None) -> None:
        """Queue contiguous uint8 frames (host), `ready` as in FrameConsumer."""
        self._put(frames, ready)

    def hexdigest(self) -> str:
        """Wait for everything queued, then the digest (re-raises the hashing thread's error)."""
        self._close()
        return self._sha.hexdigest()

    def _consume(self, frames: Tensor) -> None:
        self._sha.update(frames.numpy().data)
