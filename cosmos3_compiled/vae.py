"""Wan2.2 video VAE (diffusers `AutoencoderKLWan` with `is_residual=True`), decode-first.

Reads as the data flows: config → layers → encoder → decoder → `WanVAE` (the driver) → `load_vae`.

Causal time handling. Every temporal convolution with kernel 3 sees the last two frames of its own
input from the previous chunk ("history"). Histories start as zeros, and after each call a layer keeps
the last two frames of `cat([history, input])`; this reproduces the reference's feature cache (whose
first-chunk `None` / "Rep" markers stand for exactly those zero frames) without any marker state.
Histories travel as a list of tensors in call order: a chunk function reads `prev[i]` for its i-th
causal conv and appends it to `nxt`. The first chunk allocates them; later chunks update them in
place, so a compiled chunk never holds two copies. No Python branch depends on tensor values, so each
chunk function traces with `torch.compile(fullgraph=True)`.

Decode: latent frame 0 is the "first chunk" (no temporal upsampling, 1 output frame); every later
latent frame gives `scale_factor_temporal` frames (4 for Wan2.2), so F = 1 + 4 (T - 1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NoReturn

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from cosmos3_compiled.checkpoint_io import CheckpointError, assign_strict, load_tensors, read_json, weight_files
from cosmos3_compiled.progress import progress

_HISTORY = 2  # frames of history a kernel-3 causal conv needs
_NORM_EPS = 1e-12  # F.normalize's floor on the channel norm


# --------------------------------------------------------------------------------------------- config


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
            fail(
                f"is_residual={raw.get('is_residual')!r}: only the Wan2.2 residual VAE (is_residual=true) is "
                "supported, not the Wan2.1 VAE"
            )

        def pos_int(key: str, default=None) -> int:
            v = raw.get(key, default)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                fail(f"{key} must be a positive integer, got {v!r}")
            return v

        base_dim = pos_int("base_dim")
        dec_dim = raw.get("decoder_base_dim")
        dec_dim = base_dim if dec_dim is None else pos_int("decoder_base_dim")
        z_dim = pos_int("z_dim")
        num_res_blocks = pos_int("num_res_blocks", 2)
        patch = raw.get("patch_size")
        if patch != 2:
            fail(f"patch_size={patch!r}: only patch_size 2 (Wan2.2) is supported")
        dim_mult = raw.get("dim_mult", [1, 2, 4, 4])
        if not isinstance(dim_mult, list) or len(dim_mult) < 2 or not all(
            isinstance(m, int) and not isinstance(m, bool) and m >= 1 for m in dim_mult
        ):
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
        if raw.get("scale_factor_spatial", spatial) != spatial:
            fail(f"scale_factor_spatial={raw['scale_factor_spatial']!r} but the architecture gives {spatial}")
        if raw.get("scale_factor_temporal", temporal) != temporal:
            fail(f"scale_factor_temporal={raw['scale_factor_temporal']!r} but the architecture gives {temporal}")
        return cls(
            base_dim=base_dim,
            decoder_base_dim=dec_dim,
            z_dim=z_dim,
            dim_mult=tuple(dim_mult),
            num_res_blocks=num_res_blocks,
            temporal_downsample=tuple(tdown),
            patch_size=patch,
            in_channels=io,
            out_channels=io,
            latents_mean=stats["latents_mean"],
            latents_std=stats["latents_std"],
            scale_factor_spatial=spatial,
            scale_factor_temporal=temporal,
        )


# --------------------------------------------------------------------------------------------- layers


def _pin_strides(x: Tensor, stride: tuple[int, ...]) -> Tensor:
    """Compiled: make inductor store x once, with exactly these strides (eager: x unchanged). The op is
    registered when torch.compile loads inductor (`apply_compile_vae` also imports it, not this module:
    importing it costs about a second at startup)."""
    if torch.compiler.is_compiling():
        return torch.ops.prims.inductor_force_stride_order(x, stride)
    return x


def _stored(x: Tensor) -> Tensor:
    """Compiled: store a block's output once, in its own layout, rather than let inductor inline the chain
    that makes it (conv output + bias + shortcut) into each reader. Inlined, the conv output and shortcut stay
    alive for every reader, and the next norm, reading too many buffers, gets its fp32 product stored in full
    (docs/benchmarks/wan22_vae_h100_20261126.md, "Fifth pass")."""
    return _pin_strides(x, x.stride())


def _channel_bias(bias: Tensor, ndim: int) -> Tensor:
    """A per-channel bias [C] shaped to broadcast over dim 1 of an ndim-d activation, in fp32."""
    return bias.float().view(-1, *([1] * (ndim - 2)))


def _finish(y: Tensor, *terms: Tensor) -> Tensor:
    """Sum a bias-free conv output and the given terms in fp32, round once to y's dtype.

    Every conv here runs without its bias; the bias joins the next pointwise step (this, or
    `_norm_silu`). That is where a compiled graph puts it anyway (inductor peels conv biases into the
    following kernel), so eager and compiled round at the same points: once per conv output and once per
    pointwise chain. In fp32 it is the reference's arithmetic; in bf16 it rounds less often than the
    reference's op-by-op chain, so it is also closer to the fp32 decode (docs/benchmarks/wan22_vae_*).
    """
    out = y.float()
    for t in terms:
        out = out + t
    return out.to(y.dtype)


def _biased(y: Tensor, conv: nn.Module) -> Tensor:
    """A bias-free conv output plus that conv's bias, summed in fp32 and rounded once (see `_finish`)."""
    return _finish(y, _channel_bias(conv.bias, y.ndim))


def _rms_norm_f32(x: Tensor, gamma: Tensor, scale: float, dim: int) -> Tensor:
    """x / max(||x||_dim, eps) · sqrt(C) · gamma, in fp32 (x already fp32)."""
    return x / torch.linalg.vector_norm(x, dim=dim, keepdim=True).clamp_min(_NORM_EPS) * scale * gamma.float()


class RMSNorm(nn.Module):
    """Channel RMS norm's learned gain (`gamma`, in the checkpoint's broadcast shape) and sqrt(C) scale; applied
    inside the fp32 epilogues (`_norm_silu`, `AttentionBlock`), so it has no forward of its own."""

    def __init__(self, dim: int, spatial_dims: int = 3) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.empty(dim, *([1] * spatial_dims)))
        self.scale = dim**0.5


def _norm_silu(x: Tensor, norm: RMSNorm, bias: Tensor | None = None) -> Tensor:
    """silu(norm(x + bias)) over the channels (dim 1), in fp32, rounded once to x's dtype.

    `bias` is the bias of the conv that produced x (see `_finish`).
    """
    xf = x.float() if bias is None else x.float() + _channel_bias(bias, x.ndim)
    return F.silu(_rms_norm_f32(xf, norm.gamma, norm.scale, dim=1)).to(x.dtype)


class CausalConv3d(nn.Module):
    """Conv3d, zero-padded in space and causal in time; kernel-3 layers carry a 2-frame history.

    Both `forward` and `pointwise` return the output *without* the bias; the caller adds `self.bias` in
    its fp32 epilogue (`_finish`, `_norm_silu`)."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int, int], stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cout, cin, *kernel))
        self.bias = nn.Parameter(torch.empty(cout))
        self.stride = stride
        self.spatial_pad = (0, kernel[1] // 2, kernel[2] // 2)
        self.memory_format = torch.contiguous_format

    def pointwise(self, x: Tensor) -> Tensor:
        """A 1×1×1 conv. Channels-last runs it as a matmul over the (innermost) channels: a 1×1×1 weight
        looks both contiguous and channels-last, and the compiler would settle its input on contiguous."""
        if self.memory_format == torch.channels_last_3d:
            y = F.linear(x.permute(0, 2, 3, 4, 1), self.weight.flatten(1))  # [B, T, H, W, Cout]
            return y.permute(0, 4, 1, 2, 3)
        return F.conv3d(x, self.weight)

    def forward(self, x: Tensor, prev: list[Tensor] | None, nxt: list[Tensor]) -> Tensor:
        """x: [B, Cin, t, H, W] → [B, Cout, t, H, W]; this layer's history is prev[len(nxt)], appended to nxt.

        First chunk (prev None): the history is zeros and a new one is allocated. Later chunks update
        the given history in place, so a chunk never holds an old and a new copy of all histories.
        """
        if prev is None:
            xin = F.pad(x, (0, 0, 0, 0, _HISTORY, 0))
            nxt.append(xin[:, :, -_HISTORY:].clone(memory_format=self.memory_format))
        else:
            hist = prev[len(nxt)]
            if torch.compiler.is_compiling():
                # One pointwise producer that also needs x: a cat would let inductor copy every layer's
                # history into its input buffer at the start of the graph, keeping all those buffers alive.
                xin = F.pad(hist, (0, 0, 0, 0, 0, x.shape[2])) + F.pad(x, (0, 0, 0, 0, _HISTORY, 0))
                # Fix xin's strides to the conv's layout now. Inductor lowers the history slice below before
                # the conv; left open, the slice would lay xin out in an order guessed from its inputs and the
                # conv would then need a second, channels-last copy of all three frames.
                xin = _pin_strides(xin, xin.contiguous(memory_format=self.memory_format).stride())
            else:
                xin = torch.cat([hist, x], dim=2)  # [B, Cin, 2 + t, H, W]
            hist.copy_(xin[:, :, -_HISTORY:])
            nxt.append(hist)
        return F.conv3d(xin, self.weight, None, self.stride, self.spatial_pad)


class _Slot1(nn.Module):
    """Holds a Conv2d under the name `1`, where the checkpoint keeps it (`resample.1.*`)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.add_module("1", conv)

    @property
    def conv(self) -> nn.Conv2d:
        return getattr(self, "1")


def _per_frame(x: Tensor, fn) -> Tensor:
    """Apply a 2D op to every frame of [B, C, T, H, W] (a view, not a copy, in channels_last_3d)."""
    b = x.shape[0]
    y = fn(rearrange(x, "b c t h w -> (b t) c h w"))
    return rearrange(y, "(b t) c h w -> b c t h w", b=b)


class ResidualBlock(nn.Module):
    """silu(norm) → causal conv, twice, plus a (1×1×1 conv when widths differ) shortcut."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm(cin)
        self.conv1 = CausalConv3d(cin, cout, (3, 3, 3))
        self.norm2 = RMSNorm(cout)
        self.conv2 = CausalConv3d(cout, cout, (3, 3, 3))
        self.conv_shortcut = CausalConv3d(cin, cout, (1, 1, 1)) if cin != cout else None

    def forward(
        self, x: Tensor, prev: list[Tensor] | None, nxt: list[Tensor], crop: tuple[int, int] | None = None
    ) -> Tensor:
        """`crop`: (left, right) columns to drop from the output (a column strip's halo, see `column_tiles`)."""
        y = self.conv1(_norm_silu(x, self.norm1), prev, nxt)
        y = self.conv2(_norm_silu(y, self.norm2, self.conv1.bias), prev, nxt)
        if crop is not None:
            y, x = _crop_columns(y, crop), _crop_columns(x, crop)
        terms = [_channel_bias(self.conv2.bias, y.ndim)]
        if self.conv_shortcut is None:
            terms.append(x.float())
        else:
            sc = self.conv_shortcut
            terms += [sc.pointwise(x).float(), _channel_bias(sc.bias, y.ndim)]
        return _stored(_finish(y, *terms))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame (middle block only)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, spatial_dims=2)
        self.to_qkv = nn.Conv2d(dim, 3 * dim, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: Tensor) -> Tensor:  # [B, C, T, H, W]
        b, c, t, h, w = x.shape
        tokens = rearrange(x, "b c t h w -> (b t) (h w) c")
        normed = _rms_norm_f32(tokens.float(), self.norm.gamma.view(c), self.norm.scale, dim=-1).to(x.dtype)
        qkv = F.linear(normed, self.to_qkv.weight.flatten(1))  # [(b t), h w, 3C], bias below
        qkv = (qkv.float() + self.to_qkv.bias.float()).to(x.dtype)
        q, k, v = qkv.unsqueeze(1).chunk(3, dim=-1)  # [(b t), 1, h w, C] each
        y = F.scaled_dot_product_attention(q, k, v).squeeze(1)
        y = F.linear(y, self.proj.weight.flatten(1)).float() + self.proj.bias.float()
        return (x.float() + rearrange(y, "(b t) (h w) c -> b c t h w", b=b, h=h)).to(x.dtype)


class MidBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])
        self.attentions = nn.ModuleList([AttentionBlock(dim)])

    def forward(self, x: Tensor, prev: list[Tensor] | None, nxt: list[Tensor]) -> Tensor:
        x = self.resnets[0](x, prev, nxt)
        x = self.attentions[0](x)
        return self.resnets[1](x, prev, nxt)


# -------------------------------------------------------------------------------------------- encoder


def _avg_down(x: Tensor, cout: int, ft: int, fs: int) -> Tensor:
    """Shortcut of a residual down block: fold (ft, fs, fs) into channels, then average groups of channels.

    Frames are zero-padded at the front to a multiple of ft (the first chunk of 1 frame).
    """
    pad = (ft - x.shape[2] % ft) % ft
    if pad:
        x = F.pad(x, (0, 0, 0, 0, pad, 0))
    x = rearrange(x, "b c (t a) (h p) (w q) -> b (c a p q) t h w", a=ft, p=fs, q=fs)
    return rearrange(x, "b (o g) t h w -> b o g t h w", o=cout).mean(dim=2)


class Downsample(nn.Module):
    """Zero-pad right/bottom, 3×3 stride-2 conv per frame; '3d' also halves time with a stride-2 causal conv."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = _Slot1(nn.Conv2d(dim, dim, 3, stride=2))
        self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: Tensor, prev: list[Tensor] | None, nxt: list[Tensor]) -> Tensor:
        conv = self.resample.conv
        x = _per_frame(x, lambda f: conv(F.pad(f, (0, 1, 0, 1))))
        if self.time_conv is None:
            return x
        # The time conv keeps one frame of history and is skipped on the first chunk (1 frame in, 1 out).
        tail = x[:, :, -1:].clone()
        if prev is not None:
            tc = self.time_conv
            x = F.conv3d(torch.cat([prev[len(nxt)], x], dim=2), tc.weight, tc.bias, tc.stride)
        nxt.append(tail)
        return x


class ResidualDownBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_res_blocks: int, temporal: bool, down: bool) -> None:
        super().__init__()
        self.cout, self.ft, self.fs = cout, (2 if temporal else 1), (2 if down else 1)
        if cin * self.ft * self.fs * self.fs % cout:
            raise CheckpointError(f"VAE down block {cin}->{cout}: channel widths do not divide the shortcut grouping")
        self.resnets = nn.ModuleList([ResidualBlock(cin if i == 0 else cout, cout) for i in range(num_res_blocks)])
        self.downsampler = Downsample(cout, temporal) if down else None

    def forward(self, x: Tensor, prev: list[Tensor] | None, nxt: list[Tensor]) -> Tensor:
        skip = _avg_down(x, self.cout, self.ft, self.fs)
        for resnet in self.resnets:
            x = resnet(x, prev, nxt)
        if self.downsampler is not None:
            x = self.downsampler(x, prev, nxt)
        return x.add_(skip)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        last = len(cfg.dim_mult) - 1
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], (3, 3, 3))
        self.down_blocks = nn.ModuleList(
            ResidualDownBlock(
                dims[i],
                dims[i + 1],
                cfg.num_res_blocks,
                temporal=i != last and cfg.temporal_downsample[i],
                down=i != last,
            )
            for i in range(len(cfg.dim_mult))
        )
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, (3, 3, 3))

    def forward(self, x: Tensor, prev: list[Tensor] | None, nxt: list[Tensor]) -> Tensor:
        x = _biased(self.conv_in(x, prev, nxt), self.conv_in)
        for block in self.down_blocks:
            x = block(x, prev, nxt)
        x = self.mid_block(x, prev, nxt)
        y = self.conv_out(_norm_silu(x, self.norm_out), prev, nxt)
        return _biased(y, self.conv_out)


# -------------------------------------------------------------------------------------------- decoder


def _add_dup_up_(x: Tensor, src: Tensor, ft: int, fs: int, sub: int) -> Tensor:
    """x += DupUp3D(src): channels of `src` repeated, then unfolded into (ft, fs, fs) sub-positions.

    Output channel o at sub-position s = (a, p, q) reads src channel (o·ft·fs² + s) // reps with
    reps = C_out·ft·fs² / C_in. x holds, for every src frame, the temporal sub-positions a = sub, sub + 1, …
    (x.shape[2] / src.shape[2] of them): all ft on a later chunk, the last one (sub = ft - 1) on the first
    chunk, one at a time when the tail runs per output frame. Eager: the two Wan2.2 cases are added in
    place through broadcast views (no temporary).
    """
    b, cout, _, _, _ = x.shape
    cin, t, h, w = src.shape[1:]
    fac = ft * fs * fs
    reps = cout * fac // cin
    na = x.shape[2] // t
    if torch.compiler.is_compiling():
        # Out of place, the repeat spelled out: inductor folds it into one pointwise add that keeps x's
        # layout (an add through split views would come back in the contiguous layout).
        if reps % fac == 0:  # every sub-position reads the same channel: `sub` is not needed (nor guarded on)
            rep = src.repeat_interleave(reps // fac, dim=1)[:, :, :, None, :, None, :, None]
            rep = rep.expand(b, cout, t, na, h, fs, w, fs)
        else:
            rep = rearrange(src.repeat_interleave(reps, dim=1), "b (o a p q) t h w -> b o t a h p w q", a=ft, p=fs, q=fs)
            rep = rep[:, :, :, sub : sub + na]
        return x + rep.reshape(b, cout, t * na, h * fs, w * fs)
    xv = x.view(b, cout, t, na, h, fs, w, fs)
    if reps % fac == 0:  # every src channel fills whole output channels
        k = reps // fac
        xv.view(b, cin, k, t, na, h, fs, w, fs).add_(src.view(b, cin, 1, t, 1, h, 1, w, 1))
    elif reps == fs:  # src channel o·ft·fs + a·fs + p, repeated over q
        s = src.view(b, cout, ft, fs, t, h, w)[:, :, sub : sub + na]
        xv.add_(s.permute(0, 1, 4, 2, 5, 3, 6).unsqueeze(-1))
    else:  # general case: materialise the repeat
        rep = rearrange(src.repeat_interleave(reps, dim=1), "b (o a p q) t h w -> b o t a h p w q", a=ft, p=fs, q=fs)
        xv.add_(rep[:, :, :, sub : sub + na])
    return x


def _subpixel_weights(weight: Tensor) -> Tensor:
    """Fold nearest ×2 upsampling into a 3×3 conv: four 2×2 kernels, one per output parity (a, b).

    Output row 2i + a of conv3x3(nearest2x(x)) reads x rows (i-1, i) with taps (w0, w1 + w2) when a = 0
    and rows (i, i+1) with taps (w0 + w1, w2) when a = 1; columns likewise. Returned as one conv of
    4·O outputs ordered (a, b, o), 2.25× fewer multiply-adds than convolving the upsampled frame.
    """
    w = weight.float()  # [O, C, 3, 3]

    def fold(k: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        t0, t1, t2 = k.unbind(dim)
        return torch.stack([t0, t1 + t2], dim), torch.stack([t0 + t1, t2], dim)

    kernels = [col for row in fold(w, 2) for col in fold(row, 3)]  # (a, b) = (0,0), (0,1), (1,0), (1,1)
    return torch.cat(kernels, 0).to(weight.dtype)  # [4O, C, 2, 2]; the bias is added after (see `_finish`)


class Upsample(nn.Module):
    """Nearest-exact ×2 in space + 3×3 conv per frame; '3d' first doubles time with a causal conv to 2C channels."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = _Slot1(nn.Conv2d(dim, dim, 3, padding=1))
        self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1)) if temporal else None
        # Set by WanVAE.apply_subpixel_upsample(); derived from the checkpoint, so never saved.
        self.register_buffer("subpixel_weight", None, persistent=False)

    def _upsample_conv(self, f: Tensor) -> Tensor:  # [N, C, H, W] → [N, O, 2H, 2W], without the bias
        conv = self.resample.conv
        if self.subpixel_weight is None:
            # Nearest-neighbour copies are exact in any dtype, so no fp32 round trip is needed.
            return F.conv2d(F.interpolate(f, scale_factor=2.0, mode="nearest-exact"), conv.weight, None, padding=1)
        n, _, h, w = f.shape
        o = self.subpixel_weight.shape[0] // 4
        # Padding 1 with a 2×2 kernel: parity (a, b) of output pixel (i, j) sits at (i + a, j + b).
        y = F.conv2d(f, self.subpixel_weight, None, padding=1).view(n, 2, 2, o, h + 1, w + 1)
        fmt = torch.channels_last if f.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format
        out = torch.empty((n, o, 2 * h, 2 * w), dtype=f.dtype, device=f.device, memory_format=fmt)
        grid = out.view(n, o, h, 2, w, 2)
        for a in (0, 1):
            for b in (0, 1):
                grid[:, :, :, a, :, b] = y[:, a, b, :, a : a + h, b : b + w]
        return out

    def time_up(self, x: Tensor, prev: list[Tensor] | None, nxt: list[Tensor], first: bool) -> Tensor:
        """'3d': the causal time conv to 2C channels, interleaved into twice the frames; '2d': x as is."""
        if self.time_conv is None:
            return x
        if first:  # frame 0 is not doubled; the time conv's history starts as zeros
            b, c, _, h, w = x.shape
            z = x.new_zeros(b, c, _HISTORY, h, w)
            nxt.append(z.contiguous(memory_format=self.time_conv.memory_format))
            return x
        y = self.time_conv(x, prev, nxt)  # [B, 2C, t, H, W]
        y = _biased(y, self.time_conv)
        return rearrange(y, "b (two c) t h w -> b c (t two) h w", two=2)

    def spatial(self, x: Tensor) -> Tensor:
        """Nearest ×2 + the 3×3 conv, frame by frame, without the conv's bias."""
        return _per_frame(x, self._upsample_conv)


class ResidualUpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_res_blocks: int, temporal: bool, up: bool) -> None:
        super().__init__()
        self.ft, self.fs, self.up = (2 if temporal else 1), 2, up
        if up and cout * self.ft * 4 % cin:
            raise CheckpointError(f"VAE up block {cin}->{cout}: channel widths do not divide the shortcut repeat")
        self.resnets = nn.ModuleList([ResidualBlock(cin if i == 0 else cout, cout) for i in range(num_res_blocks + 1)])
        self.upsampler = Upsample(cout, temporal) if up else None

    def pre(
        self, x: Tensor, prev: list[Tensor] | None, nxt: list[Tensor], first: bool, crops: BlockCrops | None = None
    ) -> tuple[Tensor, Tensor]:
        """The resnets and the temporal half of the upsampling → (features, the shortcut's input). `crops`: a
        column strip's (per-resnet crops, crop after the upsampling), see `column_tiles`."""
        src = x
        for k, resnet in enumerate(self.resnets):
            x = resnet(x, prev, nxt, None if crops is None else crops[0][k])
        if self.upsampler is None:
            return x, src
        if crops is not None:  # the shortcut reads the columns the resnets kept
            src = _crop_columns(src, (sum(c[0] for c in crops[0]), sum(c[1] for c in crops[0])))
        return self.upsampler.time_up(x, prev, nxt, first), src

    def post(self, x: Tensor, src: Tensor, sub: int, crops: BlockCrops | None = None) -> Tensor:
        """`pre`'s features → the block's output: spatial upsampling plus the DupUp shortcut from `src`
        (x holds temporal sub-positions sub, sub + 1, … of src's frames, see `_add_dup_up_`)."""
        if self.upsampler is None:
            return x
        y = self.upsampler.spatial(x)  # without its bias
        y = y.float() + _channel_bias(self.upsampler.resample.conv.bias, y.ndim)
        y = _stored(_add_dup_up_(y, src, self.ft, self.fs, sub).to(src.dtype))
        return y if crops is None else _crop_columns(y, crops[1])

    def forward(
        self, x: Tensor, prev: list[Tensor] | None, nxt: list[Tensor], first: bool, crops: BlockCrops | None = None
    ) -> Tensor:
        x, src = self.pre(x, prev, nxt, first, crops)
        return self.post(x, src, self.first_sub(first), crops)

    def first_sub(self, first: bool) -> int:
        """Temporal sub-position of a chunk's first output frame: only the last one exists on the first chunk."""
        return self.ft - 1 if first else 0


def _count_histories(parts: list[nn.Module]) -> int:
    """Histories the given modules append, in call order (every kernel-3 causal conv, temporal upsampling too)."""
    return sum(1 for part in parts for m in part.modules() if isinstance(m, CausalConv3d) and m.weight.shape[2] == 3)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        mults = cfg.dim_mult
        dims = [cfg.decoder_base_dim * m for m in (mults[-1], *mults[::-1])]
        last = len(mults) - 1
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], (3, 3, 3))
        self.mid_block = MidBlock(dims[0])
        self.up_blocks = nn.ModuleList(
            ResidualUpBlock(
                dims[i],
                dims[i + 1],
                cfg.num_res_blocks,
                temporal=i != last and cfg.temporal_upsample[i],
                up=i != last,
            )
            for i in range(len(mults))
        )
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, (3, 3, 3))
        # Up blocks from here on run at the output frame rate (after the last temporal upsampling).
        temporal = [i for i in range(last) if cfg.temporal_upsample[i]]
        # That last temporal block's spatial half (nearest ×2, 3×3 conv, shortcut) also runs in the tail, per
        # output frame, so the head hands over its features before the ×4 in pixels (`ResidualUpBlock.pre`).
        self.split = temporal[-1] if temporal else None
        self.tail_start = 0 if self.split is None else self.split + 1
        head = [self.conv_in, self.mid_block, *self.up_blocks[: self.tail_start]]
        self.head_histories = _count_histories(head)
        self.stem_histories = _count_histories([self.conv_in, self.mid_block])

    def stem(self, x: Tensor, prev: list[Tensor] | None, nxt: list[Tensor]) -> Tensor:
        """Latent frame → conv_in + mid block (latent resolution; the mid attention is frame-global)."""
        x = _biased(self.conv_in(x, prev, nxt), self.conv_in)
        return self.mid_block(x, prev, nxt)

    def _ups(self, x: Tensor, prev, nxt, first: bool, blocks: range, crops: Crops | None) -> Tensor:
        for i in blocks:
            x = self.up_blocks[i](x, prev, nxt, first, None if crops is None else crops[i])
        return x

    def head(
        self, x: Tensor, prev: list[Tensor] | None, nxt: list[Tensor], first: bool,
        crops: Crops | None = None, stem: bool = True,
    ) -> tuple[Tensor, Tensor | None]:
        """Latent frame → (features at the output frame rate [B, C, 1 or 4, ·, ·], the split block's shortcut
        input or None), both at the resolution before the split block's spatial upsampling; `tail` finishes
        that block. With `stem=False` x is already the stem's output (a column strip of it when `crops` is
        given, see `column_tiles`)."""
        if stem:
            x = self.stem(x, prev, nxt)
        if self.split is None:
            return x, None
        x = self._ups(x, prev, nxt, first, range(self.split), crops)
        return self.up_blocks[self.split].pre(x, prev, nxt, first, None if crops is None else crops[self.split])

    def tail(
        self, x: Tensor, src: Tensor | None, sub: int, prev: list[Tensor] | None, nxt: list[Tensor],
        crops: Crops | None = None,
    ) -> Tensor:
        """`head`'s output → clamped patches [B, out_channels, t, H, W]; causal per frame, so any t works (with
        the matching frames of `src` and the first frame's temporal sub-position `sub`, see `_add_dup_up_`)."""
        if self.split is not None:
            x = self.up_blocks[self.split].post(x, src, sub, None if crops is None else crops[self.split])
        # `first` only matters for temporal upsampling, all in the head
        x = self._ups(x, prev, nxt, False, range(self.tail_start, len(self.up_blocks)), crops)
        y = self.conv_out(_norm_silu(x, self.norm_out), prev, nxt)
        y = (y.float() + _channel_bias(self.conv_out.bias, y.ndim)).clamp(-1.0, 1.0).to(y.dtype)
        return y if crops is None else _crop_columns(y, crops[-1])

    def forward(
        self, x: Tensor, prev: list[Tensor] | None, nxt: list[Tensor], first: bool,
        crops: Crops | None = None, stem: bool = True,
    ) -> Tensor:
        x, src = self.head(x, prev, nxt, first, crops=crops, stem=stem)
        sub = 0 if self.split is None else self.up_blocks[self.split].first_sub(first)
        return self.tail(x, src, sub, prev, nxt, crops=crops)

    def tail_frame(self, feats: Tensor, src: Tensor | None, j: int) -> tuple[Tensor, Tensor | None, int]:
        """Output frame j of `head`'s (feats, src) → `tail`'s (x, src, sub) for that frame alone."""
        if src is None:
            return feats[:, :, j : j + 1], None, 0
        na = feats.shape[2] // src.shape[2]
        return feats[:, :, j : j + 1], src[:, :, j // na : j // na + 1], j % na

    def tail_input_scale(self) -> int:
        """Tail input rows (or columns) per latent row: the spatial upsamplings that run in the head."""
        return 2 ** sum(b.upsampler is not None for b in self.up_blocks[: self.split or 0])

    def column_tiles(self, width: int, n: int) -> list[ColumnTile]:
        """Split the up path of a `width`-column stem output into n column strips that decode exactly.

        Only zero-padded 3×3 convs mix columns after the stem (norms are per pixel, the shortcuts and
        upsampling move whole pixels). A strip edge inside the frame is wrong after a conv by one more column
        per conv (×2 through an upsample), so each strip reads a halo: walking backwards from the output
        columns it owns, every conv widens the needed range by its padding, every upsample halves it, and the
        frame's own edges clip it (there the zero padding is the reference's). After every resnet, upsample
        and conv_out the strip is cropped back to what the rest needs, so halo work does not compound.
        """
        if n < 1 or n > width:
            raise ValueError(f"VAE column tiles must be 1..{width} (the latent width), got {n}")
        widths = [width]  # columns at each up block's input, then at the output
        for b in self.up_blocks:
            widths.append(widths[-1] * (2 if b.upsampler is not None else 1))

        def widen(r: tuple[int, int], by: int, w: int) -> tuple[int, int]:
            return max(0, r[0] - by), min(w, r[1] + by)

        def crop(have: tuple[int, int], need: tuple[int, int]) -> tuple[int, int]:
            return need[0] - have[0], have[1] - need[1]

        tiles = []
        bounds = [widths[-1] * k // n for k in range(n + 1)]
        for a, b in zip(bounds, bounds[1:]):
            need = widen((a, b), self.conv_out.spatial_pad[2], widths[-1])  # conv_out's input
            blocks: list[BlockCrops] = []
            final = crop(need, (a, b))
            for i in reversed(range(len(self.up_blocks))):
                block, end = self.up_blocks[i], need
                if block.upsampler is not None:  # its 3×3 conv runs on the upsampled frame, then nearest ×2
                    lo, hi = widen(need, 1, widths[i + 1])
                    need = lo // 2, (hi - 1) // 2 + 1
                kept = [need]  # columns after each resnet, last first
                for r in reversed(block.resnets):
                    kept.append(widen(kept[-1], r.conv1.spatial_pad[2] + r.conv2.spatial_pad[2], widths[i]))
                kept.reverse()  # kept[0]: the block's input
                res = tuple(crop(kept[k], kept[k + 1]) for k in range(len(block.resnets)))
                after = crop((2 * need[0], 2 * need[1]), end) if block.upsampler is not None else (0, 0)
                blocks.append((res, after))
                need = kept[0]
            blocks.reverse()
            tiles.append(ColumnTile(src=need, crops=(*blocks, final), dst=(a, b)))
        return tiles


BlockCrops = tuple[tuple[tuple[int, int], ...], tuple[int, int]]  # (after each resnet, after the upsampling)
Crops = tuple  # one BlockCrops per up block, then (left, right) after conv_out


@dataclass(frozen=True)
class ColumnTile:
    """A column strip of a tile-major decode (`Decoder.column_tiles`): stem-output columns it reads, columns
    dropped (left, right) after each resnet, upsampling and conv_out, decoder-output columns it owns."""

    src: tuple[int, int]
    crops: Crops
    dst: tuple[int, int]


def _crop_columns(x: Tensor, lr: tuple[int, int]) -> Tensor:
    left, right = lr
    return x[..., left : x.shape[-1] - right] if left or right else x


# --------------------------------------------------------------------------------------------- driver


class WanVAE(nn.Module):
    """Wan2.2 VAE with the checkpoint's module names (`encoder.*`, `quant_conv.*`, `post_quant_conv.*`, `decoder.*`).

    Compilable units (`cosmos3_compiled/compile.py` may replace these instance attributes with
    `torch.compile(..., fullgraph=True)` versions; `decode_frames` calls them through `self`). Each takes
    one input and the list of causal histories, returns (output, histories), and updates the given
    histories in place (only the first chunk allocates them):
      * `decoder_first_chunk(x)` — latent frame 0 → 1 frame of patches (runs once; eager is fine)
      * `decoder_chunk(x, hist)` — a later latent frame → 4 frames of patches (when `frame_tail` is off)
      * `decoder_head(x, hist[:k])` then 4 × `decoder_tail(frame, src, sub, hist[k:])` — the same, split so
        the full-resolution tail sees one output frame per call (`frame_tail`, the default; k =
        `decoder.head_histories`). Separate calls keep the compiler from interleaving the four frames; the
        head stops before the last temporal block's spatial upsampling, so what it hands over is ¼ the size.
    Patches are [B, 12, t, H/2, W/2], already clamped to [-1, 1]. Settings read inside the units (set
    before compiling): `frame_tail`, the layout from `apply_channels_last_3d()`, and
    `apply_subpixel_upsample()` (off by default: not bit-faithful).
    """

    def __init__(self, cfg: VAEConfig, with_encoder: bool = True) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg) if with_encoder else None
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, (1, 1, 1)) if with_encoder else None
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, (1, 1, 1))
        self.decoder = Decoder(cfg)
        self.memory_format = torch.contiguous_format
        # Run the full-resolution decoder tail one output frame at a time (less memory, same arithmetic).
        self.frame_tail = True
        # > 1: tile-major decode in this many column strips (see `decode_frames`; less memory, same values).
        self.tiles = 1

    @property
    def dtype(self) -> torch.dtype:
        return self.post_quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.post_quant_conv.weight.device

    def apply_channels_last_3d(self) -> "WanVAE":
        """Store conv weights and activations channels-last (NDHWC), the layout tensor-core convs prefer."""
        self.memory_format = torch.channels_last_3d
        for m in self.modules():
            if isinstance(m, CausalConv3d):
                m.memory_format = torch.channels_last_3d
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last_3d)
            elif isinstance(m, nn.Conv2d):
                m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)
            elif isinstance(m, Upsample) and m.subpixel_weight is not None:
                m.subpixel_weight = m.subpixel_weight.contiguous(memory_format=torch.channels_last)
        return self

    def apply_subpixel_upsample(self) -> "WanVAE":
        """Run each decoder upsample as one 2×2 conv on the low-resolution frame (see `_subpixel_weights`).

        Same function, 2.25× fewer multiply-adds in those convs, no upsampled temporary; the folded weights
        are rounded once to the model dtype, so results differ from the reference at rounding level.
        Call after loading and after any dtype change.
        """
        for m in self.decoder.modules():
            if isinstance(m, Upsample):
                conv = m.resample.conv
                w = _subpixel_weights(conv.weight)
                if self.memory_format == torch.channels_last_3d:
                    w = w.contiguous(memory_format=torch.channels_last)
                m.subpixel_weight = w
        return self

    def _stats(self) -> tuple[Tensor, Tensor]:
        """(mean, 1/std) as [1, z, 1, 1, 1] in the VAE dtype, computed like the diffusers pipeline does."""
        dt, dev = self.dtype, self.device
        mean = torch.tensor(self.cfg.latents_mean, dtype=dt, device=dev).view(1, -1, 1, 1, 1)
        inv_std = (1.0 / torch.tensor(self.cfg.latents_std, dtype=dt, device=dev)).view(1, -1, 1, 1, 1)
        return mean, inv_std

    # ---- decode

    def decoder_first_chunk(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Latent frame 0 [B, z, 1, h, w] → (patches [B, 12, 1, ·, ·], new histories)."""
        nxt: list[Tensor] = []
        return self.decoder(x, None, nxt, first=True), nxt

    def decoder_chunk(self, x: Tensor, hist: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """Later latent frame → (patches [B, 12, 4, ·, ·], hist updated in place)."""
        nxt: list[Tensor] = []
        return self.decoder(x, hist, nxt, first=False), nxt

    def decoder_head(
        self, x: Tensor, hist: list[Tensor], crops: Crops | None = None, stem: bool = True
    ) -> tuple[tuple[Tensor, Tensor | None], list[Tensor]]:
        """Later latent frame → ((features [B, C, 4, ·, ·], shortcut input) for `decoder_tail`, see
        `Decoder.head`); hist = the first `decoder.head_histories` histories, updated in place. Tile-major:
        `stem=False`, x = a column strip of the stem output, `crops` from its `ColumnTile`, hist without the
        stem's histories."""
        nxt: list[Tensor] = []
        return self.decoder.head(x, hist, nxt, first=False, crops=crops, stem=stem), nxt

    def decoder_tail(
        self, x: Tensor, src: Tensor | None, sub: int, hist: list[Tensor], crops: Crops | None = None
    ) -> tuple[Tensor, list[Tensor]]:
        """One frame of head features [B, C, 1, ·, ·] (x, src, sub from `Decoder.tail_frame`) → (patches
        [B, 12, 1, ·, ·]); hist = the remaining histories, updated in place."""
        nxt: list[Tensor] = []
        return self.decoder.tail(x, src, sub, hist, nxt, crops=crops), nxt

    def decoder_first_tile(self, x: Tensor, crops: Crops) -> tuple[Tensor, list[Tensor]]:
        """Tile-major decode: a column strip of latent frame 0's stem output → (its patches, the strip's new
        histories for the up path)."""
        nxt: list[Tensor] = []
        return self.decoder(x, None, nxt, first=True, crops=crops, stem=False), nxt

    def decoder_stem(self, x: Tensor, hist: list[Tensor] | None) -> tuple[Tensor, list[Tensor]]:
        """Tile-major decode, first pass: latent frame → stem output; hist None on frame 0 (allocates)."""
        nxt: list[Tensor] = []
        return self.decoder.stem(x, hist, nxt), nxt

    def output_shape(self, z_shape: tuple[int, ...]) -> tuple[int, int, int, int, int]:
        """[B, 3, F, H, W] of the video that decodes from a latent of `z_shape`."""
        b, _, t, h, w = z_shape
        s = self.cfg.scale_factor_spatial
        return (b, 3, 1 + self.cfg.scale_factor_temporal * (t - 1), h * s, w * s)

    def _check_latent(self, z: Tensor) -> None:
        if not isinstance(z, Tensor):
            raise ValueError(f"latent must be a torch.Tensor, got {type(z).__name__}")
        if z.ndim != 5:
            raise ValueError(f"latent must be [B, {self.cfg.z_dim}, T, h, w]; got rank {z.ndim} shape {tuple(z.shape)}")
        if z.shape[1] != self.cfg.z_dim:
            raise ValueError(
                f"latent has {z.shape[1]} channels but the VAE's z_dim is {self.cfg.z_dim}; shape {tuple(z.shape)}"
            )
        if min(z.shape) < 1:
            raise ValueError(f"latent has an empty axis (B, T, h and w must be >= 1); shape {tuple(z.shape)}")
        if not z.is_floating_point():
            raise ValueError(f"latent must be a floating-point tensor, got {z.dtype}")

    @torch.no_grad()
    def decode_frames(
        self,
        z: Tensor,
        *,
        out: Tensor | None = None,
        progress_desc: str = "decode",
        on_frames: Callable[[int, int], None] | None = None,
    ) -> Tensor:
        """Normalised latent [B, z, T, h, w] → video [B, 3, 1 + 4(T-1), 16h, 16w] in [-1, 1].

        De-normalises like the pipeline (z / (1/std) + mean, in the VAE dtype), applies `post_quant_conv`
        to the whole latent, then decodes one latent frame at a time, writing each chunk's frames
        (unpatchified) straight into `out` (allocated in the VAE dtype when not given).

        `on_frames(f0, f1)`, called on this thread, says that output frames [f0, f1) of `out` have all their
        work enqueued (on the current stream) and will not be written again, so a consumer can start on them
        while the decode goes on (see `postprocess.FrameStream`): every frame once, in order. The whole-frame
        decode reports each emitted chunk (frame 0, then 4 frames per latent frame, or 1 per tail frame with
        `frame_tail`); the tile-major decode finishes a frame only with its last strip, so it reports all
        frames once at the end.
        """
        self._check_latent(z)
        shape = self.output_shape(tuple(z.shape))
        if out is None:
            out = torch.empty(shape, dtype=self.dtype, device=self.device)
        elif tuple(out.shape) != shape or not out.is_floating_point() or out.device != self.device:
            raise ValueError(
                f"out must be a floating tensor of shape {shape} on {self.device}; "
                f"got {tuple(out.shape)} {out.dtype} on {out.device}"
            )
        mean, inv_std = self._stats()
        x = self.post_quant_conv.pointwise(z.to(device=self.device, dtype=self.dtype) / inv_std + mean)
        x = _biased(x, self.post_quant_conv)
        x = x.contiguous(memory_format=self.memory_format)  # [B, z, T, h, w]
        b, _, t, _, _ = x.shape
        p = self.cfg.patch_size
        st = self.cfg.scale_factor_temporal

        def emit(y: Tensor, i: int, j: int = 0, cols: tuple[int, int] | None = None) -> None:
            """Patches of latent frame i (its j-th output frame onwards) → their pixels in `out`; whole frames
            (no `cols`) are final, so they go to `on_frames`."""
            n, hp, wp = y.shape[2:]
            f0 = 0 if i == 0 else 1 + st * (i - 1) + j
            dst = out[:, :, f0 : f0 + n] if cols is None else out[:, :, f0 : f0 + n, :, p * cols[0] : p * cols[1]]
            # Unpatchify into place: patch channel c·p² + col·p + row → pixel (h·p + row, w·p + col).
            dst.view(b, 3, n, hp, p, wp, p).copy_(y.view(b, 3, p, p, n, hp, wp).permute(0, 1, 4, 5, 3, 6, 2))
            if on_frames is not None and cols is None:
                on_frames(f0, f0 + n)

        if self.tiles > 1:
            self._decode_tiles(x, emit, progress_desc)
            if on_frames is not None:
                on_frames(0, shape[2])
            return out
        hist: list[Tensor] = []
        for i in progress(range(t), desc=progress_desc, total=t):
            xi = x[:, :, i : i + 1]
            if i == 0:
                y, hist = self.decoder_first_chunk(xi)
                emit(y, i)
            elif not self.frame_tail:
                y, hist = self.decoder_chunk(xi, hist)
                emit(y, i)
            else:
                k = self.decoder.head_histories
                (feats, src), _ = self.decoder_head(xi, hist[:k])
                for j in range(feats.shape[2]):
                    y, _ = self.decoder_tail(*self.decoder.tail_frame(feats, src, j), hist[k:])
                    emit(y, i, j)
                del feats, src
        return out

    def _decode_tiles(self, x: Tensor, emit, progress_desc: str) -> None:
        """Tile-major decode: the stem (conv_in + mid block) for every latent frame first, kept whole (small:
        latent resolution); then each column strip of `decoder.column_tiles` through the up path for every
        frame, with its own causal histories, so only one strip's histories are ever live. Same ops on the
        same values as the whole-frame decode, minus a halo's worth of repeated columns per strip."""
        b, _, t, h, w = x.shape
        dec = self.decoder
        stem = None
        hist: list[Tensor] | None = None
        for i in range(t):
            y, hist = self.decoder_stem(x[:, :, i : i + 1], hist)
            if stem is None:
                stem = torch.empty(
                    (b, y.shape[1], t, h, w), dtype=y.dtype, device=y.device, memory_format=self.memory_format
                )
            stem[:, :, i : i + 1] = y
        del hist, y
        tiles = dec.column_tiles(w, self.tiles)
        k = dec.head_histories - dec.stem_histories
        for n in progress(range(len(tiles) * t), desc=progress_desc, total=len(tiles) * t):
            tile, i = tiles[n // t], n % t
            xi = stem[:, :, i : i + 1, :, tile.src[0] : tile.src[1]]
            if i == 0:
                hist = None  # the previous strip's histories go before this strip allocates its own
                y, hist = self.decoder_first_tile(xi, tile.crops)
                emit(y, i, cols=tile.dst)
                continue
            feats, src = self.decoder_head(xi, hist[:k], tile.crops, stem=False)[0]  # (the returned
            for j in range(feats.shape[2]):  # histories are `hist` itself: not kept, so a strip's die with it)
                y = self.decoder_tail(*dec.tail_frame(feats, src, j), hist[k:], tile.crops)[0]
                emit(y, i, j, tile.dst)
            del feats, src

    # ---- encode

    def _encoder_chunk(self, x: Tensor, prev: list[Tensor] | None) -> tuple[Tensor, list[Tensor]]:
        nxt: list[Tensor] = []
        y = self.encoder(x, prev, nxt)
        z = self.cfg.z_dim  # mode() of the posterior = the first z channels of quant_conv's output
        return F.conv3d(y, self.quant_conv.weight[:z], self.quant_conv.bias[:z]), nxt

    @torch.no_grad()
    def encode_mode(self, video: Tensor) -> Tensor:
        """Video [B, 3, F, H, W] in [-1, 1] (F = 1 + 4k, H and W multiples of 16) → normalised latent
        [B, z, 1 + (F-1)/4, H/16, W/16]: the posterior mode, (mu - mean) · (1/std), like the pipeline."""
        if self.encoder is None:
            raise ValueError("this VAE was loaded with with_encoder=False; reload it with the encoder to encode")
        if not isinstance(video, Tensor) or video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, F, H, W]; got {tuple(getattr(video, 'shape', ()))}")
        b, _, f, hh, ww = video.shape
        st, s, p = self.cfg.scale_factor_temporal, self.cfg.scale_factor_spatial, self.cfg.patch_size
        if b < 1 or f < 1 or (f - 1) % st or hh < s or ww < s or hh % s or ww % s:
            raise ValueError(
                f"video shape {tuple(video.shape)}: need frames = 1 + {st}k and height/width positive multiples of {s}"
            )
        x = rearrange(video.to(device=self.device, dtype=self.dtype), "b c f (h r) (w q) -> b (c q r) f h w", r=p, q=p)
        x = x.contiguous(memory_format=self.memory_format)
        t = 1 + (f - 1) // st
        lat = torch.empty(b, self.cfg.z_dim, t, hh // s, ww // s, dtype=self.dtype, device=self.device)
        hist: list[Tensor] | None = None
        for i in range(t):
            xi = x[:, :, :1] if i == 0 else x[:, :, 1 + st * (i - 1) : 1 + st * i]
            mu, hist = self._encoder_chunk(xi, hist)
            lat[:, :, i : i + 1] = mu
        mean, inv_std = self._stats()
        return lat.sub_(mean).mul_(inv_std).to(video.dtype)


# ------------------------------------------------------------------------------------------- loading


def wan22_config(**overrides) -> dict:
    """The Wan2.2 VAE architecture in diffusers' config keys (latents_mean/std not included); overrides
    change widths for tiny test or demo models. The one place these keys are spelled out."""
    arch = dict(
        base_dim=160,
        decoder_base_dim=256,
        z_dim=48,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        is_residual=True,
        patch_size=2,
        in_channels=12,
        out_channels=12,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
    )
    arch.update(overrides)
    return arch


def build_vae(cfg: VAEConfig, with_encoder: bool = True, device: str | torch.device = "meta") -> WanVAE:
    with torch.device(device):
        return WanVAE(cfg, with_encoder=with_encoder)


def load_vae(
    folder: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    *,
    with_encoder: bool = True,
    channels_last_3d: bool = False,
    frame_tail: bool = True,
    subpixel_upsample: bool = False,
) -> WanVAE:
    """Load the Wan2.2 VAE from a checkpoint folder (its `vae/` subfolder, or a `vae/` folder itself).

    Safetensors only, strict: every key must match diffusers' `AutoencoderKLWan` state dict. With
    `with_encoder=False` the encoder weights are skipped (decode-only, less memory). `channels_last_3d`,
    `frame_tail` and `subpixel_upsample` set the decode layout and arithmetic (see `WanVAE`).
    """
    folder = Path(folder)
    vae_dir = folder / "vae" if (folder / "vae").is_dir() else folder
    cfg = VAEConfig.from_dict(read_json(vae_dir / "config.json"), where=str(vae_dir / "config.json"))
    model = build_vae(cfg, with_encoder=with_encoder)
    state = load_tensors(weight_files(vae_dir), device=device)
    ignore = frozenset() if with_encoder else frozenset(k for k in state if k.startswith(("encoder.", "quant_conv.")))
    assign_strict(model, state, dtype, ignore=ignore, where=str(vae_dir))
    model.eval().requires_grad_(False)
    model.frame_tail = frame_tail
    if channels_last_3d:
        model.apply_channels_last_3d()
    if subpixel_upsample:
        model.apply_subpixel_upsample()
    return model
