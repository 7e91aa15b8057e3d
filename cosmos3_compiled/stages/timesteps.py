"""Stage: the sampler's schedule (CPU) and its static step buffers on the device, for this request."""

from __future__ import annotations

import torch

from cosmos3_compiled.scheduler import FlowUniPCScheduler

from .state import State


class Timesteps:
    """Reads request, latents; writes run (the request's `UniPCRun`), timesteps, metrics["timesteps"]."""

    def __init__(self, scheduler: FlowUniPCScheduler, device: torch.device):
        self.scheduler, self.device = scheduler, device

    def __call__(self, state: State) -> State:
        state.run = self.scheduler.prepare(state.request.num_inference_steps, state.latents.shape, self.device)
        state.timesteps = state.run.timesteps
        state.metrics["timesteps"] = state.timesteps.tolist()
        return state
