"""Stage: the denoising loop — video step per CFG branch, CFG combine in fp32, UniPC update in place."""

from __future__ import annotations

import torch

from cosmos3_compiled.progress import progress
from cosmos3_compiled.scheduler import unipc_step_

from .state import Components, State


class DenoiseStep:
    """One whole denoising step on static buffers: every branch's video step, the CFG combine and the
    scheduler update. Free of host syncs, so it can be compiled or captured in one CUDA graph.

    Inputs live in `timestep` (0-dim fp32) and the scheduler's `coeff_buffer`, both filled before each
    call; `latents` is updated in place.
    """

    def __init__(self, model, scheduler, branches, latents: torch.Tensor, guidance_scale: float):
        self.model, self.scheduler, self.branches = model, scheduler, branches
        self.latents = latents
        self.guidance = guidance_scale
        self.timestep = torch.zeros((), device=latents.device, dtype=torch.float32)

    def __call__(self) -> torch.Tensor:
        velocity = self.model(self.latents, self.timestep, self.branches[0])
        if len(self.branches) > 1:
            uncond = self.model(self.latents, self.timestep, self.branches[1])
            velocity = uncond + self.guidance * (velocity - uncond)
        s = self.scheduler
        return unipc_step_(s.coeff_buffer, velocity, self.latents, s.history, s.last_sample)


class Denoise:
    """Reads latents, branches, timesteps; writes latents (in place)."""

    def __init__(self, components: Components, step_runner=None):
        self.model = components.transformer
        self.scheduler = components.scheduler
        self.step_runner = step_runner  # compile.py's wrapper for compiled / CUDA-graph modes

    @torch.no_grad()
    def __call__(self, state: State) -> State:
        step = DenoiseStep(self.model, self.scheduler, state.branches, state.latents, state.request.guidance_scale)
        run = self.step_runner(step) if self.step_runner is not None else step
        timesteps = state.timesteps.to(torch.float32)
        for i in progress(range(len(timesteps)), desc="denoise", total=len(timesteps)):
            step.timestep.copy_(timesteps[i])  # host → device, no sync on the device side
            self.scheduler.load_coefficients_(i)
            run()
        return state
