"""Stage: publish video.mp4 (or write image.png) and frames.safetensors, each atomically."""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import save_file

from cosmos3_compiled.frame_sink import FrameSink, atomic_write
from cosmos3_compiled.media import write_png, write_wav

from .state import State


class Save:
    """Reads frames_uint8, frames_float, sha256, waveform, sampling_rate; writes outputs (name → path),
    metrics["sha256"], ["outputs"].

    video.mp4 was encoded during the decode by the `sink` (with the sound as its AAC track): here it only waits for
    the encoder's tail and renames the file into place. `image`: write the one frame as image.png. `frames`: none |
    uint8 | float32. With sound: sound.wav (16-bit PCM) always, and with frames=float32 sound.safetensors
    (`waveform` [channels, samples] float32, the decoder's output exactly). An action task that generates actions
    (policy, inverse dynamics): actions.safetensors (`actions` [chunk_size, raw_dim] float32, the domain's channels).
    """

    def __init__(self, out_dir: Path, frames: str = "none", image: bool = False, sink: FrameSink | None = None):
        self.out_dir = Path(out_dir)
        self.frames, self.image, self.sink = frames, image, sink

    def __call__(self, state: State) -> State:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.sink is not None:
            state.outputs["video"] = self.sink.finish()
            state.metrics["video_encoder"] = self.sink.timings  # seconds since the encoder opened (decode start)
        elif self.image:
            state.outputs["image"] = atomic_write(
                self.out_dir / "image.png", lambda p: write_png(state.frames_uint8[0], p)
            )
        if self.frames != "none":
            frames = state.frames_float if self.frames == "float32" else state.frames_uint8
            state.outputs["frames"] = atomic_write(
                self.out_dir / "frames.safetensors",
                lambda p: save_file({"frames": frames.contiguous()}, str(p), metadata={"sha256_uint8": state.sha256}),
            )
        if state.waveform is not None:
            state.outputs["sound"] = atomic_write(
                self.out_dir / "sound.wav", lambda p: write_wav(state.waveform, state.sampling_rate, p))
            if self.frames == "float32":
                state.outputs["waveform"] = atomic_write(
                    self.out_dir / "sound.safetensors",
                    lambda p: save_file({"waveform": state.waveform.contiguous()}, str(p),
                                        metadata={"sampling_rate": str(state.sampling_rate)}))
        spec = state.request.action if state.request is not None else None
        if spec is not None and spec.writes_actions and state.action_latents is not None:
            actions = state.action_latents[:, : spec.raw_dim].float().cpu().contiguous()
            state.outputs["actions"] = atomic_write(
                self.out_dir / "actions.safetensors",
                lambda p: save_file({"actions": actions}, str(p),
                                    metadata={"mode": spec.mode, "domain": spec.domain}))
        state.metrics["sha256"] = state.sha256
        state.metrics["outputs"] = {k: str(v) for k, v in state.outputs.items()}
        return state
