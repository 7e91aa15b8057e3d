"""Stage: video → uint8 frames on the device (only uint8 crosses to the host), sha256, optional float frames."""

from __future__ import annotations

import hashlib

from cosmos3_compiled.postprocess import to_float_frames, to_uint8_frames

from .state import Components, State


class Postprocess:
    """Reads video; writes frames_uint8, sha256, frames_float (when `keep_float`); drops video."""

    def __init__(self, components: Components, keep_float: bool = False):
        self.keep_float = keep_float

    def __call__(self, state: State) -> State:
        state.frames_uint8 = to_uint8_frames(state.video).cpu()
        if self.keep_float:
            state.frames_float = to_float_frames(state.video).cpu()
        state.video = None
        state.sha256 = hashlib.sha256(state.frames_uint8.numpy().tobytes()).hexdigest()
        return state
