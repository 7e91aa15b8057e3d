"""Stage: the sampler's timesteps and sigmas (CPU), and its static step buffers on the device."""

from __future__ import annotations

from .state import Components, State


class Timesteps:
    """Reads request, latents; writes timesteps; sets up the scheduler's buffers."""

    def __init__(self, components: Components):
        self.scheduler = components.scheduler

    def __call__(self, state: State) -> State:
        self.scheduler.set_timesteps(state.request.num_inference_steps)
        self.scheduler.setup_buffers(state.latents.shape, state.latents.device)
        state.timesteps = self.scheduler.timesteps
        state.metrics["timesteps"] = state.timesteps.tolist()
        return state
