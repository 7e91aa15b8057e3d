"""Stage: Wan2.2 VAE decode, chunk by chunk, into one preallocated video (streaming its frames to the MP4
encoder as they finish, when Save streams the video)."""

from __future__ import annotations

import logging

import torch

from .save import VideoStream
from .state import Components, State, log_checksum


log = logging.getLogger(__name__)


class Decode:
    """Reads latents; writes video [1, 3, F, H, W] in [-1, 1] (VAE dtype). With `stream` (Save's
    `VideoStream`), each finished range of frames also goes to the video encoder during the decode."""

    def __init__(self, components: Components, stream: VideoStream | None = None):
        self.vae = components.vae
        self.stream = stream

    @torch.no_grad()
    def __call__(self, state: State) -> State:
        if self.stream is None:
            state.video = self.vae.decode_frames(state.latents)
        else:
            state.video = self._decode_streaming(state)
        log_checksum(log, "video", state.video)
        return state

    def _decode_streaming(self, state: State) -> torch.Tensor:
        vae = self.vae
        video = torch.empty(vae.output_shape(tuple(state.latents.shape)), dtype=vae.dtype, device=vae.device)
        with self.stream.aborting():
            vae.decode_frames(state.latents, out=video, on_frames=self.stream.start(video, fps=state.request.fps))
            if video.is_cuda:  # wait inside the guard: an interrupt during the GPU's tail still stops the stream
                torch.cuda.synchronize(video.device)
        return video
