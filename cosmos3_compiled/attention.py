"""The attention path: which kernel runs attention, and the memory layouts that kernel reads fastest.

One path object per model (`Cosmos3Transformer.set_attention`), built by `build_attention(name)`:

    SDPA backends (auto | cudnn | flash | efficient | math): head-major K/V buffers and queries
        ([H, N, D] storage), which is what PyTorch's fused SDPA kernels read without a copy; grouped KV heads
        go through SDPA's native `enable_gqa` (query head h reads kv head h // groups).
    fa4: FlashAttention-4 (the CuTe-DSL kernels of the optional `flash-attn-4` package), token-major
        ([N, H, D] storage) in and out: its kernels read that layout fastest and the token-major output is
        what the out-projection reads, so no transpose follows. GQA is native in the kernel.

`fp8` (set per step on the host by `fp8.set_step_regime`; a Python constant to the compiler, so each value is
its own graph): the non-causal attention runs `fp8_attention.attention` (FP8 Q/K/V, `precision.fp8_attention`)
instead of the path's kernel; causal (text-tower) attention stays in 16 bits.

Every path takes head-major *views* q [Hq, N, D], k/v [Hkv, M, D] (whatever their storage) and returns
[N, Hq·D]. Sequence parallelism wraps a path from outside (`distributed.UlyssesAttention`).

FA4 reaches the compiler as one custom op (`cosmos3::fa4_attention`) with a fake implementation, so a
`fullgraph=True` compile sees a single opaque node instead of tracing into the DSL launcher; CUDA-graph
capture works once a warm-up call has JIT-compiled the kernel. Install it with `pip install -e ".[fa4]"`
(see pyproject.toml for the pinned pre-release); nothing imports it until the op first runs.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.nn.attention import SDPBackend, sdpa_kernel

from . import fp8_attention, ops
from .errors import RequestError

SDPA_BACKENDS = {
    "auto": None,  # PyTorch picks (a job resolves `auto` first: defaults.py)
    "sdpa": None,  # PyTorch picks
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
BACKENDS = (*SDPA_BACKENDS, "fa4")


def check_backend(backend: str, device: torch.device, dtype: torch.dtype) -> None:
    """Raise a one-line `RequestError` when `backend` cannot run on `device` with `dtype` (before heavy work)."""
    if backend not in BACKENDS:
        raise RequestError(f"unknown model.attention_backend {backend!r}; choose {', '.join(BACKENDS)}")
    if backend != "fa4":
        return
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RequestError("model.attention_backend=fa4 needs device=cuda on a GPU of compute capability 9.0 or newer")
    if importlib.util.find_spec("flash_attn") is None or importlib.util.find_spec("flash_attn.cute") is None:
        raise RequestError("model.attention_backend=fa4 needs the flash-attn-4 package (pip install -e '.[fa4]'); "
                           "use cudnn or auto otherwise")
    major, _ = torch.cuda.get_device_capability(device)
    if major < 9:
        raise RequestError(f"model.attention_backend=fa4 needs compute capability 9.0 or newer; this GPU is sm{major}x")
    if dtype not in (torch.float16, torch.bfloat16):
        raise RequestError(f"model.attention_backend=fa4 runs 16-bit inputs only (got {dtype}): use dtype=bfloat16")


@torch.library.custom_op("cosmos3::fa4_attention", mutates_args=())
def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """q [B, N, Hq, D], k/v [B, M, Hkv, D] (any strides with a unit last stride) → [B, N, Hq, Dv] contiguous."""
    from flash_attn.cute import flash_attn_func  # optional package: imported when the kernel first runs

    out, _ = flash_attn_func(q, k, v, causal=causal)
    return out


@fa4_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


class AttentionPath:
    """SDPA (one backend, or PyTorch's choice) over head-major storage."""

    head_major_queries = True  # the layout `new_queries` allocates (also told to the fused prologue kernel)
    fuses_prologue = True  # the fused q/k-norm + RoPE + K/V-write kernel may feed it (keys stay on this device)
    fp8 = False  # the non-causal attention in FP8 (fp8_attention.py), set per step by fp8.set_step_regime

    def __init__(self, backend: str = "auto"):
        if backend not in SDPA_BACKENDS:
            raise RequestError(f"unknown attention backend {backend!r}; choose {', '.join(BACKENDS)}")
        self.name = backend
        self.kernel = SDPA_BACKENDS[backend]

    def new_kv_buffer(self, tokens: int, heads: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """A zeroed [heads, tokens, dim] K or V buffer (a view of whatever storage the kernel wants)."""
        return torch.zeros((heads, tokens, dim), device=device, dtype=dtype)

    def new_queries(self, tokens: int, heads: int, dim: int, like: torch.Tensor) -> torch.Tensor:
        """An empty [tokens, heads, dim] query tensor (a view of the storage the kernel wants): RoPE writes it."""
        return like.new_empty((heads, tokens, dim)).transpose(0, 1)

    def text_kv(self, k_buf: torch.Tensor, v_buf: torch.Tensor, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[L, Hkv, D] tensors the text tower writes its keys and values into: here rows [:L] of the buffers."""
        return k_buf[:, :text_len].transpose(0, 1), v_buf[:, :text_len].transpose(0, 1)

    def keep_text_kv(self, k_buf: torch.Tensor, v_buf: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store what the text tower wrote into `text_kv`'s tensors (already in place here)."""

    def video_step(
        self, qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_buf: torch.Tensor,
        v_buf: torch.Tensor,
    ) -> torch.Tensor:
        """The video tower's attention for one branch: RoPE on the normed qk [N, Hq+Hkv, D], this step's keys
        and values v [N, Hkv, D] written into the tail of the branch's buffers, attention over all of them."""
        n, hkv = qk.shape[0], k_buf.shape[0]
        hq, start = qk.shape[1] - hkv, k_buf.shape[1] - n
        q = ops.apply_rope(qk[:, :hq], cos, sin, out=self.new_queries(n, hq, qk.shape[2], qk))
        ops.apply_rope(qk[:, hq:], cos, sin, out=k_buf[:, start:].transpose(0, 1))
        v_buf[:, start:] = v.transpose(0, 1)
        return self(q.transpose(0, 1), k_buf, v_buf, False)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        """q [Hq, N, D], k/v [Hkv, M, D] (views, any storage) → [N, Hq·D]."""
        if self.fp8 and not causal:
            return fp8_attention.attention(q, k, v)
        args = (q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0))
        gqa = k.shape[0] != q.shape[0]
        if self.kernel is None:
            out = F.scaled_dot_product_attention(*args, is_causal=causal, enable_gqa=gqa)
        else:
            with sdpa_kernel(self.kernel):
                out = F.scaled_dot_product_attention(*args, is_causal=causal, enable_gqa=gqa)
        return rearrange(out, "1 h n d -> n (h d)")


class FA4Attention(AttentionPath):
    """FlashAttention-4 over token-major storage."""

    head_major_queries = False

    def __init__(self):
        self.name, self.kernel = "fa4", None

    def new_kv_buffer(self, tokens: int, heads: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return torch.zeros((tokens, heads, dim), device=device, dtype=dtype).transpose(0, 1)

    def new_queries(self, tokens: int, heads: int, dim: int, like: torch.Tensor) -> torch.Tensor:
        return like.new_empty((tokens, heads, dim))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        hq, n, _ = q.shape
        if self.fp8 and not causal:
            return fp8_attention.attention(q, k, v)
        if causal and n != k.shape[1]:  # FA aligns causal masks bottom-right, SDPA (the reference) top-left
            return super().__call__(q, k, v, causal)
        out = fa4_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], causal)
        return out.reshape(n, hq * v.shape[-1])  # token-major [1, N, Hq, D] already: no copy


def build_attention(backend: str) -> AttentionPath:
    """The attention path for a backend name (auto | cudnn | flash | efficient | math | fa4)."""
    return FA4Attention() if backend == "fa4" else AttentionPath(backend)
