"""One hand-written Triton kernel for the video step's attention prologue (CUDA only, optional).

`qk_norm_rope_kv` does in one pass over the fused q|k|v projection what `ops.apply_qk_norm`, `ops.apply_rope`
and the K/V buffer writes do as separate steps: per-head RMSNorm of the query and key heads, rotate-by-halves
RoPE, the queries written to their own buffer, the keys and values written straight into the tail of the
branch's static K/V buffers. Inductor splits this into a reduction kernel, a pointwise kernel and a copy,
and re-reads the projection on the way; one program per token here reads each element once.

Numerics follow the compiled path (fp32 inside, one rounding per output) except the norm, which rounds the
normalised value to the weight dtype before scaling exactly as `ops.rms_norm` does.

It is exposed as an opaque custom op that mutates the K/V buffers in place, so a fullgraph compile
keeps it in the graph (no break) without copying the buffers around it (a `triton_op`, which inductor traces
into, made it clone both buffers every layer), and CUDA graphs capture it. Importing this module needs Triton; the model imports it only when
the kernel is switched on (`Cosmos3Transformer.set_fused_qk_rope`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _qk_norm_rope_kv_kernel(
    qkv_ptr, w_ptr, cos_ptr, sin_ptr, q_ptr, k_ptr, v_ptr,
    stride_qkv, stride_cos_tok, stride_cos_col, stride_sin_tok, stride_sin_col, stride_q_tok, stride_q_head,
    stride_k_tok, stride_k_head, stride_v_tok, stride_v_head, eps,
    HQ: tl.constexpr, HKV: tl.constexpr, HALF: tl.constexpr, HP: tl.constexpr, HVP: tl.constexpr,
    NEMOTRON: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    heads = tl.arange(0, HP)[:, None]  # q heads then k heads, padded to a power of two
    cols = tl.arange(0, HALF)[None, :]
    live = heads < HQ + HKV
    row = qkv_ptr + n * stride_qkv + heads * (2 * HALF)
    lo = tl.load(row + cols, mask=live, other=0.0).to(tl.float32)
    hi = tl.load(row + HALF + cols, mask=live, other=0.0).to(tl.float32)
    inv = tl.rsqrt((tl.sum(lo * lo, axis=1) + tl.sum(hi * hi, axis=1)) / (2 * HALF) + eps)[:, None]
    w_lo = tl.load(w_ptr + heads * (2 * HALF) + cols, mask=live, other=0.0)
    w_hi = tl.load(w_ptr + heads * (2 * HALF) + HALF + cols, mask=live, other=0.0)
    if NEMOTRON:  # scale in fp32, round once
        lo = w_lo.to(tl.float32) * (lo * inv)
        hi = w_hi.to(tl.float32) * (hi * inv)
    else:  # round the normalised value to the weight dtype, then scale (one more rounding)
        lo = ((lo * inv).to(w_lo.dtype) * w_lo).to(tl.float32)
        hi = ((hi * inv).to(w_hi.dtype) * w_hi).to(tl.float32)
    c = tl.load(cos_ptr + n * stride_cos_tok + cols * stride_cos_col).to(tl.float32)
    s = tl.load(sin_ptr + n * stride_sin_tok + cols * stride_sin_col).to(tl.float32)
    out_lo = lo * c - hi * s
    out_hi = hi * c + lo * s
    is_q = heads < HQ
    q_dst = q_ptr + n * stride_q_tok + heads * stride_q_head
    tl.store(q_dst + cols, out_lo.to(q_ptr.dtype.element_ty), mask=is_q)
    tl.store(q_dst + HALF + cols, out_hi.to(q_ptr.dtype.element_ty), mask=is_q)
    is_k = (heads >= HQ) & live
    k_dst = k_ptr + n * stride_k_tok + (heads - HQ) * stride_k_head
    tl.store(k_dst + cols, out_lo.to(k_ptr.dtype.element_ty), mask=is_k)
    tl.store(k_dst + HALF + cols, out_hi.to(k_ptr.dtype.element_ty), mask=is_k)
    vh = tl.arange(0, HVP)[:, None]
    vcols = tl.arange(0, 2 * HALF)[None, :]
    v_live = vh < HKV
    v = tl.load(qkv_ptr + n * stride_qkv + (HQ + HKV + vh) * (2 * HALF) + vcols, mask=v_live)
    tl.store(v_ptr + n * stride_v_tok + vh * stride_v_head + vcols, v, mask=v_live)


@torch.library.custom_op("cosmos3::qk_norm_rope_kv", mutates_args={"k_buf", "v_buf"})
def qk_norm_rope_kv(
    qkv: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_buf: torch.Tensor,
    v_buf: torch.Tensor, start: int, eps: float, nemotron: bool, q_head_major: bool,
) -> torch.Tensor:
    """qkv [N, (Hq + 2·Hkv)·D] (unit last stride), weight [Hq + Hkv, D] contiguous, cos/sin [N, D/2] (any strides);
    k_buf / v_buf [Hkv, L + N, D] views (any layout with unit last stride): rows [start:start + N] get this
    step's normed, rotated keys and its values. Returns the normed, rotated queries as an [N, Hq, D] view,
    head-major storage when `q_head_major` (for SDPA), token-major otherwise (fa4)."""
    if qkv.stride(1) != 1 or not weight.is_contiguous() or k_buf.stride(2) != 1 or v_buf.stride(2) != 1:
        raise ValueError("qk_norm_rope_kv: qkv, k_buf and v_buf need a unit last stride and weight contiguous")
    n_tok = qkv.shape[0]
    hkv, _, d = k_buf.shape
    hq = weight.shape[0] - hkv
    q = _new_queries(qkv, weight, k_buf, q_head_major)
    k_tail, v_tail = k_buf[:, start:].transpose(0, 1), v_buf[:, start:].transpose(0, 1)  # [N, Hkv, D]
    _qk_norm_rope_kv_kernel[(n_tok,)](
        qkv, weight, cos, sin, q, k_tail, v_tail,
        qkv.stride(0), *cos.stride(), *sin.stride(), q.stride(0), q.stride(1), k_tail.stride(0), k_tail.stride(1),
        v_tail.stride(0), v_tail.stride(1), eps,
        HQ=hq, HKV=hkv, HALF=d // 2, HP=triton.next_power_of_2(hq + hkv), HVP=triton.next_power_of_2(hkv),
        NEMOTRON=nemotron, num_warps=8,
    )
    return q


@qk_norm_rope_kv.register_fake
def _(qkv, weight, cos, sin, k_buf, v_buf, start, eps, nemotron, q_head_major):
    return _new_queries(qkv, weight, k_buf, q_head_major)


def _new_queries(qkv: torch.Tensor, weight: torch.Tensor, k_buf: torch.Tensor, head_major: bool) -> torch.Tensor:
    """The op's output: [N, Hq, D], head-major storage (a transposed [Hq, N, D]) or token-major."""
    n_tok, (hkv, _, d) = qkv.shape[0], k_buf.shape
    hq = weight.shape[0] - hkv
    if head_major:
        return qkv.new_empty((hq, n_tok, d)).transpose(0, 1)
    return qkv.new_empty((n_tok, hq, d))
