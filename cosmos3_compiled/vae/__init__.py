"""Wan2.2 video VAE (diffusers `AutoencoderKLWan` with `is_residual=True`), decode-first: `config` → `layers`
→ `decode` (the `WanVAE` driver and loading)."""

from cosmos3_compiled.vae.config import VAEConfig, wan22_config
from cosmos3_compiled.vae.decode import RowSplit, WanVAE, build_vae, load_vae
from cosmos3_compiled.vae.layers import Strip

__all__ = ["RowSplit", "Strip", "VAEConfig", "WanVAE", "build_vae", "load_vae", "wan22_config"]
