"""Stage: the sound tokenizer's decoder, sound latents → waveform (sound=true)."""

from __future__ import annotations

import logging

import torch

from cosmos3_compiled.audio import AudioDecoder

from .state import State, log_checksum

log = logging.getLogger(__name__)


class DecodeSound:
    """Reads sound_latents; writes waveform ([channels, samples] fp32 on the host: the decoder's output, clamped to
    [-1, 1], not trimmed to the video's length, as the reference returns it), sampling_rate, metrics["sound"].
    The decoder runs in its own (the model's) dtype on its device; the stage's time is metrics.json
    seconds.decode_sound."""

    def __init__(self, decoder: AudioDecoder):
        self.decoder = decoder

    @torch.no_grad()
    def __call__(self, state: State) -> State:
        waveform = self.decoder(state.sound_latents)  # [channels, samples]
        log_checksum(log, "waveform", waveform)
        state.waveform = waveform.float().cpu()
        cfg = self.decoder.cfg
        state.sampling_rate = cfg.sampling_rate
        channels, samples = state.waveform.shape
        state.metrics["sound"] = {"latent_frames": state.sound_latents.shape[1], "channels": channels,
                                  "samples": samples, "sampling_rate": cfg.sampling_rate,
                                  "seconds_of_audio": samples / cfg.sampling_rate,
                                  "decoder_dtype": str(self.decoder.dtype).removeprefix("torch.")}
        return state
