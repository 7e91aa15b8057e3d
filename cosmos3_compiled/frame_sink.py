"""Where the decoded frames go: uint8 on the device, sha256 and libx264 while the VAE decodes; atomic writes.

`FrameSink` is a component the pipeline builds (on the rank that writes) and hands to the Decode, Postprocess
and Save stages; `atomic_write` writes any output under a hidden temporary name and renames it when complete.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from .media import Mp4Writer
from .postprocess import FrameStream, StreamHasher


def partial_path(path: Path) -> Path:
    """The hidden temporary name in the same folder that `path` is written under before it is renamed."""
    return path.with_name(f".{path.name}.partial{path.suffix}")


def publish(tmp: Path, path: Path) -> Path:
    """Rename a finished temporary file into place, readable by others (safetensors creates files 0600)."""
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def atomic_write(path: Path, write: Callable[[Path], object]) -> Path:
    """Call write(tmp_path) on a hidden temporary name in the same folder, then rename into place."""
    tmp = partial_path(path)
    try:
        write(tmp)
        publish(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_metrics(metrics: dict, out_dir: Path) -> Path:
    return atomic_write(Path(out_dir) / "metrics.json",
                        lambda p: p.write_text(json.dumps(metrics, indent=2, default=str) + "\n"))


class FrameSink:
    """video.mp4 encoded while the VAE decodes.

    The decoder calls `start` with the video tensor it is about to fill and passes the callback it returns to
    `WanVAE.decode_frames` as `on_frames`; each finished range of frames becomes uint8 on the host
    (`postprocess.FrameStream`, without stalling the decode), is hashed, and goes to an `Mp4Writer` thread
    writing `partial_path(video.mp4)`. Afterwards `frames_uint8` and `sha256` hand over what was made, and
    `finish` waits for the encoder's tail and renames the file into place. On any error `abort` (`aborting`
    does it for a block) stops the threads and deletes the temporary file, so no video.mp4 appears.
    """

    def __init__(self, out_dir: Path, crf: int = 18, preset: str = "medium") -> None:
        self.path = Path(out_dir) / "video.mp4"
        self.crf, self.preset = crf, preset
        self._writer: Mp4Writer | None = None
        self._frames: FrameStream | None = None
        self._hasher: StreamHasher | None = None
        self.timings: dict[str, float] = {}  # the finished encoder's (Mp4Writer.timings)

    def start(self, video: torch.Tensor, fps: float, audio: tuple[torch.Tensor, int] | None = None
              ) -> Callable[[int, int], None]:
        """Open the encoder for `video` [1, 3, F, H, W] (about to be decoded) → the `on_frames` callback.
        `audio`: (waveform [channels, samples] fp32 on the host, sampling rate), muxed as an AAC track."""
        if self._writer is not None:
            raise RuntimeError(f"{self.path}: the frame sink was already started")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _, _, _, h, w = video.shape
        self._writer = Mp4Writer(partial_path(self.path), w, h, fps, self.crf, self.preset, audio=audio)
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
        decode has handed over every frame; waits for the last copy. Call once: the sink then lets go of the
        decoded video."""
        self._check_started()
        frames, self._frames = self._frames.result(), None
        return frames

    def finish(self) -> Path:
        """Wait for the encoder to finish the file, then rename it to video.mp4 (deleted on any error)."""
        self._check_started()
        with self.aborting():
            self._writer.close()
            publish(self._writer.path, self.path)
        self.timings = dict(self._writer.timings)
        self._writer = None
        if self._hasher is not None:  # nobody asked for the digest: stop its thread
            self._hasher.abort()
            self._hasher = None
        return self.path

    def abort(self) -> None:
        """Stop the encoder and hasher threads and delete the temporary file (a no-op when never started or
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
            raise RuntimeError(f"{self.path}: the frame sink was not started (the decode stage starts it)")

    @contextmanager
    def aborting(self) -> Iterator[None]:
        """Run a block; if it raises (an error, KeyboardInterrupt), abort the sink and re-raise."""
        try:
            yield
        except BaseException:
            self.abort()
            raise
