"""The state that flows through the stages: one typed field per thing a stage writes (and the stage that writes it).

A stage is constructed with exactly the components it uses and is called as `state = stage(state)`; it reads
and writes only the fields its docstring names. No stage imports another.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cosmos3_compiled.model import Branch
from cosmos3_compiled.request import Request
from cosmos3_compiled.scheduler import FlowMatchRun, UniPCRun


@dataclass
class State:
    request: Request
    cond_ids: list[int] | None = None  # Tokenize
    uncond_ids: list[int] | None = None  # Tokenize (None when guidance is 1)
    branches: list[Branch] = field(default_factory=list)  # TextPass: [cond] or [cond, uncond]; Denoise frees them
    latents: torch.Tensor | None = None  # Latents, then Denoise in place: [1, C, T, h, w] fp32 on the device
    sound_latents: torch.Tensor | None = None  # Latents (sound=true), then Denoise in place: [C_s, S] fp32, device
    # Timesteps: the sampler's schedule and static step buffers, stepped by Denoise
    run: UniPCRun | FlowMatchRun | None = None
    timesteps: torch.Tensor | None = None  # Timesteps: [n] (CPU): int64 (UniPC), fp32 (distilled FlowMatchEuler)
    sound_run: UniPCRun | None = None  # Timesteps (sound=true): the sound latents' run, `run`'s schedule, own history
    action_latents: torch.Tensor | None = None  # Latents (action task), then Denoise in place: [A, action_dim] fp32
    action_run: UniPCRun | None = None  # Timesteps (action task with noisy actions): their own run, `run`'s schedule
    waveform: torch.Tensor | None = None  # DecodeSound: [channels, samples] fp32 (CPU) in [-1, 1]
    sampling_rate: int | None = None  # DecodeSound: the waveform's samples per second
    video: torch.Tensor | None = None  # Decode: [1, 3, F, H, W] in [-1, 1]; Postprocess drops it
    frames_uint8: torch.Tensor | None = None  # Postprocess: [F, H, W, 3] uint8 (CPU)
    frames_float: torch.Tensor | None = None  # Postprocess (output.frames=float32): [F, H, W, 3] fp32 in [0, 1]
    sha256: str | None = None  # Postprocess: of frames_uint8's bytes
    outputs: dict[str, Path] = field(default_factory=dict)  # Save (and the pipeline's metrics.json): name → path
    metrics: dict[str, Any] = field(default_factory=dict)  # every stage adds its entries; written as metrics.json


def log_checksum(log: logging.Logger, what: str, t: torch.Tensor) -> None:
    """At DEBUG level (`hydra.verbose=<stage module>`), log t's sum and sum of squares in float64 — a cheap
    fingerprint to compare ranks or runs (one device sync, and only when the level is on)."""
    if log.isEnabledFor(logging.DEBUG):
        d = t.double()
        log.debug("%s: sum %.12e, sum of squares %.12e", what, d.sum().item(), d.square().sum().item())
