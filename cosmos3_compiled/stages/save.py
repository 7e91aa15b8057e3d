"""Stage: write video.mp4 (or image.png), frames.safetensors and metrics.json, each atomically.

video.mp4 is normally encoded while the VAE decodes (`VideoStream`, shared with Decode and Postprocess);
Save then only waits for the encoder's tail and renames the file into place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

from cosmos3_compiled.media import Mp4Writer, write_png
from cosmos3_compiled.postprocess import FrameStream, StreamHasher

from .state import Components, State


def partial_path(path: Path) -> Path:
    """The hidden temporary name in the same folder that `path` is written under before it is renamed."""
    return path.with_name(f".{path.name}.partial{path.suffix}")


def _publish(tmp: Path, path: Path) -> Path:
    os.chmod(tmp, 0o644)  # safetensors creates files 0600; outputs are meant to be shared
    os.replace(tmp, path)
    return path


def atomic_write(path: Path, write) -> Path:
    """Call write(tmp_path) on a hidden temporary name in the same folder, then rename into place."""
    tmp = partial_path(path)
    try:
        write(tmp)
        _publish(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


class VideoStream:
    """video.mp4 encoded while the VAE decodes: Save owns it, Decode and Postprocess are given it too.

    Decode calls `start` with the video it is about to decode into and passes the callback it returns to
    `WanVAE.decode_frames` as `on_frames`; each finished range of frames becomes uint8 on the host
    (`postprocess.FrameStream`, without stalling the decode) and goes to an `Mp4Writer` thread writing the
    temporary file `partial_path(video.mp4)`. Postprocess takes `frames_uint8`; Save calls `finish`, which
    waits for the encoder's tail and renames the file into place, as `atomic_write` does. On any error a
    stage calls `abort` (`aborting` does it for a block): the encoder thread stops and the temporary file
    is deleted, so no video.mp4 appears.
    """

    def __init__(self, out_dir: Path, crf: int = 18, preset: str = "medium") -> None:
        self.path = Path(out_dir) / "video.mp4"
        self.crf, self.preset = crf, preset
        self._writer: Mp4Writer | None = None
        self._frames: FrameStream | None = None
        self._hasher: StreamHasher | None = None
        self.timings: dict[str, float] = {}  # the finished encoder's (Mp4Writer.timings)

    def start(self, video: torch.Tensor, fps: float) -> Callable[[int, int], None]:
        """Open the encoder for `video` [1, 3, F, H, W] (about to be decoded) → the `on_frames` callback."""
        if self._writer is not None:
            raise RuntimeError(f"{self.path}: the video stream was already started")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _, _, _, h, w = video.shape
        self._writer = Mp4Writer(partial_path(self.path), w, h, fps, self.crf, self.preset)
        self._hasher = StreamHasher()
        self._frames = FrameStream(video, self._hand_over)
        return self._frames

    def _hand_over(self, frames: torch.Tensor, ready) -> None:
        self._writer.write(frames, ready)
        self._hasher(frames, ready)

    def sha256(self) -> str:
        """sha256 of the uint8 frames' bytes (what hashing `frames_uint8()` gives), computed as they arrived."""
        self._check_started()
        with self.aborting():
            digest = self._hasher.hexdigest()
        self._hasher = None
        return digest

    def frames_uint8(self) -> torch.Tensor:
        """The uint8 frames [F, H, W, 3] on the host (what `to_uint8_frames(video).cpu()` gives), once the
        decode has handed over every frame; waits for the last copy. Call once: the stream then lets go of
        the decoded video, as Postprocess does."""
        self._check_started()
        frames, self._frames = self._frames.result(), None
        return frames

    def finish(self) -> Path:
        """Wait for the encoder to finish the file, then rename it to video.mp4 (deleted on any error)."""
        self._check_started()
        with self.aborting():
            self._writer.close()
            _publish(self._writer.path, self.path)
        self.timings = dict(self._writer.timings)
        self._writer = None
        if self._hasher is not None:  # nobody asked for the digest: stop its thread
            self._hasher.abort()
            self._hasher = None
        return self.path

    def abort(self) -> None:
        """Stop the encoder thread and delete the temporary file (nothing to do when never started or
        already finished)."""
        if self._writer is not None:
            self._writer.abort()
            self._writer, self._frames = None, None
        if self._hasher is not None:
            self._hasher.abort()
            self._hasher = None
        partial_path(self.path).unlink(missing_ok=True)

    def _check_started(self) -> None:
        if self._writer is None:
            raise RuntimeError(f"{self.path}: the video stream was not started (give Save.stream to Decode)")

    @contextmanager
    def aborting(self) -> Iterator[None]:
        """Run a block; if it raises (an error, KeyboardInterrupt), abort the stream and re-raise."""
        try:
            yield
        except BaseException:
            self.abort()
            raise


class Save:
    """Reads frames_uint8, frames_float, sha256, metrics; writes outputs (name → path).

    A video (num_frames > 1) is encoded during the decode through `self.stream`: the rank that writes gives it
    to Decode and Postprocess. One frame is written as image.png here.
    """

    def __init__(self, components: Components, out_dir: Path, frames: str = "none", video: bool = True,
                 crf: int = 18, preset: str = "medium", num_frames: int = 1):
        self.out_dir = Path(out_dir)
        self.frames, self.video = frames, video
        self.stream = VideoStream(self.out_dir, crf, preset) if video and num_frames > 1 else None

    def __call__(self, state: State) -> State:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.stream is not None:
            state.outputs["video"] = self.stream.finish()
            state.metrics["video_encoder"] = self.stream.timings  # seconds since the encoder opened (decode start)
        elif self.video:
            state.outputs["image"] = atomic_write(
                self.out_dir / "image.png", lambda p: write_png(state.frames_uint8[0], p)
            )
        if self.frames != "none":
            frames = state.frames_float if self.frames == "float32" else state.frames_uint8
            state.outputs["frames"] = atomic_write(
                self.out_dir / "frames.safetensors",
                lambda p: save_file({"frames": frames.contiguous()}, str(p), metadata={"sha256_uint8": state.sha256}),
            )
        state.metrics["sha256"] = state.sha256
        state.metrics["outputs"] = {k: str(v) for k, v in state.outputs.items()}
        return state


def write_metrics(state: State, out_dir: Path) -> Path:
    path = Path(out_dir) / "metrics.json"
    return atomic_write(path, lambda p: p.write_text(json.dumps(state.metrics, indent=2, default=str) + "\n"))
