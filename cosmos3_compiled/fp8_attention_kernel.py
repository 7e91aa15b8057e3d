"""The Triton kernel behind `cosmos3::fp8_attention` (fp8_attention.py states the arithmetic). Needs Triton.

One program per (block of BLOCK_M queries, query head): the queries stay in registers, key blocks of BLOCK_N
stream through with an online base-2 softmax; both products run on FP8 tensor cores with fp32 accumulation.
The full key blocks run without masks, the one partial block (text length + video tokens is rarely a multiple
of BLOCK_N) after them with one. The output is written token-major ([N, Hq·D]), the layout the
out-projection reads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_attention import P_SCALE

CONFIGS = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
           for bm, bn, w, s in ((128, 128, 8, 3), (128, 64, 4, 4), (128, 128, 4, 3), (64, 128, 4, 3),
                                (128, 64, 8, 3), (128, 128, 8, 4))]


@triton.jit
def _block(acc, run_max, run_sum, q, k_ptrs, v_ptrs, s_qk, start, M, P_SC: tl.constexpr, MASK: tl.constexpr,
           BLOCK_N: tl.constexpr, stride_kn, stride_vn):
    offs_n = start + tl.arange(0, BLOCK_N)
    if MASK:
        k = tl.load(k_ptrs + start * stride_kn, mask=offs_n[None, :] < M, other=0.0)
        v = tl.load(v_ptrs + start * stride_vn, mask=offs_n[:, None] < M, other=0.0)
    else:
        k = tl.load(k_ptrs + start * stride_kn)
        v = tl.load(v_ptrs + start * stride_vn)
    s = tl.dot(q, k) * s_qk
    if MASK:
        s = tl.where(offs_n[None, :] < M, s, float("-inf"))
    new_max = tl.maximum(run_max, tl.max(s, 1))
    alpha = tl.math.exp2(run_max - new_max)
    p = tl.math.exp2(s - new_max[:, None])
    run_sum = run_sum * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot((p * P_SC).to(v.dtype), v, acc)
    return acc, new_max, run_sum


@triton.autotune(configs=CONFIGS, key=["N", "M", "D"])
@triton.jit
def _fp8_attention_kernel(
    q_ptr, k_ptr, v_ptr, sqk_ptr, sv_ptr, o_ptr, N, M,
    stride_qh, stride_qn, stride_kh, stride_kn, stride_vh, stride_vd, stride_on,
    GROUPS: tl.constexpr, D: tl.constexpr, P_SC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m, h = tl.program_id(0), tl.program_id(1)
    kv = h // GROUPS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + h.to(tl.int64) * stride_qh + offs_m[:, None].to(tl.int64) * stride_qn + offs_d[None, :],
                mask=offs_m[:, None] < N, other=0.0)
    # K as a [D, BLOCK_N] tile (k stored [M, D], D contiguous: the K-major B operand of q·kᵀ);
    # V as a [BLOCK_N, D] tile of the [D, M] storage (keys contiguous: K-major for p·v)
    k_ptrs = k_ptr + kv.to(tl.int64) * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None]
    v_ptrs = v_ptr + kv.to(tl.int64) * stride_vh + offs_d[None, :] * stride_vd + offs_n[:, None]
    s_qk = tl.load(sqk_ptr + h)
    acc = tl.zeros((BLOCK_M, D), dtype=tl.float32)
    run_max = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    full = (M // BLOCK_N) * BLOCK_N
    for start in range(0, full, BLOCK_N):
        acc, run_max, run_sum = _block(acc, run_max, run_sum, q, k_ptrs, v_ptrs, s_qk, start, M, P_SC, False,
                                       BLOCK_N, stride_kn, 1)
    if full < M:
        acc, run_max, run_sum = _block(acc, run_max, run_sum, q, k_ptrs, v_ptrs, s_qk, full, M, P_SC, True,
                                       BLOCK_N, stride_kn, 1)
    out = acc * (tl.load(sv_ptr + kv) / (P_SC * run_sum))[:, None]
    o_ptrs = o_ptr + offs_m[:, None].to(tl.int64) * stride_on + h * D + offs_d[None, :]
    tl.store(o_ptrs, out.to(o_ptr.dtype.element_ty), mask=offs_m[:, None] < N)


def launch(q8: torch.Tensor, k8: torch.Tensor, v8t: torch.Tensor, s_qk: torch.Tensor, sv: torch.Tensor,
           out_dtype: torch.dtype) -> torch.Tensor:
    """q8 [Hq, N, D] (unit last stride), k8 [Hkv, M, D] and v8t [Hkv, D, M] contiguous → [N, Hq·D]."""
    hq, n, d = q8.shape
    hkv, m = k8.shape[0], k8.shape[1]
    if q8.stride(-1) != 1 or not (k8.is_contiguous() and v8t.is_contiguous()):
        raise ValueError("fp8_attention: q8 needs a unit last stride, k8 and v8t contiguous storage")
    out = torch.empty((n, hq * d), device=q8.device, dtype=out_dtype)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]), hq)

    _fp8_attention_kernel[grid](
        q8, k8, v8t, s_qk, sv, out, n, m, q8.stride(0), q8.stride(1), k8.stride(0), k8.stride(1), v8t.stride(0),
        v8t.stride(1), out.stride(0), GROUPS=hq // hkv, D=d, P_SC=P_SCALE,
    )
    return out
