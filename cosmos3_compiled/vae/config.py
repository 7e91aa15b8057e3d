"""The Wan2.2 VAE's configuration: diffusers' `vae/config.json` keys, validated into `VAEConfig`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

from cosmos3_compiled.checkpoint_io import CheckpointError


@dataclass(frozen=True)
class VAEConfig:
    """The subset of `vae/config.json` the Wan2.2 VAE uses; `from_dict` validates it."""

    base_dim: int
    decoder_base_dim: int
    z_dim: int
    dim_mult: tuple[int, ...]
    num_res_blocks: int
    temporal_downsample: tuple[bool, ...]
    patch_size: int
    in_channels: int
    out_channels: int
    latents_mean: tuple[float, ...]
    latents_std: tuple[float, ...]
    scale_factor_spatial: int
    scale_factor_temporal: int

    @property
    def temporal_upsample(self) -> tuple[bool, ...]:
        return self.temporal_downsample[::-1]

    @classmethod
    def from_dict(cls, raw: dict, where: str = "vae/config.json") -> "VAEConfig":
        def fail(msg: str) -> NoReturn:
            raise CheckpointError(f"{where}: {msg}")

        name = raw.get("_class_name", "AutoencoderKLWan")
        if name != "AutoencoderKLWan":
            fail(f"_class_name is {name!r}; expected 'AutoencoderKLWan' (the Wan2.2 VAE)")
        if raw.get("is_residual") is not True:
            fail(f"is_residual={raw.get('is_residual')!r}: only the Wan2.2 residual VAE (is_residual=true) is "
                 "supported, not the Wan2.1 VAE")

        def is_pos_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        def pos_int(key: str, default=None) -> int:
            v = raw.get(key, default)
            if not is_pos_int(v):
                fail(f"{key} must be a positive integer, got {v!r}")
            return v

        base_dim = pos_int("base_dim")
        dec_dim = base_dim if raw.get("decoder_base_dim") is None else pos_int("decoder_base_dim")
        z_dim = pos_int("z_dim")
        num_res_blocks = pos_int("num_res_blocks", 2)
        patch = raw.get("patch_size")
        if patch != 2:
            fail(f"patch_size={patch!r}: only patch_size 2 (Wan2.2) is supported")
        dim_mult = raw.get("dim_mult", [1, 2, 4, 4])
        if not (isinstance(dim_mult, list) and len(dim_mult) >= 2 and all(map(is_pos_int, dim_mult))):
            fail(f"dim_mult must be a list of >= 2 positive integers, got {dim_mult!r}")
        tdown = raw.get("temperal_downsample", [False, True, True])
        if not (isinstance(tdown, list) and len(tdown) == len(dim_mult) - 1 and all(isinstance(b, bool) for b in tdown)):
            fail(f"temperal_downsample must be {len(dim_mult) - 1} booleans (one per down stage), got {tdown!r}")
        if raw.get("attn_scales", []) not in ([], None):
            fail(f"attn_scales={raw['attn_scales']!r}: attention outside the middle block is not supported")
        io = 3 * patch * patch
        for key in ("in_channels", "out_channels"):
            if raw.get(key) != io:
                fail(f"{key}={raw.get(key)!r}; with patch_size {patch} it must be {io} (3 colours x {patch}x{patch})")
        stats = {}
        for key in ("latents_mean", "latents_std"):
            v = raw.get(key)
            if not (isinstance(v, list) and len(v) == z_dim and all(isinstance(s, (int, float)) for s in v)):
                got = f"a list of {len(v)}" if isinstance(v, list) else repr(v)
                fail(f"{key} must be a list of z_dim={z_dim} numbers, got {got}")
            stats[key] = tuple(float(s) for s in v)
        if not all(s > 0 for s in stats["latents_std"]):
            fail("latents_std must be positive everywhere")
        spatial = patch * 2 ** (len(dim_mult) - 1)
        temporal = 2 ** sum(tdown)
        for key, derived in (("scale_factor_spatial", spatial), ("scale_factor_temporal", temporal)):
            if raw.get(key, derived) != derived:
                fail(f"{key}={raw[key]!r} but the architecture gives {derived}")
        return cls(
            base_dim=base_dim, decoder_base_dim=dec_dim, z_dim=z_dim, dim_mult=tuple(dim_mult),
            num_res_blocks=num_res_blocks, temporal_downsample=tuple(tdown), patch_size=patch,
            in_channels=io, out_channels=io, scale_factor_spatial=spatial, scale_factor_temporal=temporal, **stats,
        )


def wan22_config(**overrides) -> dict:
    """The Wan2.2 VAE architecture in diffusers' config keys (latents_mean/std not included); overrides
    change widths for tiny test or demo models. The one place these keys are spelled out."""
    arch = dict(
        base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
        temperal_downsample=[False, True, True], is_residual=True, patch_size=2, in_channels=12, out_channels=12,
        scale_factor_spatial=16, scale_factor_temporal=4,
    )
    return {**arch, **overrides}
