"""FP8 attention for the W8A8 steps of an FP8 checkpoint (`precision.fp8_attention=true`; off by default).

Not part of the reference's semantics: the reference runs attention in bf16 at every step. With the option on,
the video tower's (non-causal) attention of every step whose generation linears run W8A8 reads its queries,
keys and values in float8_e4m3fn; the text tower's causal attention and the W8A16 steps stay in bf16.

The arithmetic, identical in the Triton kernel (CUDA) and in `emulate` (the CPU path and the tests' reference):

    q8 = fp8(q · c / sq)   with c = softmax scale · log2(e) and sq = amax|q · c| / 448 per query head
    k8 = fp8(k / sk),  v8 = fp8(v / sv)   with sk, sv = amax / 448 per KV head
    s  = (q8 · k8ᵀ) · sq · sk                          (fp32 accumulation: the base-2 logits)
    p  = 2^(s − running max);  l = Σ p                 (fp32, online over key blocks)
    o  = Σ fp8(p · 256) · v8 · sv / (256 · l)         (P scaled into fp8's normal range before its rounding)

Scales are computed on the device every call (no host sync, no calibration); the queries/keys are RMS-normed
before RoPE, so their per-head amax stays close to the typical value and fp8's relative precision is kept.
V is quantized into a [Hkv, D, M] (key-minor) buffer: Hopper's FP8 tensor-core MMA reads its B operand
K-major, and for P·V the reduction runs over keys.

The kernel reaches the compiler as one opaque custom op (`cosmos3::fp8_attention`) with a fake
implementation, as FlashAttention-4 does (attention.py); the quantization around it is plain torch, traced and
fused by inductor. Importing `triton` happens only when the op first runs on CUDA.
"""

from __future__ import annotations

import math

import torch

from .errors import RequestError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
P_SCALE = 256.0  # P ∈ (0, 1] is multiplied by this before its fp8 rounding (fewer subnormals), divided out at the end
LOG2E = math.log2(math.e)


def quantize_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """q [Hq, N, D], k/v [Hkv, M, D] (any strides) → (q8 [Hq, N, D], k8 [Hkv, M, D], v8t [Hkv, D, M] contiguous,
    sq·sk [Hq] fp32 (the logit scale, per query head), sv [Hkv] fp32), per the module docstring."""
    hq, hkv, d = q.shape[0], k.shape[0], q.shape[-1]
    qc, kf, vf = q.float() * (LOG2E / math.sqrt(d)), k.float(), v.float()
    sq, sk, sv = (t.abs().amax(dim=(1, 2)).clamp_min(1e-12) / FP8_MAX for t in (qc, kf, vf))
    q8 = (qc / sq[:, None, None]).to(FP8)
    k8 = (kf / sk[:, None, None]).to(FP8).contiguous()
    v8t = (vf / sv[:, None, None]).to(FP8).transpose(1, 2).contiguous()
    s_qk = sq * sk.repeat_interleave(hq // hkv)
    return q8, k8, v8t, s_qk, sv


def emulate(q8: torch.Tensor, k8: torch.Tensor, v8t: torch.Tensor, s_qk: torch.Tensor, sv: torch.Tensor,
            out_dtype: torch.dtype, block: int = 128) -> torch.Tensor:
    """The kernel's arithmetic in plain torch (float32, the same online softmax over `block`-key blocks and the
    same fp8 rounding of P): q8 [Hq, N, D], k8 [Hkv, M, D], v8t [Hkv, D, M] → [N, Hq·D] in `out_dtype`."""
    hq, n, d = q8.shape
    hkv, m = k8.shape[0], k8.shape[1]
    g = hq // hkv
    kf = k8.float().repeat_interleave(g, dim=0)  # [Hq, M, D]
    vf = v8t.float().transpose(1, 2).repeat_interleave(g, dim=0)  # [Hq, M, D]
    qf = q8.float()
    run_max = torch.full((hq, n, 1), -math.inf, device=q8.device)
    run_sum = torch.zeros((hq, n, 1), device=q8.device)
    acc = torch.zeros((hq, n, d), device=q8.device)
    for start in range(0, m, block):
        s = (qf @ kf[:, start:start + block].transpose(1, 2)) * s_qk[:, None, None]
        new_max = torch.maximum(run_max, s.amax(dim=-1, keepdim=True))
        alpha = torch.exp2(run_max - new_max)
        p = torch.exp2(s - new_max)
        run_sum = run_sum * alpha + p.sum(dim=-1, keepdim=True)
        p8 = (p * P_SCALE).to(FP8).float()
        acc = acc * alpha + p8 @ vf[:, start:start + block]
        run_max = new_max
    out = acc * sv.repeat_interleave(g)[:, None, None] / (P_SCALE * run_sum)
    return out.transpose(0, 1).reshape(n, hq * d).to(out_dtype)


def check_supported(device: torch.device) -> None:
    """Raise a one-line `RequestError` when `device` is a GPU without FP8 tensor cores (before heavy work)."""
    if device.type != "cuda":
        return  # the CPU runs the emulation
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise RequestError(f"precision.fp8_attention=true needs FP8 tensor cores (compute capability 8.9 or newer); "
                           f"this GPU is sm{major}{minor}")


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Non-causal FP8 attention: q [Hq, N, D], k/v [Hkv, M, D] (views, any storage) → [N, Hq·D] in q's dtype.
    The Triton kernel on CUDA, `emulate` elsewhere."""
    q8, k8, v8t, s_qk, sv = quantize_qkv(q, k, v)
    if q.device.type == "cuda":
        return torch.ops.cosmos3.fp8_attention(q8, k8, v8t, s_qk, sv, q.dtype)
    return emulate(q8, k8, v8t, s_qk, sv, q.dtype)


@torch.library.custom_op("cosmos3::fp8_attention", mutates_args=())
def fp8_attention_op(q8: torch.Tensor, k8: torch.Tensor, v8t: torch.Tensor, s_qk: torch.Tensor, sv: torch.Tensor,
                     out_dtype: torch.dtype) -> torch.Tensor:
    """The Triton kernel (CUDA): the inputs of `emulate` → [N, Hq·D] contiguous in `out_dtype`."""
    from . import fp8_attention_kernel  # needs Triton: imported when the op first runs

    return fp8_attention_kernel.launch(q8, k8, v8t, s_qk, sv, out_dtype)


@fp8_attention_op.register_fake
def _(q8, k8, v8t, s_qk, sv, out_dtype):
    hq, n, d = q8.shape
    return q8.new_empty((n, hq * d), dtype=out_dtype)
