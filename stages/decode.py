"""Stage: Wan2.2 VAE decode, chunk by chunk, into one preallocated video."""

from __future__ import annotations

import logging

import torch

from .state import Components, State, log_checksum


log = logging.getLogger(__name__)


class Decode:
    """Reads latents; writes video [1, 3, F, H, W] in [-1, 1] (VAE dtype)."""

    def __init__(self, components: Components):
        self.vae = components.vae

    @torch.no_grad()
    def __call__(self, state: State) -> State:
        state.video = self.vae.decode_frames(state.latents)
        log_checksum(log, "video", state.video)
        return state
