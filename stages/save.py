"""Stage: write video.mp4 (or image.png), frames.safetensors and metrics.json, each atomically."""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file

from cosmos3_compiled.media import write_mp4, write_png

from .state import Components, State


def atomic_write(path: Path, write) -> Path:
    """Call write(tmp_path) on a hidden temporary name in the same folder, then rename into place."""
    tmp = path.with_name(f".{path.name}.partial{path.suffix}")
    try:
        write(tmp)
        os.chmod(tmp, 0o644)  # safetensors creates files 0600; outputs are meant to be shared
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


class Save:
    """Reads frames_uint8, frames_float, sha256, metrics; writes outputs (name → path)."""

    def __init__(self, components: Components, out_dir: Path, frames: str = "none", video: bool = True,
                 crf: int = 18):
        self.out_dir = Path(out_dir)
        self.frames, self.video, self.crf = frames, video, crf

    def __call__(self, state: State) -> State:
        r = state.request
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.video:
            if r.num_frames == 1:
                state.outputs["image"] = atomic_write(
                    self.out_dir / "image.png", lambda p: write_png(state.frames_uint8[0], p)
                )
            else:
                state.outputs["video"] = atomic_write(
                    self.out_dir / "video.mp4", lambda p: write_mp4(state.frames_uint8, p, fps=r.fps, crf=self.crf)
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
