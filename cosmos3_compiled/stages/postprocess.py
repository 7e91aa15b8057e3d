"""Stage: video → uint8 frames on the device (only uint8 crosses to the host), sha256, optional float frames."""

from __future__ import annotations

import hashlib
from contextlib import nullcontext

from cosmos3_compiled.postprocess import to_float_frames, to_uint8_frames

from .save import VideoStream
from .state import Components, State


class Postprocess:
    """Reads video; writes frames_uint8, sha256, frames_float (when `keep_float`); drops video.

    With `stream` (Save's `VideoStream`) the uint8 frames were already made and copied to the host during the
    decode: they are taken from the stream (same values, see `postprocess.FrameStream`)."""

    def __init__(self, components: Components, keep_float: bool = False, stream: VideoStream | None = None):
        self.keep_float = keep_float
        self.stream = stream

    def __call__(self, state: State) -> State:
        with nullcontext() if self.stream is None else self.stream.aborting():
            if self.stream is None:
                state.frames_uint8 = to_uint8_frames(state.video).cpu()
                state.sha256 = hashlib.sha256(state.frames_uint8.numpy().data).hexdigest()
            else:  # made, copied and hashed range by range during the decode
                state.frames_uint8 = self.stream.frames_uint8()
                state.sha256 = self.stream.sha256()
            if self.keep_float:
                state.frames_float = to_float_frames(state.video).cpu()
            state.video = None
        return state
