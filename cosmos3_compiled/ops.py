"""Pure tensor ops of the Cosmos3 transformer: RMSNorm flavours, fused Q/K norm, mRoPE, timestep sinusoid."""

from __future__ import annotations

import math

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, style: str = "standard") -> torch.Tensor:
    """RMSNorm over the last dim, rounding where the reference rounds.

    "standard": normalise in fp32, cast to the weight's dtype, then scale (diffusers RMSNorm).
    "nemotron": normalise and scale in fp32, cast back to the input dtype once.
    """
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if style == "nemotron":
        return (weight.float() * normed).to(x.dtype)
    if weight.dtype in (torch.float16, torch.bfloat16):
        return normed.to(weight.dtype) * weight
    return normed * weight


def apply_qk_norm(qk: torch.Tensor, weight: torch.Tensor, eps: float, style: str = "standard") -> torch.Tensor:
    """Per-head RMSNorm of the query and key heads in one op.

    `qk` holds the query heads followed by the key heads, `[N, Hq + Hkv, D]`; `weight` is `[Hq + Hkv, D]`
    (the q weight repeated over query heads, then the k weight over key heads), built once at load time.
    """
    return rms_norm(qk, weight, eps, style)  # [N, Hq + Hkv, D]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """Rotate-by-halves RoPE without `torch.cat`: both halves are written straight into `out`.

    x: [N, H, D]; cos, sin: [N, D/2] (the tables hold each angle once); out: [N, H, D] or None.
    """
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos.unsqueeze(1), sin.unsqueeze(1)  # [N, 1, D/2]
    if out is None:
        out = torch.empty_like(x)
    out[..., :half] = x1 * c - x2 * s
    out[..., half:] = x2 * c + x1 * s
    return out


def rope_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))  # [D/2]


def mrope_axis_of_slot(head_dim: int, axes: tuple[int, int, int]) -> torch.Tensor:
    """Which position axis (0 time, 1 row, 2 column) drives each frequency slot: interleaved, not chunked."""
    half = head_dim // 2
    axis = torch.zeros(half, dtype=torch.long)
    for a, offset in ((1, 1), (2, 2)):
        axis[offset : 3 * axes[a] : 3] = a
    return axis  # [D/2]


def mrope_tables(
    positions: torch.Tensor, head_dim: int, theta: float, axes: tuple[int, int, int], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables `[N, D/2]` for 3-axis positions `[3, N]` (fp32 angles, cast to `dtype` like the reference)."""
    inv_freq = rope_inv_freq(head_dim, theta).to(positions.device)
    axis = mrope_axis_of_slot(head_dim, axes).to(positions.device)
    pos = positions.float()[axis]  # [D/2, N]: each slot's own axis
    angles = (pos * inv_freq[:, None]).t()  # [N, D/2]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def text_positions(length: int) -> torch.Tensor:
    ids = torch.arange(length, dtype=torch.float32)
    return ids.expand(3, -1)  # [3, L]


def video_positions(
    grid: tuple[int, int, int], text_len: int, fps: float, base_fps: float, margin: int, fps_modulation: bool,
    temporal_compression: int = 4, base_temporal_compression: int | None = None, start: int = 0,
) -> torch.Tensor:
    """mRoPE ids of the video tokens (time-major, then rows, then columns); spatial ids restart at 0. `start`: the
    first token's frame index (the action segment starts at 1); `base_temporal_compression`: the compression of
    the base rate when it differs from the tokens' own (actions: 4 against 1)."""
    t, h, w = grid
    offset = text_len + margin
    base_tc = temporal_compression if base_temporal_compression is None else base_temporal_compression
    if fps_modulation and t > 1:
        # frames advance by base_fps/fps latent steps; same float32 op order as the reference
        tps = fps / temporal_compression
        base_tps = base_fps / base_tc
        times = (torch.arange(t, dtype=torch.float32) + start) / tps * base_tps + offset
    else:
        times = (torch.arange(t, dtype=torch.long) + offset + start).float()
    tt = times.view(t, 1, 1).expand(t, h, w)
    rows = torch.arange(h, dtype=torch.float32).view(1, h, 1).expand(t, h, w)
    cols = torch.arange(w, dtype=torch.float32).view(1, 1, w).expand(t, h, w)
    return torch.stack([tt.reshape(-1), rows.reshape(-1), cols.reshape(-1)])  # [3, N]


def timestep_sinusoid(t: torch.Tensor, channels: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """[cos | sin] embedding of scaled timesteps `t` ([B] fp32) with frequencies exp(-ln(max_period)·i/half)."""
    half = channels // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]  # [B, half]
    out = t.new_empty((t.shape[0], channels), dtype=torch.float32)
    out[:, :half] = angles.cos()
    out[:, half:] = angles.sin()
    return out  # [B, channels]


@torch.library.custom_op("cosmos3::add_linear_", mutates_args={"h"})
def add_linear_(h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """h += x @ weight.T in place: one GEMM that accumulates onto h (cuBLAS beta = 1, no copy of h first).

    `h + linear(x)` compiles to an out-of-place addmm, which copies all of h into a new buffer before the
    GEMM (one device-to-device copy of the hidden states per residual); as an opaque in-place op the
    compiler leaves the accumulation where it is."""
    torch.addmm(h, x, weight.t(), out=h)


@add_linear_.register_fake
def _(h: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    return None
