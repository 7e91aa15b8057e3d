"""Decoded video [1, 3, F, H, W] in [-1, 1] → frames, without full-size float temporaries.

Matches diffusers' `VideoProcessor.postprocess_video`: the decoded video is cast to fp32, mapped with
(x · 0.5 + 0.5).clamp(0, 1), and uint8 frames are round(x · 255) (round half to even, like numpy).
The helpers below work one frame at a time on the video's own device, so only the result (uint8 for
`to_uint8_frames`) needs to cross to the host.
"""

from __future__ import annotations

import torch
from torch import Tensor


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


@torch.no_grad()
def to_uint8_frames(video: Tensor) -> Tensor:
    """[1, 3, F, H, W] in [-1, 1] → uint8 [F, H, W, 3] on the same device (round(unit · 255))."""
    _check_video(video)
    _, _, f, h, w = video.shape
    out = torch.empty(f, h, w, 3, dtype=torch.uint8, device=video.device)
    for i in range(f):
        out[i] = _unit_frame(video[0, :, i]).mul_(255.0).round_()
    return out


@torch.no_grad()
def to_float_frames(video: Tensor) -> Tensor:
    """[1, 3, F, H, W] in [-1, 1] → float32 [F, H, W, 3] in [0, 1] on the same device."""
    _check_video(video)
    _, _, f, h, w = video.shape
    out = torch.empty(f, h, w, 3, dtype=torch.float32, device=video.device)
    for i in range(f):
        out[i] = _unit_frame(video[0, :, i])
    return out
