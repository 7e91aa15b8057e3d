"""Stage: initial latents, drawn exactly as the reference draws them; image-to-video keeps frame 0 clean."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

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


class Latents:
    """Reads request; writes latents [1, channels, T, h, w] fp32 on `device` (the VAE encodes the image)."""

    def __init__(self, vae: WanVAE, channels: int, device: torch.device):
        self.vae, self.channels, self.device = vae, channels, device

    def __call__(self, state: State) -> State:
        r = state.request
        gen = torch.Generator("cpu").manual_seed(r.seed)
        noise = torch.randn((1, self.channels, *r.latent_shape), generator=gen, dtype=torch.float32)
        latents = noise.to(self.device)
        if r.image_to_video:
            # The causal encoder's first latent frame depends on pixel frame 0 alone, so encoding the
            # image as a one-frame video gives exactly the reference's frame-0 latent.
            image = load_conditioning_image(r.image, r.height, r.width).to(self.device, self.vae.dtype)
            x0 = self.vae.encode_mode(image.unsqueeze(2)).float()  # [1, 48, 1, h, w]
            latents[:, :, :1] = x0
        state.latents = latents
        return state
