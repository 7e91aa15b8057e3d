"""Stage: video → uint8 frames on the device (only uint8 crosses to the host), sha256, optional float frames."""

from __future__ import annotations

import hashlib
from contextlib import nullcontext

from cosmos3_compiled.frame_sink import FrameSink
from cosmos3_compiled.postprocess import to_float_frames, to_uint8_frames

from .state import State


class Postprocess:
    """Reads video; writes frames_uint8, sha256, frames_float (when `keep_float`); drops video.

    With a `sink` the uint8 frames were already made, copied and hashed during the decode: they are taken from
    it (same values, see `postprocess.FrameStream`)."""

    def __init__(self, keep_float: bool = False, sink: FrameSink | None = None):
        self.keep_float, self.sink = keep_float, sink

    def __call__(self, state: State) -> State:
        with nullcontext() if self.sink is None else self.sink.aborting():
            if self.sink is None:
                state.frames_uint8 = to_uint8_frames(state.video).cpu()
                state.sha256 = hashlib.sha256(state.frames_uint8.numpy().data).hexdigest()
            else:
                state.frames_uint8 = self.sink.frames_uint8()
                state.sha256 = self.sink.sha256()
            if self.keep_float:
                state.frames_float = to_float_frames(state.video).cpu()
            state.video = None
        return state
