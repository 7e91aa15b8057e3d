"""Stage: initial latents, drawn exactly as the reference draws them; image-to-video keeps frame 0 clean,
video-to-video the clip's encoded `condition_frames`."""

from __future__ import annotations

import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cosmos3_compiled import action as action_mod
from cosmos3_compiled.media import read_clip
from cosmos3_compiled.vae import WanVAE

from .state import State


def load_conditioning_image(path, height: int, width: int) -> torch.Tensor:
    """Image file → [1, 3, H, W] in [-1, 1]: aspect-preserving antialiased resize to cover, centre crop."""
    with Image.open(path) as im:
        rgb = np.array(im.convert("RGB"), copy=True)
    x = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).float()  # [1, 3, h, w] in 0..255
    sh, sw = x.shape[-2:]
    scale = max(width / sw, height / sh)
    rh, rw = math.ceil(scale * sh), math.ceil(scale * sw)
    x = F.interpolate(x, size=(rh, rw), mode="bilinear", align_corners=False, antialias=True)
    top, left = round((rh - height) / 2), round((rw - width) / 2)
    x = x[:, :, top : top + height, left : left + width]
    return x.round().clamp(0, 255) / 127.5 - 1.0


def clip_to_tensor(frames: list[Image.Image], height: int, width: int) -> torch.Tensor:
    """RGB frames → [1, 3, F, H, W] fp32 in [-1, 1], the way diffusers' `VideoProcessor.preprocess_video` treats
    Pillow frames: each stretched to width × height by Pillow's bilinear resize (no aspect-preserving crop, unlike
    the image path), scaled to [0, 1] in float32, then 2x − 1."""
    planes = [np.asarray(f.resize((width, height), resample=Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
              for f in frames]
    x = torch.from_numpy(np.stack(planes)).permute(3, 0, 1, 2).unsqueeze(0)  # [1, 3, F, H, W] in [0, 1]
    return 2.0 * x - 1.0


def pad_clip(clip: torch.Tensor, frames: int) -> torch.Tensor:
    """[1, 3, n, H, W] → [1, 3, frames, H, W]: the last frame repeated when the clip is shorter (as the reference
    fills the output clip's tail), cut when longer."""
    n = clip.shape[2]
    if n >= frames:
        return clip[:, :, :frames]
    return torch.cat([clip, clip[:, :, -1:].expand(-1, -1, frames - n, -1, -1)], dim=2)


class Latents:
    """Reads request; writes latents [1, channels, T, h, w] fp32 on `device` (the VAE encodes the image or
    the clip's conditioning frames), metrics["conditioning"] in video-to-video; with sound (`request.sound_len`),
    sound_latents [sound_channels, S]: pure noise drawn from the same generator right after the vision noise, as the
    reference draws it; with an action task (`request.action`), its clean latent frames (the source fitted into the
    tier's canvas, encoded, cropped to the content) and action_latents [chunk_size, action_dim] (drawn after the
    other noise), metrics["conditioning"]."""

    def __init__(self, vae: WanVAE, channels: int, device: torch.device, sound_channels: int = 0):
        self.vae, self.channels, self.device = vae, channels, device
        self.sound_channels = sound_channels

    def __call__(self, state: State) -> State:
        r = state.request
        gen = torch.Generator("cpu").manual_seed(r.seed)
        noise = torch.randn((1, self.channels, *r.latent_shape), generator=gen, dtype=torch.float32)
        latents = noise.to(self.device)
        if r.sound_len:
            sound = torch.randn((self.sound_channels, r.sound_len), generator=gen, dtype=torch.float32)
            state.sound_latents = sound.to(self.device)
        if r.image_to_video:
            # The causal encoder's first latent frame depends on pixel frame 0 alone, so encoding the
            # image as a one-frame video gives exactly the reference's frame-0 latent.
            image = load_conditioning_image(r.image, r.height, r.width).to(self.device, self.vae.dtype)
            x0 = self.vae.encode_mode(image.unsqueeze(2)).float()  # [1, 48, 1, h, w]
            latents[:, :, :1] = x0
        elif r.video_to_video:
            state.metrics["conditioning"] = self.encode_clip(r, latents)
        if r.action is not None:
            state.metrics["conditioning"] = self.encode_action(r, latents)
            state.action_latents = action_mod.initial_actions(r.action, gen).to(self.device)
        state.latents = latents
        return state

    def encode_action(self, r, latents: torch.Tensor) -> dict:
        """Write an action task's clean latent frames into `latents`: the source's frames (each side rounded down
        to a multiple of 16 by the reference's bilinear resize) fitted into the canvas, encoded, cropped."""
        spec = r.action
        t0 = time.perf_counter()
        if r.action_source.is_file() and spec.mode != "inverse_dynamics" and _is_image(r.action_source):
            with Image.open(r.action_source) as im:
                frames = [im.convert("RGB")]
        else:
            frames = read_clip(r.action_source, spec.encoded_frames, "first")
        size = action_mod.source_size(frames[0].height, frames[0].width)
        clip = action_mod.fit_clip(clip_to_tensor(frames, *size), spec.encoded_frames, spec.canvas)
        t1 = time.perf_counter()
        x0 = action_mod.crop_latent(self.vae.encode_mode(clip.to(self.device, self.vae.dtype)).float(), spec)
        clean = list(spec.clean_frames)
        latents[:, :, clean] = x0[:, :, clean].to(latents.device)
        return {"mode": spec.mode, "domain": spec.domain, "canvas": list(spec.canvas), "content": list(spec.content),
                "source_frames_read": len(frames), "frames_encoded": spec.encoded_frames,
                "clean_latent_frames": clean, "read_s": t1 - t0, "encode_s": time.perf_counter() - t1}


    def encode_clip(self, r, latents: torch.Tensor) -> dict:
        """Write the clean latent frames of a video-to-video request into `latents`; returns what it did.

        The reference encodes the whole output-length clip (the kept frames, then the last one repeated); the
        encoder is causal, so its latent frames 0..max(condition_frames) depend on the first `r.clip_frames`
        pixel frames only, and those are all this encodes."""
        t0 = time.perf_counter()
        frames = read_clip(r.video, r.clip_frames, r.condition_keep)
        clip = pad_clip(clip_to_tensor(frames, r.height, r.width), r.clip_frames)
        t1 = time.perf_counter()
        x0 = self.vae.encode_mode(clip).float().to(self.device)  # [1, C, max + 1, h, w]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        clean = list(r.clean_frames)
        latents[:, :, clean] = x0[:, :, clean]
        return {"mode": "video_to_video", "source_frames_read": len(frames), "frames_encoded": r.clip_frames,
                "clean_latent_frames": clean, "read_s": t1 - t0, "encode_s": time.perf_counter() - t1}


def _is_image(path) -> bool:
    try:
        with Image.open(path):
            return True
    except Exception:
        return False
