"""Action-conditioned generation (the world model's three action tasks), request side and conditioning tensors.

`forward_dynamics`: the first frame and every action are clean, the video is generated. `policy`: the first frame
is clean, video and actions are generated. `inverse_dynamics`: the whole clip is clean, the actions are generated.
The clip has `chunk_size + 1` frames, its size comes from the resolution tier (the canvas of the nearest aspect
ratio): the source is downscaled (never up) into the canvas and padded right and bottom, encoded at the canvas
size, and the latent is cropped back to the content. The actions are `[chunk_size, action_dim]`: a short sequence
repeats its last action, channels past the domain's width are zero (in the noise, the velocity and after every
step). The prompt becomes the structured JSON caption the action model was trained on; the negative prompt is
used as given. Tables and rules are diffusers 0.42.1's (`pipeline_cosmos3_omni.py`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

MODES = ("forward_dynamics", "policy", "inverse_dynamics")

# embodiment name → the row of the domain-aware projections
DOMAIN_IDS = {
    "no_action": 0, "av": 1, "camera_pose": 2, "hand_pose": 3, "pusht": 4, "libero": 5, "umi": 6,
    "bridge_orig_lerobot": 7, "droid_lerobot": 8, "robomind-franka": 8, "galbot": 9, "robomind-franka-dual": 12,
    "robomind-ur": 13, "agibotworld": 15, "agibot_gear_gripper": 15, "agibot_gear_gripper_ext": 15, "fractal": 20,
}

# embodiment name → its action width (pose 9 = translation 3 + rotation 6, gripper 1, fingertips 15); domains
# without a fixed width (no_action, libero) cannot run an action task
RAW_DIMS = {
    "av": 9, "camera_pose": 9, "pusht": 2, "umi": 10, "bridge_orig_lerobot": 10, "droid_lerobot": 10,
    "robomind-franka": 10, "robomind-franka-dual": 20, "robomind-ur": 10, "galbot": 30, "agibotworld": 29,
    "agibot_gear_gripper": 29, "agibot_gear_gripper_ext": 29, "fractal": 10, "hand_pose": 57,
}

# resolution tier → {height/width ratio: (canvas height, canvas width)}
TIERS = {
    256: {1.0: (256, 256), 0.8: (256, 320), 1.25: (320, 256), 0.6: (192, 320), 1.6666666666666667: (320, 192)},
    480: {1.0: (640, 640), 0.7391304347826086: (544, 736), 1.3529411764705883: (736, 544),
          0.5769230769230769: (480, 832), 1.7333333333333334: (832, 480)},
    704: {1.0: (960, 960), 0.7647058823529411: (832, 1088), 1.3076923076923077: (1088, 832),
          0.55: (704, 1280), 1.8181818181818181: (1280, 704)},
    720: {1.0: (960, 960), 0.7536231884057971: (832, 1104), 1.3269230769230769: (1104, 832),
          0.5625: (720, 1280), 1.7777777777777777: (1280, 720)},
}

# camera viewpoint → the caption's cinematography.framing sentence (verbatim: the model was trained on these)
VIEW_POINTS = {
    "ego_view": "This video is captured from a first-person perspective looking at the scene.",
    "third_person_view": "This video is captured from a third-person perspective looking towards the agent from the "
                         "front.",
    "wrist_view": "This video is captured from a wrist-mounted camera.",
    "concat_view": "This video contains concatenated views from multiple camera perspectives.",
}

SPATIAL = 16  # VAE spatial compression
TEMPORAL = 4  # VAE temporal compression


@dataclass(frozen=True)
class ActionSpec:
    """One action request, checked (`request.check_action`). `canvas`: the tier's (height, width) the clip is
    padded to and the caption names; `content`: the downscaled source inside it; `actions`: forward dynamics'
    `[n, raw_dim]` fp32 (CPU) as read."""

    mode: str
    domain: str
    chunk_size: int
    raw_dim: int
    action_dim: int
    canvas: tuple[int, int]
    content: tuple[int, int]
    view_point: str = "ego_view"
    actions: torch.Tensor | None = None

    @property
    def domain_id(self) -> int:
        return DOMAIN_IDS[self.domain]

    @property
    def num_frames(self) -> int:
        return self.chunk_size + 1

    @property
    def latent_hw(self) -> tuple[int, int]:
        """The latent cropped to the content (at least one row and column)."""
        return max(self.content[0] // SPATIAL, 1), max(self.content[1] // SPATIAL, 1)

    @property
    def latent_frames(self) -> int:
        return (self.num_frames - 1) // TEMPORAL + 1

    @property
    def clean_frames(self) -> tuple[int, ...]:
        """Latent frames kept clean: every one in inverse dynamics, frame 0 otherwise."""
        return tuple(range(self.latent_frames)) if self.mode == "inverse_dynamics" else (0,)

    @property
    def actions_clean(self) -> bool:
        """Forward dynamics: the given actions are clean, never stepped."""
        return self.mode == "forward_dynamics"

    @property
    def writes_actions(self) -> bool:
        return self.mode != "forward_dynamics"

    @property
    def encoded_frames(self) -> int:
        """Pixel frames the VAE encodes: the causal encoder's clean latent frames depend on these and no later
        ones (frame 0 alone, or the whole clip for inverse dynamics)."""
        return self.num_frames if self.mode == "inverse_dynamics" else 1


def canvas_size(height: int, width: int, tier: int) -> tuple[int, int]:
    """The tier's canvas whose height/width ratio is nearest the source's (the first nearest on a tie)."""
    ratio = float(height / width)
    key = min(TIERS[tier], key=lambda r: abs(r - ratio))
    return TIERS[tier][key]


def source_size(height: int, width: int) -> tuple[int, int]:
    """A source frame's size after the reference's preprocessing: each side rounded down to a multiple of 16."""
    return height - height % SPATIAL, width - width % SPATIAL


def content_size(frame_hw: tuple[int, int], canvas: tuple[int, int]) -> tuple[int, int]:
    """The source downscaled (never upscaled) to fit the canvas, rounded half up, at least 1 × 1."""
    (fh, fw), (th, tw) = frame_hw, canvas
    scale = min(tw / fw, th / fh, 1.0)
    return max(1, int(scale * fh + 0.5)), max(1, int(scale * fw + 0.5))


def fit_clip(clip: torch.Tensor, frames: int, canvas: tuple[int, int]) -> torch.Tensor:
    """[1, 3, n, h, w] in [-1, 1] → [1, 3, frames, H, W] on the canvas: the last frame repeated (or the clip cut) to
    `frames`, downscaled by antialiased bicubic to the content size, padded right and bottom (reflected, or
    replicated where the pad is as large as the content)."""
    n = clip.shape[2]
    clip = clip[:, :, :frames] if n >= frames else torch.cat(
        [clip, clip[:, :, -1:].expand(-1, -1, frames - n, -1, -1)], dim=2)
    _, c, t, fh, fw = clip.shape
    ch, cw = content_size((fh, fw), canvas)
    x = clip.permute(0, 2, 1, 3, 4).reshape(t, c, fh, fw)
    if (ch, cw) != (fh, fw):
        x = F.interpolate(x, size=(ch, cw), mode="bicubic", align_corners=False, antialias=True)
    pad_h, pad_w = canvas[0] - ch, canvas[1] - cw
    if pad_h or pad_w:
        mode = "replicate" if pad_w >= cw or pad_h >= ch else "reflect"
        x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
    return x.reshape(1, t, c, *canvas).permute(0, 2, 1, 3, 4)


def crop_latent(latent: torch.Tensor, spec: ActionSpec) -> torch.Tensor:
    """[1, C, T, H/16, W/16] of the canvas → the content's latent rows and columns."""
    h, w = spec.latent_hw
    return latent[:, :, :, :h, :w].contiguous()


def pad_actions(actions: torch.Tensor, chunk_size: int, action_dim: int) -> torch.Tensor:
    """[n, raw_dim] → [chunk_size, action_dim]: the last action repeated (or the sequence cut) to chunk_size rows,
    channels zero-padded to action_dim."""
    n = actions.shape[0]
    if n < chunk_size:
        actions = torch.cat([actions, actions[-1:].expand(chunk_size - n, -1)])
    actions = actions[:chunk_size]
    return F.pad(actions, (0, action_dim - actions.shape[1]))


def json_prompt(description: str, *, view_point: str | None, num_frames: int, fps: float, height: int,
                width: int) -> str:
    """The structured caption the action model was trained on (a JSON string): framing, one action spanning the
    clip, duration, fps, canvas resolution and the nearest of five aspect ratios."""
    seconds = num_frames / fps if fps > 0 else 0.0
    finite = seconds >= 0 and math.isfinite(seconds)
    whole, end = (int(seconds), round(seconds)) if finite else (0, 0)
    minutes, secs = divmod(end, 60)
    text = description.strip()
    if text and not text.endswith((".", "!", "?")):
        text += "."
    caption: dict = {}
    framing = VIEW_POINTS.get(view_point) if view_point is not None else None
    if framing:
        caption["cinematography"] = {"framing": framing}
    ratio = width / height if height > 0 else 1.0
    aspect = min(("1,1", "4,3", "3,4", "16,9", "9,16"),
                 key=lambda r: abs(int(r.split(",")[0]) / int(r.split(",")[1]) - ratio))
    caption["actions"] = [{"time": f"0:00-{minutes}:{secs:02d}", "description": text}]
    caption["duration"] = f"{whole}s"
    caption["fps"] = float(fps)
    caption["resolution"] = {"H": int(height), "W": int(width)}
    caption["aspect_ratio"] = aspect
    return json.dumps(caption)


def initial_actions(spec: ActionSpec, gen: torch.Generator) -> torch.Tensor:
    """The action segment's starting latents [chunk_size, action_dim] fp32 (CPU): the padded given actions for
    forward dynamics, noise otherwise; the noise is drawn from `gen` in every mode (after the vision and sound
    noise, as the reference draws it) and the padding channels are zero."""
    shape = (spec.chunk_size, spec.action_dim)
    noise = torch.randn(shape, generator=gen, dtype=torch.float32)
    if spec.actions_clean:
        x = pad_actions(spec.actions.float(), spec.chunk_size, spec.action_dim)
    else:
        x = noise
    x = x.clone()
    x[:, spec.raw_dim:] = 0
    return x
