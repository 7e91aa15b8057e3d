"""Stage: Wan2.2 VAE decode, chunk by chunk, into one preallocated video (feeding the frame sink, when there is
one, as frames finish)."""

from __future__ import annotations

import logging

import torch

from cosmos3_compiled.frame_sink import FrameSink
from cosmos3_compiled.vae import WanVAE

from .state import State, log_checksum


log = logging.getLogger(__name__)


class Decode:
    """Reads latents (and waveform, sampling_rate: the sink muxes them as the MP4's audio track); writes video
    [1, 3, F, H, W] in [-1, 1] (VAE dtype). With a `sink`, each finished range of frames also goes to the MP4
    encoder during the decode."""

    def __init__(self, vae: WanVAE, sink: FrameSink | None = None):
        self.vae, self.sink = vae, sink

    @torch.no_grad()
    def __call__(self, state: State) -> State:
        if self.sink is None:
            state.video = self.vae.decode_frames(state.latents)
        else:
            state.video = self._decode_into_sink(state)
        log_checksum(log, "video", state.video)
        return state

    def _decode_into_sink(self, state: State) -> torch.Tensor:
        vae = self.vae
        video = torch.empty(vae.output_shape(tuple(state.latents.shape)), dtype=vae.dtype, device=vae.device)
        with self.sink.aborting():
            audio = None if state.waveform is None else (state.waveform, state.sampling_rate)
            vae.decode_frames(state.latents, out=video, on_frames=self.sink.start(video, fps=state.request.fps,
                                                                                  audio=audio))
            if video.is_cuda:  # wait inside the guard: an interrupt during the GPU's tail still stops the sink
                torch.cuda.synchronize(video.device)
        return video
