"""Stage: the sampler's schedule (CPU) and its static step buffers on the device, for this request."""

from __future__ import annotations

import torch

from cosmos3_compiled.scheduler import FlowMatchEulerScheduler, FlowUniPCScheduler

from .state import State


class Timesteps:
    """Reads request, latents; writes run (the request's `UniPCRun` or `FlowMatchRun`), timesteps,
    metrics["timesteps"].

    A distilled checkpoint's sampler re-noises after every step: its noise is drawn here, before the loop, on the
    request's CPU generator in the reference's order. The reference draws the initial noise and then each step's
    from one generator; the Latents stage drew the initial noise from a generator seeded with the request's seed,
    so that one draw is replayed here and the generator goes on exactly where the reference's does. The run also
    keeps the clean frames' latents (image- or video-to-video), put back after every step. With sound, sound_run:
    the sound latents' own UniPC history on the same schedule (one `run.load_` loads both)."""

    def __init__(self, scheduler: FlowUniPCScheduler | FlowMatchEulerScheduler, device: torch.device):
        self.scheduler, self.device = scheduler, device

    def __call__(self, state: State) -> State:
        r, latents = state.request, state.latents
        if isinstance(self.scheduler, FlowMatchEulerScheduler):
            gen = torch.Generator("cpu").manual_seed(r.seed)
            torch.randn(tuple(latents.shape), generator=gen, dtype=torch.float32)  # the initial noise, replayed
            state.run = self.scheduler.prepare(r.num_inference_steps, latents, r.clean_frames, gen)
        else:
            state.run = self.scheduler.prepare(r.num_inference_steps, latents.shape, self.device)
        state.timesteps = state.run.timesteps
        if state.sound_latents is not None:
            state.sound_run = state.run.sibling(state.sound_latents.shape)
        if state.action_latents is not None and not r.action.actions_clean:  # clean actions are never stepped
            state.action_run = state.run.sibling(state.action_latents.shape)
        state.metrics["timesteps"] = state.timesteps.tolist()
        return state
