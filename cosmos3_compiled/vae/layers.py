"""The Wan2.2 VAE's building blocks (diffusers `AutoencoderKLWan` with `is_residual=True`), in data-flow
order: fp32 epilogues, causal conv, residual and attention blocks, encoder, decoder, and the receptive-field
walk that lets a decoder strip (columns or rows) decode exactly.

Causal time: every kernel-3 temporal conv sees the last two frames of its own input from the previous chunk
(its history), zeros at first: what the reference's feature cache and its `None` / "Rep" markers amount to.
Histories travel as a list in call order: a chunk reads `prev[i]` for its i-th causal conv and appends it to
`nxt`; the first chunk allocates them, later ones update them in place, so a compiled chunk never holds two
copies. No Python branch depends on tensor values, so each chunk function compiles whole (fullgraph).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from cosmos3_compiled.compile import is_compiling
from cosmos3_compiled.checkpoint_io import CheckpointError
from cosmos3_compiled.vae.config import VAEConfig

HISTORY = 2  # frames of history a kernel-3 causal conv needs
_NORM_EPS = 1e-12  # F.normalize's floor on the channel norm


def _pin_strides(x: Tensor, stride: tuple[int, ...]) -> Tensor:
    """Compiled: make inductor store x once, with exactly these strides (eager: x unchanged). The op is
    registered by `apply_compile_vae`, which imports inductor, so an eager run never imports it."""
    if is_compiling():
        return torch.ops.prims.inductor_force_stride_order(x, stride)
    return x


def _stored(x: Tensor) -> Tensor:
    """Compiled: store a block's output once, in its own layout; inlined into each reader, its inputs (conv
    output, shortcut) would stay alive and the next norm would store its fp32 product in full."""
    return _pin_strides(x, x.stride())


def _channel_bias(bias: Tensor, ndim: int) -> Tensor:
    """A per-channel bias [C] shaped to broadcast over dim 1 of an ndim-d activation, in fp32."""
    return bias.float().view(-1, *([1] * (ndim - 2)))


def _finish(y: Tensor, *terms: Tensor) -> Tensor:
    """Sum a bias-free conv output and the given terms in fp32, round once to y's dtype.

    Convs here run without their bias, which joins the next pointwise step (this or `_norm_silu`), where
    inductor would put it anyway: so eager and compiled round at the same points, once per conv output and
    once per pointwise chain (in fp32 the reference's arithmetic; in bf16 fewer roundings than its op chain).
    """
    out = y.float()
    for t in terms:
        out = out + t
    return out.to(y.dtype)


def biased(y: Tensor, conv: nn.Module) -> Tensor:
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
    """silu(norm(x + bias)) over the channels (dim 1) in fp32, rounded once; `bias`: x's conv's (see `_finish`)."""
    xf = x.float() if bias is None else x.float() + _channel_bias(bias, x.ndim)
    return F.silu(_rms_norm_f32(xf, norm.gamma, norm.scale, dim=1)).to(x.dtype)


class CausalConv3d(nn.Module):
    """Conv3d, zero-padded in space and causal in time; kernel-3 layers carry a 2-frame history. `forward` and
    `pointwise` leave out the bias, which the caller's fp32 epilogue adds (`_finish`, `_norm_silu`)."""

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
        """x: [B, Cin, t, H, W] → [B, Cout, t, H, W]; this layer's history is prev[len(nxt)], appended to nxt
        (prev None: the first chunk, zeros, allocated here)."""
        if prev is None:
            xin = F.pad(x, (0, 0, 0, 0, HISTORY, 0))
            nxt.append(xin[:, :, -HISTORY:].clone(memory_format=self.memory_format))
        else:
            hist = prev[len(nxt)]
            if is_compiling():
                # A pointwise producer that also needs x: with a cat, inductor would copy every layer's history
                # into its input buffer at the start of the graph, keeping all those buffers alive.
                xin = F.pad(hist, (0, 0, 0, 0, 0, x.shape[2])) + F.pad(x, (0, 0, 0, 0, HISTORY, 0))
                # Pin xin to the conv's layout: the history slice below is lowered first and would otherwise
                # pick xin's layout, and the conv would need a second, channels-last copy of it.
                xin = _pin_strides(xin, xin.contiguous(memory_format=self.memory_format).stride())
            else:
                xin = torch.cat([hist, x], dim=2)  # [B, Cin, 2 + t, H, W]
            hist.copy_(xin[:, :, -HISTORY:])
            nxt.append(hist)
        return F.conv3d(xin, self.weight, None, self.stride, self.spatial_pad)


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
        """`crop`: (left, right) columns to drop from the output (a column strip's halo, see `Decoder.span`)."""
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


def _avg_down(x: Tensor, cout: int, ft: int, fs: int) -> Tensor:
    """Shortcut of a residual down block: fold (ft, fs, fs) into channels, then average groups of channels;
    frames are zero-padded at the front to a multiple of ft (the first chunk's 1 frame)."""
    pad = (ft - x.shape[2] % ft) % ft
    if pad:
        x = F.pad(x, (0, 0, 0, 0, pad, 0))
    x = rearrange(x, "b c (t a) (h p) (w q) -> b (c a p q) t h w", a=ft, p=fs, q=fs)
    return rearrange(x, "b (o g) t h w -> b o g t h w", o=cout).mean(dim=2)


class Downsample(nn.Module):
    """Zero-pad right/bottom, 3×3 stride-2 conv per frame; '3d' also halves time with a stride-2 causal conv."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))  # diffusers' keys
        self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: Tensor, prev: list[Tensor] | None, nxt: list[Tensor]) -> Tensor:
        x = _per_frame(x, self.resample)
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


def _stages(block: type, dims: list[int], num_res_blocks: int, temporal: tuple[bool, ...]) -> nn.ModuleList:
    """Block i maps dims[i] → dims[i + 1]; every block but the last resamples, in time too where `temporal` says."""
    last = len(dims) - 2
    return nn.ModuleList(
        block(dims[i], dims[i + 1], num_res_blocks, i != last and temporal[i], i != last) for i in range(last + 1)
    )


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig) -> None:
        super().__init__()
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], (3, 3, 3))
        self.down_blocks = _stages(ResidualDownBlock, dims, cfg.num_res_blocks, cfg.temporal_downsample)
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, (3, 3, 3))

    def forward(self, x: Tensor, prev: list[Tensor] | None, nxt: list[Tensor]) -> Tensor:
        x = biased(self.conv_in(x, prev, nxt), self.conv_in)
        for block in self.down_blocks:
            x = block(x, prev, nxt)
        x = self.mid_block(x, prev, nxt)
        y = self.conv_out(_norm_silu(x, self.norm_out), prev, nxt)
        return biased(y, self.conv_out)


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
    if is_compiling():
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


class Upsample(nn.Module):
    """Nearest-exact ×2 in space + 3×3 conv per frame; '3d' first doubles time with a causal conv to 2C channels."""

    def __init__(self, dim: int, temporal: bool) -> None:
        super().__init__()
        self.resample = nn.Sequential(nn.Upsample(scale_factor=2.0, mode="nearest-exact"), nn.Conv2d(dim, dim, 3, padding=1))
        self.time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1)) if temporal else None

    def time_up(self, x: Tensor, prev: list[Tensor] | None, nxt: list[Tensor], first: bool) -> Tensor:
        """'3d': the causal time conv to 2C channels, interleaved into twice the frames; '2d': x as is."""
        if self.time_conv is None:
            return x
        if first:  # frame 0 is not doubled; the time conv's history starts as zeros
            b, c, _, h, w = x.shape
            z = x.new_zeros(b, c, HISTORY, h, w)
            nxt.append(z.contiguous(memory_format=self.time_conv.memory_format))
            return x
        y = self.time_conv(x, prev, nxt)  # [B, 2C, t, H, W]
        y = biased(y, self.time_conv)
        return rearrange(y, "b (two c) t h w -> b c (t two) h w", two=2)

    def spatial(self, x: Tensor) -> Tensor:
        """Nearest ×2 + the 3×3 conv, frame by frame, without the conv's bias (nearest copies need no fp32)."""
        up, conv = self.resample
        return _per_frame(x, lambda f: F.conv2d(up(f), conv.weight, None, padding=1))


class ResidualUpBlock(nn.Module):
    def __init__(self, cin: int, cout: int, num_res_blocks: int, temporal: bool, up: bool) -> None:
        super().__init__()
        self.ft, self.fs = (2 if temporal else 1), 2
        if up and cout * self.ft * 4 % cin:
            raise CheckpointError(f"VAE up block {cin}->{cout}: channel widths do not divide the shortcut repeat")
        self.resnets = nn.ModuleList([ResidualBlock(cin if i == 0 else cout, cout) for i in range(num_res_blocks + 1)])
        self.upsampler = Upsample(cout, temporal) if up else None

    def pre(
        self, x: Tensor, prev: list[Tensor] | None, nxt: list[Tensor], first: bool, crops: BlockCrops | None = None
    ) -> tuple[Tensor, Tensor]:
        """The resnets and the temporal half of the upsampling → (features, the shortcut's input). `crops`: a
        column strip's (per-resnet crops, crop after the upsampling), see `Decoder.span`."""
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
        y = y.float() + _channel_bias(self.upsampler.resample[1].bias, y.ndim)
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
        dims = [cfg.decoder_base_dim * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], (3, 3, 3))
        self.mid_block = MidBlock(dims[0])
        self.up_blocks = _stages(ResidualUpBlock, dims, cfg.num_res_blocks, cfg.temporal_upsample)
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, (3, 3, 3))
        # Up blocks from here on run at the output frame rate (after the last temporal upsampling).
        temporal = [i for i, up in enumerate(cfg.temporal_upsample) if up]
        # That last temporal block's spatial half (nearest ×2, 3×3 conv, shortcut) also runs in the tail, per
        # output frame, so the head hands over its features before the ×4 in pixels (`ResidualUpBlock.pre`).
        self.split = temporal[-1] if temporal else None
        self.tail_start = 0 if self.split is None else self.split + 1
        head = [self.conv_in, self.mid_block, *self.up_blocks[: self.tail_start]]
        self.head_histories = _count_histories(head)
        self.stem_histories = _count_histories([self.conv_in, self.mid_block])

    def stem(self, x: Tensor, prev: list[Tensor] | None, nxt: list[Tensor]) -> Tensor:
        """Latent frame → conv_in + mid block (latent resolution; the mid attention is frame-global)."""
        x = biased(self.conv_in(x, prev, nxt), self.conv_in)
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
        given, see `Decoder.span`)."""
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

    @property
    def tail_first(self) -> int:
        """The up block the tail starts in: the split block, whose spatial half runs in the tail."""
        return self.tail_start if self.split is None else self.split

    def upscale(self, first: int = 0) -> int:
        """Output pixels per input pixel (either axis) of up block `first`: the spatial upsamplings from there on."""
        return 2 ** sum(b.upsampler is not None for b in self.up_blocks[first:])

    def span(self, out: tuple[int, int], size: int, tail: bool = False) -> Strip:
        """The range of a `size`-wide input (columns or rows: the convs are square) that decodes output range
        `out` exactly, with the crops that keep each stage to what the rest needs. Input: the stem output
        (the whole up path), or with `tail` the tail's input (the split block's upsampling onwards).

        After the stem only zero-padded 3×3 convs mix pixels, so walking back from `out` every conv widens the
        needed range by its padding, every upsample halves it, and the frame's edges clip it (there the zero
        padding is the reference's). Column strips crop after every resnet, upsampling and conv_out, so halo
        work does not compound. Row blocks run uncropped, so each layer's history stays a plain slice of the
        whole frame's; their wrong edge grows just as the walk widens, never reaching `out`.
        """
        first = self.tail_first if tail else 0
        widths = [size]  # at each up block's input from `first` on, then at the output
        for b in self.up_blocks[first:]:
            widths.append(widths[-1] * (2 if b.upsampler is not None else 1))
        need = _widen(out, self.conv_out.spatial_pad[2], widths[-1])  # conv_out's input
        final = _crop(need, out)
        blocks: list[BlockCrops] = []
        for i in reversed(range(first, len(self.up_blocks))):
            block, end, w = self.up_blocks[i], need, widths[i - first]
            if block.upsampler is not None:  # its 3×3 conv runs on the upsampled frame, then nearest ×2
                lo, hi = _widen(need, 1, widths[i - first + 1])
                need = lo // 2, (hi - 1) // 2 + 1
            kept = [need]  # after each resnet, last first; the split block's resnets ran in the head
            for r in reversed(block.resnets if not tail or i >= self.tail_start else ()):
                kept.append(_widen(kept[-1], r.conv1.spatial_pad[2] + r.conv2.spatial_pad[2], w))
            kept.reverse()  # kept[0]: the block's input
            res = tuple(_crop(kept[k], kept[k + 1]) for k in range(len(kept) - 1))
            after = _crop((2 * need[0], 2 * need[1]), end) if block.upsampler is not None else (0, 0)
            blocks.append((res, after))
            need = kept[0]
        return Strip(src=need, crops=(*[None] * first, *reversed(blocks), final), dst=out)

    def column_tiles(self, width: int, n: int) -> list[Strip]:
        """n column strips of a `width`-column stem output, each decoding its share of the output exactly."""
        if n < 1 or n > width:
            raise ValueError(f"VAE column tiles must be 1..{width} (the latent width), got {n}")
        bounds = [width * self.upscale() * k // n for k in range(n + 1)]
        return [self.span((a, b), width) for a, b in zip(bounds, bounds[1:])]


BlockCrops = tuple[tuple[tuple[int, int], ...], tuple[int, int]]  # (after each resnet, after the upsampling)
Crops = tuple  # one BlockCrops per up block (None before the walk's first), then (left, right) after conv_out


@dataclass(frozen=True)
class Strip:
    """A strip of a split decode (`Decoder.span`): the input range it reads, the pixels dropped (left, right)
    after each resnet, upsampling and conv_out, and the output range it owns."""

    src: tuple[int, int]
    crops: Crops
    dst: tuple[int, int]


def _widen(r: tuple[int, int], by: int, size: int) -> tuple[int, int]:
    return max(0, r[0] - by), min(size, r[1] + by)


def _crop(have: tuple[int, int], need: tuple[int, int]) -> tuple[int, int]:
    return need[0] - have[0], have[1] - need[1]


def _crop_columns(x: Tensor, lr: tuple[int, int]) -> Tensor:
    left, right = lr
    return x[..., left : x.shape[-1] - right] if left or right else x
