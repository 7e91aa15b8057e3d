"""Types shared by the stages: the request, the loaded components, and the state that flows through."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass(frozen=True)
class Request:
    prompt: str
    negative_prompt: str
    height: int
    width: int
    num_frames: int
    fps: float
    seed: int
    num_inference_steps: int
    guidance_scale: float
    image: Path | None = None
    use_system_prompt: bool = True

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.num_frames - 1) // 4 + 1, self.height // 16, self.width // 16

    @property
    def use_cfg(self) -> bool:
        return self.guidance_scale != 1.0

    @property
    def image_to_video(self) -> bool:
        return self.image is not None and self.num_frames > 1

    @property
    def clean_frames(self) -> tuple[int, ...]:
        """Latent frames kept clean (not denoised): frame 0 in image-to-video."""
        return (0,) if self.image_to_video else ()


@dataclass
class Components:
    transformer: Any  # cosmos3_compiled.model.Cosmos3Transformer
    vae: Any  # cosmos3_compiled.vae.WanVAE
    scheduler: Any  # cosmos3_compiled.scheduler.FlowUniPCScheduler
    tokenizer: Any  # cosmos3_compiled.prompting.PromptTokenizer
    device: torch.device
    dtype: torch.dtype
    source: str  # checkpoint folder, or "embedded:<preset>"
    parallel: Any = None  # cosmos3_compiled.distributed.Parallel under torchrun, None for one process
    served: Any = None  # cosmos3_compiled.pipeline.ServedBuckets: request shapes the compiled graphs hold


@dataclass
class State:
    request: Request
    cond_ids: list[int] | None = None  # tokenize
    uncond_ids: list[int] | None = None
    branches: list = field(default_factory=list)  # text pass: [cond] or [cond, uncond] (model.Branch)
    latents: torch.Tensor | None = None  # latents → denoise: [1, 48, T, h, w] fp32
    timesteps: torch.Tensor | None = None  # timesteps: [n] int64 (CPU)
    video: torch.Tensor | None = None  # decode: [1, 3, F, H, W] in [-1, 1]
    frames_uint8: torch.Tensor | None = None  # postprocess: [F, H, W, 3] uint8 (CPU)
    frames_float: torch.Tensor | None = None  # postprocess (when asked): [F, H, W, 3] fp32 in [0, 1] (CPU)
    sha256: str | None = None  # postprocess: of frames_uint8's bytes
    outputs: dict[str, Path] = field(default_factory=dict)  # save
    metrics: dict[str, Any] = field(default_factory=dict)  # every stage: seconds, memory, compile stats


def log_checksum(log: logging.Logger, what: str, t: torch.Tensor) -> None:
    """At DEBUG level (`hydra.verbose=<stage module>`), log t's sum and sum of squares in float64 — a cheap
    fingerprint to compare ranks or runs (one device sync, and only when the level is on)."""
    if log.isEnabledFor(logging.DEBUG):
        d = t.double()
        log.debug("%s: sum %.12e, sum of squares %.12e", what, d.sum().item(), d.square().sum().item())
