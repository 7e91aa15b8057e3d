"""Optional attention backend: FlashAttention-4 (the CuTe-DSL kernels of the `flash-attn-4` package).

On Hopper (sm90) and Blackwell it runs the FA3/FA4-style warp-specialised kernels, which the SDPA backends of
the PyTorch build may not ship. GQA is native (no K/V copy) and the output comes back token-major
[B, N, H, D], which is the layout the out-projection reads, so no transpose follows it.

The kernel is exposed to the compiler as one custom op (`cosmos3::fa4_attention`) with a fake
implementation, so a `fullgraph=True` compile sees a single opaque node instead of tracing into the DSL
launcher; CUDA-graph capture works once the kernel has been JIT-compiled by a warm-up call.

Install: `pip install -e ".[fa4]"` (flash-attn-4 4.0.0b36, a pre-release; add `nvidia-cutlass-dsl[cu13]` for a
CUDA 13 build of torch). Nothing here imports it until the backend is selected.
"""

from __future__ import annotations

import importlib.util

import torch


def check_available(device: torch.device | None = None) -> None:
    """Raise a clear error when the fa4 backend cannot run here (checked once, before any heavy work)."""
    if importlib.util.find_spec("flash_attn") is None or importlib.util.find_spec("flash_attn.cute") is None:
        raise RuntimeError(
            "attention backend 'fa4' needs the flash-attn-4 package (pip install -e '.[fa4]'); "
            "choose model.attention_backend=cudnn or auto otherwise"
        )
    if not torch.cuda.is_available():
        raise RuntimeError("attention backend 'fa4' needs a CUDA GPU (sm90 or newer)")
    major, _ = torch.cuda.get_device_capability(device)
    if major < 9:
        raise RuntimeError(f"attention backend 'fa4' needs compute capability ≥ 9.0; this GPU is sm{major}x")


@torch.library.custom_op("cosmos3::fa4_attention", mutates_args=())
def fa4_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """q [B, N, Hq, D], k/v [B, M, Hkv, D] (any strides with a unit last stride) → [B, N, Hq, Dv] contiguous."""
    from flash_attn.cute import flash_attn_func

    out, _ = flash_attn_func(q, k, v, causal=causal)
    return out


@fa4_attention.register_fake
def _(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    return q.new_empty((*q.shape[:-1], v.shape[-1]))
