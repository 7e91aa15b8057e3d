"""Stage: Wan2.2 VAE decode, chunk by chunk, into one preallocated video."""

from __future__ import annotations

import torch

from .state import Components, State


class Decode:
    """Reads latents; writes video [1, 3, F, H, W] in [-1, 1] (VAE dtype)."""

    def __init__(self, components: Components):
        self.vae = components.vae

    @torch.no_grad()
    def __call__(self, state: State) -> State:
        state.video = self.vae.decode_frames(state.latents)
        return state
