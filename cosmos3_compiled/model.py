"""Cosmos3 Omni transformer (video generation path), written for the compiler.

Two towers share each layer: the text tower ("und") and the video tower ("gen"). The text tower never
sees video tokens or the timestep, so its per-layer keys/values are computed once per prompt
(`text_pass`) into static buffers; the video tower runs every denoising step (`video_step`), writing
its own keys/values into the tail of the same buffers so attention reads one contiguous sequence.

Reads in paper order: embed → blocks → head. No compile calls, no distributed code, no file I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import attention_fa4, ops
from .config import TransformerConfig

_SDPA_BACKENDS = {
    "cudnn": "CUDNN_ATTENTION",
    "flash": "FLASH_ATTENTION",
    "efficient": "EFFICIENT_ATTENTION",
    "math": "MATH",
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, style: str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.style = style

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, self.style)


class MLP(nn.Module):
    """`down(silu(gate(x)) · up(x))`, or the Edge `down(relu(up(x))²)`; gate|up may be fused into `gate_up`."""

    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.act = act
        self.hidden = hidden
        if act == "silu":
            self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.fused = False

    def fuse_(self) -> None:
        """Replace gate_proj and up_proj by one `gate_up` linear (one GEMM instead of two)."""
        if self.act != "silu" or self.fused:
            return
        w = torch.cat([self.gate_proj.weight.data, self.up_proj.weight.data])
        self.gate_up = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        self.gate_up.weight = nn.Parameter(w, requires_grad=False)
        del self.gate_proj, self.up_proj
        self.fused = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.activation(x))

    def activation(self, x: torch.Tensor) -> torch.Tensor:
        """Everything before down_proj: silu(gate(x)) · up(x), or relu(up(x))²."""
        if self.act == "relu2":
            act = torch.relu(self.up_proj(x))
            return act * act
        if self.fused:
            gate, up = self.gate_up(x).split(self.hidden, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return F.silu(gate) * up


def fused_qk_rope_supported(device: torch.device) -> bool:
    """Whether the fused q/k-norm + RoPE + K/V-write kernel (`triton_kernels`) can run on `device`."""
    import importlib.util

    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def add_linear(h: torch.Tensor, x: torch.Tensor, linear: nn.Linear) -> torch.Tensor:
    """h + linear(x); without a bias, accumulated into h in place (see `ops.add_linear_`). h is consumed."""
    if linear.bias is not None:
        return h + linear(x)
    ops.add_linear_(h, x, linear.weight)
    return h


class Attention(nn.Module):
    """Weights of both towers' attention, under the official key names."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d, hd, hq, hkv, bias = (
            cfg.hidden_size, cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.attention_bias,
        )
        self.hq, self.hkv, self.hd = hq, hkv, hd
        # text tower
        self.to_q = nn.Linear(d, hq * hd, bias=bias)
        self.to_k = nn.Linear(d, hkv * hd, bias=bias)
        self.to_v = nn.Linear(d, hkv * hd, bias=bias)
        self.to_out = nn.Linear(hq * hd, d, bias=bias)
        if cfg.qk_norm_for_text:
            self.norm_q = RMSNorm(hd, cfg.rms_norm_eps, cfg.norm_style)
            self.norm_k = RMSNorm(hd, cfg.rms_norm_eps, cfg.norm_style)
        if cfg.use_und_k_norm_for_gen:
            self.k_norm_und_for_gen = RMSNorm(hd, cfg.rms_norm_eps, cfg.norm_style)
        # video tower
        self.add_q_proj = nn.Linear(d, hq * hd, bias=bias)
        self.add_k_proj = nn.Linear(d, hkv * hd, bias=bias)
        self.add_v_proj = nn.Linear(d, hkv * hd, bias=bias)
        self.to_add_out = nn.Linear(hq * hd, d, bias=bias)
        self.norm_added_q = RMSNorm(hd, cfg.rms_norm_eps, cfg.norm_style)
        self.norm_added_k = RMSNorm(hd, cfg.rms_norm_eps, cfg.norm_style)
        self.fused = False

    def fuse_(self) -> None:
        """One q|k|v GEMM for the video tower, and the q/k norm weights laid out per head for `apply_qk_norm`."""
        if self.fused:
            return
        lin = [self.add_q_proj, self.add_k_proj, self.add_v_proj]
        w = torch.cat([m.weight.data for m in lin])
        b = torch.cat([m.bias.data for m in lin]) if lin[0].bias is not None else None
        self.gen_qkv = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
        self.gen_qkv.weight = nn.Parameter(w, requires_grad=False)
        if b is not None:
            self.gen_qkv.bias = nn.Parameter(b, requires_grad=False)
        del self.add_q_proj, self.add_k_proj, self.add_v_proj
        self.fused = True

    def gen_qk_norm_weight(self) -> torch.Tensor:
        q = self.norm_added_q.weight.expand(self.hq, self.hd)
        k = self.norm_added_k.weight.expand(self.hkv, self.hd)
        return torch.cat([q, k])  # [Hq + Hkv, D]



GQA_MODES = ("native", "expand", "fold")


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, backend: str = "auto", gqa: str = "native"
) -> torch.Tensor:
    """SDPA over head-major q [Hq, N, D], k/v [Hkv, M, D] → [N, Hq·D]. GQA: head h reads kv head h // groups.

    How grouped heads reach the kernel (all exact):
      native: SDPA's `enable_gqa`;
      expand: K/V copied out to Hq heads first (plain MHA, costs a copy per call);
      fold:   the `groups` query heads that share a KV head are laid end to end as one query sequence,
              q [Hq, N, D] → [Hkv, groups·N, D] (free when q is head-major contiguous), so the kernel runs
              plain MHA over Hkv heads with no copy of K/V. Softmax is per query row, so nothing changes;
              causal attention can't fold (row positions would move) and falls back to native.
    """
    hq, n, d = q.shape
    groups = hq // k.shape[0]
    if backend == "fa4" and not (causal and n != k.shape[1]):  # FA aligns causal masks bottom-right; SDPA top-left
        out = attention_fa4.fa4_attention(  # token-major views in, token-major [1, N, Hq, D] out: no copies
            q.transpose(0, 1).unsqueeze(0), k.transpose(0, 1).unsqueeze(0), v.transpose(0, 1).unsqueeze(0), causal
        )
        return out.reshape(n, hq * v.shape[-1])
    if groups > 1 and gqa == "fold" and not causal:
        qh = q.reshape(k.shape[0], groups * n, d).unsqueeze(0)
        out = _sdpa(qh, k.unsqueeze(0), v.unsqueeze(0), False, backend, False)  # [1, Hkv, groups·N, D]
        return rearrange(out.reshape(hq, n, d), "h n d -> n (h d)")
    kh, vh = k.unsqueeze(0), v.unsqueeze(0)
    if groups > 1 and gqa == "expand":
        kh, vh = kh.repeat_interleave(groups, dim=1), vh.repeat_interleave(groups, dim=1)  # [1, Hq, M, D]
    out = _sdpa(q.unsqueeze(0), kh, vh, causal, backend, kh.shape[1] != hq)
    return rearrange(out, "1 h n d -> n (h d)")  # [N, Hq·D]


def _sdpa(q, k, v, causal: bool, backend: str, enable_gqa: bool) -> torch.Tensor:
    if backend in ("auto", "fa4"):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=enable_gqa)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(getattr(SDPBackend, _SDPA_BACKENDS[backend])):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=enable_gqa)


def head_major(shape_tokens: int, heads: int, dim: int, like: torch.Tensor) -> torch.Tensor:
    """An [N, H, D] view whose storage is head-major [H, N, D]: RoPE writes land where SDPA wants them."""
    return like.new_empty((heads, shape_tokens, dim)).transpose(0, 1)


class Cosmos3Layer(nn.Module):
    """One decoder layer. `forward` is the video tower's step (the repeated block compiled regionally);
    `text_forward` is the text tower, run once per prompt."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        d, eps, style = cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_style
        self.cfg = cfg
        self.self_attn = Attention(cfg)
        self.mlp = MLP(d, cfg.intermediate_size, cfg.hidden_act)
        self.mlp_moe_gen = MLP(d, cfg.intermediate_size, cfg.hidden_act)
        self.input_layernorm = RMSNorm(d, eps, style)
        self.input_layernorm_moe_gen = RMSNorm(d, eps, style)
        self.post_attention_layernorm = RMSNorm(d, eps, style)
        self.post_attention_layernorm_moe_gen = RMSNorm(d, eps, style)
        self.attn_backend = "auto"
        self.gqa = "native"  # how grouped KV heads reach SDPA: see `attention`
        self.fused_qk_rope = False  # video step's q/k norm + RoPE + K/V writes as one Triton kernel (CUDA)
        # The attention residual accumulates into the layer's input in place (no copy of h); compile modes whose
        # CUDA graphs (inductor's cudagraph trees) refuse graphs that mutate an input turn this off.
        self.accumulate_into_input = True
        self.sequence_parallel = None  # distributed.Ulysses under sequence parallelism (apply_sequence_parallel)

    def setup_buffers(self) -> None:
        """Static per-head q|k norm weight for the video tower (rebuilt whenever weights change)."""
        self.register_buffer("gen_qk_norm_weight", self.self_attn.gen_qk_norm_weight().detach().clone(), persistent=False)

    def text_forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor,
        last: bool,
    ) -> torch.Tensor:
        """Text tower on h [L, d]; writes the keys the video tower reads (after norm and RoPE) and the values
        into k_out / v_out ([L, Hkv, D] views of the head-major buffers). The last layer's text attention
        output and MLP are skipped: nothing downstream reads them."""
        a, cfg = self.self_attn, self.cfg
        L = h.shape[0]
        x = self.input_layernorm(h)
        q = a.to_q(x).view(L, a.hq, a.hd)
        k = a.to_k(x).view(L, a.hkv, a.hd)
        v_out.copy_(a.to_v(x).view(L, a.hkv, a.hd))
        if cfg.qk_norm_for_text:
            q, k = a.norm_q(q), a.norm_k(k)
        k_for_gen = a.k_norm_und_for_gen(k) if cfg.use_und_k_norm_for_gen else k
        ops.apply_rope(k_for_gen, cos, sin, out=k_out)
        if last:
            return h
        q = ops.apply_rope(q, cos, sin, out=head_major(L, a.hq, a.hd, q))
        k = ops.apply_rope(k, cos, sin, out=head_major(L, a.hkv, a.hd, k))
        h = h + a.to_out(attention(q.transpose(0, 1), k.transpose(0, 1), v_out.transpose(0, 1), True, self.attn_backend))
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward(
        self, h: torch.Tensor, k_bufs: tuple[torch.Tensor, ...], v_bufs: tuple[torch.Tensor, ...], cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """Video tower on h [B·N, d]: the tokens of B CFG branches (usually B = 1) stacked, so they share
        every linear. k_bufs / v_bufs hold one [Hkv, L_b + N, D] buffer per branch with the text keys/values
        in positions [:L_b]; each branch's keys (after norm and RoPE) and values are written straight into
        [L_b:], and attention runs per branch. cos / sin: [B·N, D/2].

        Under sequence parallelism (B = 1) h holds this rank's N/deg tokens and the buffers this rank's
        Hkv/deg heads for all L + N positions: see `_sequence_parallel_attention`."""
        a = self.self_attn
        qkv = a.gen_qkv(self.input_layernorm_moe_gen(h))  # [M, (Hq + 2·Hkv)·D]
        out = self._attention(qkv, k_bufs, v_bufs, cos, sin)  # [M, Hq·D]
        if self.accumulate_into_input:  # the layer's input h is consumed (accumulated in place)
            h = add_linear(h, out, a.to_add_out)
        else:
            h = h + a.to_add_out(out)
        mlp = self.mlp_moe_gen
        return add_linear(h, mlp.activation(self.post_attention_layernorm_moe_gen(h)), mlp.down_proj)

    def _attention(
        self, qkv: torch.Tensor, k_bufs: tuple[torch.Tensor, ...], v_bufs: tuple[torch.Tensor, ...], cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """q/k norm, RoPE, this step's K/V written into each branch's buffers, attention per branch → [M, Hq·D].
        With `fused_qk_rope` everything before attention is one Triton kernel per branch; otherwise the
        composable ops, whose queries get their own storage: head-major [Hq, N, D] for SDPA (contiguous for
        `fold`), token-major [N, Hq, D] for fa4 (what its kernel reads fastest)."""
        a, cfg = self.self_attn, self.cfg
        M, B = qkv.shape[0], len(k_bufs)
        N = M // B
        qk_heads = a.hq + a.hkv
        fused = self.fused_qk_rope and self.sequence_parallel is None
        if not fused:
            qk = qkv[:, : qk_heads * a.hd].view(M, qk_heads, a.hd)
            qk = ops.apply_qk_norm(qk, self.gen_qk_norm_weight, cfg.rms_norm_eps, cfg.norm_style)  # [M, Hq+Hkv, D]
            if self.sequence_parallel is not None:
                (k_buf,), (v_buf,) = k_bufs, v_bufs
                return self._sequence_parallel_attention(qk, qkv[:, qk_heads * a.hd :], k_buf, v_buf, cos, sin)
            v = qkv[:, qk_heads * a.hd :].view(M, a.hkv, a.hd)
        outs = []
        for b, (k_buf, v_buf) in enumerate(zip(k_bufs, v_bufs)):
            rows = slice(b * N, (b + 1) * N)
            L = k_buf.shape[1] - N
            if fused:
                q = torch.ops.cosmos3.qk_norm_rope_kv(
                    qkv[rows], self.gen_qk_norm_weight, cos[rows], sin[rows], k_buf, v_buf, L,
                    cfg.rms_norm_eps, cfg.norm_style == "nemotron", self.attn_backend != "fa4",
                )
            else:
                q_out = qk.new_empty((N, a.hq, a.hd)) if self.attn_backend == "fa4" else head_major(N, a.hq, a.hd, qk)
                q = ops.apply_rope(qk[rows, : a.hq], cos[rows], sin[rows], out=q_out)
                ops.apply_rope(qk[rows, a.hq :], cos[rows], sin[rows], out=k_buf[:, L:].transpose(0, 1))
                v_buf[:, L:] = v[rows].transpose(0, 1)
            outs.append(attention(q.transpose(0, 1), k_buf, v_buf, False, self.attn_backend, self.gqa))
        return outs[0] if B == 1 else torch.cat(outs)  # attention outputs (not K/V): one cat for B > 1

    def _sequence_parallel_attention(
        self, qk: torch.Tensor, v: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor, cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """Ulysses: qk [n, Hq+Hkv, D] (normed) and v [n, Hkv·D] of this rank's n = ⌈N/deg⌉ tokens → attention
        output [n, Hq·D]. An all-to-all trades token shards for head shards (all tokens, Hq/deg and Hkv/deg
        heads; the K/V buffers get the N real ones), attention runs over the full sequence, and the inverse
        all-to-all trades back."""
        a, sp = self.self_attn, self.sequence_parallel
        n = qk.shape[0]
        q = ops.apply_rope(qk[:, : a.hq], cos, sin)  # [n, Hq, D]
        k = ops.apply_rope(qk[:, a.hq :], cos, sin)  # [n, Hkv, D]
        q, k, v = sp.scatter_heads(q, k, v.view(n, a.hkv, a.hd))  # [N_pad, Hq/deg, D], [N, Hkv/deg, D] ×2
        L = k_buf.shape[1] - k.shape[0]
        k_buf[:, L:] = k.transpose(0, 1)
        v_buf[:, L:] = v.transpose(0, 1)
        out = attention(q.transpose(0, 1), k_buf, v_buf, False, self.attn_backend, self.gqa)  # [N_pad, ·]
        return sp.gather_heads(out)  # [n, Hq·D]


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(256, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t_scaled: torch.Tensor) -> torch.Tensor:
        w = self.linear_1.weight
        return self.linear_2(F.silu(self.linear_1(ops.timestep_sinusoid(t_scaled).to(w.dtype))))


class _TextWeightStreamer:
    """Brings an offloaded text tower's weights to the GPU one layer at a time for the text pass: while layer i
    computes, layer i + 1's host-to-device copies run on a side stream (pinned memory, so they overlap), and
    at most two layers' weights are resident. On a CPU-only model the copies are plain, in order."""

    def __init__(self, model: "Cosmos3Transformer", dev: torch.device):
        self.params = [model._text_params(f"layers.{i}.") for i in range(len(model.layers))]
        self.dev = dev
        self.stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        self.pending: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self.host: list[torch.Tensor] = []

    def _fetch(self, i: int) -> None:
        if i >= len(self.params) or i in self.pending:
            return
        if self.stream is None:
            self.pending[i] = ([p.data.to(self.dev) for p in self.params[i]], None)
            return
        with torch.cuda.stream(self.stream):
            data = [p.data.to(self.dev, non_blocking=True) for p in self.params[i]]
            done = torch.cuda.Event()
            done.record(self.stream)
        self.pending[i] = (data, done)

    def enter(self, i: int) -> None:
        """Layer i's weights on the device (waiting for their copies), and layer i + 1's copies started."""
        self._fetch(i)
        data, done = self.pending.pop(i)
        if done is not None:
            compute = torch.cuda.current_stream(self.dev)
            compute.wait_event(done)
            for t in data:
                t.record_stream(compute)  # allocated on the side stream, used on this one
        self.host = [p.data for p in self.params[i]]
        for p, t in zip(self.params[i], data):
            p.data = t
        self._fetch(i + 1)

    def leave(self, i: int) -> None:
        """Layer i's parameters point at host memory again (the device copies are freed once used)."""
        for p, h in zip(self.params[i], self.host):
            p.data = h
        self.host = []


class _PinnedHostBuffers:
    """Host parameters moved into one buffer per dtype, page-locked in place with `cudaHostRegister` (one call,
    no pinned-allocator rounding), and unregistered before the buffers can be freed: the owner keeps this
    object exactly as long as the parameters that view the buffers."""

    ALIGN = 256  # bytes: each parameter starts on a DMA-friendly boundary

    def __init__(self, params: list[nn.Parameter]):
        self.buffers: list[torch.Tensor] = []
        by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
        for p in params:
            by_dtype.setdefault(p.dtype, []).append(p)
        cudart = torch.cuda.cudart()
        for dtype, group in by_dtype.items():
            step = max(1, self.ALIGN // group[0].element_size())
            offsets, total = [], 0
            for p in group:
                offsets.append(total)
                total += -(-p.numel() // step) * step
            flat = torch.empty(total, dtype=dtype)
            for p, off in zip(group, offsets):
                view = flat[off : off + p.numel()].view(p.shape)
                view.copy_(p.data)
                p.data = view
            err = cudart.cudaHostRegister(flat.data_ptr(), flat.numel() * flat.element_size(), 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of {flat.numel() * flat.element_size() / 2**30:.1f} GiB "
                                   f"of text-tower weights failed ({err})")
            self.buffers.append(flat)

    def __del__(self):
        if torch.cuda.is_initialized():
            cudart = torch.cuda.cudart()
            for flat in self.buffers:
                cudart.cudaHostUnregister(flat.data_ptr())


@dataclass
class Branch:
    """Everything one CFG branch's video step reads, allocated once (`Cosmos3Transformer.setup_branch`).

    k_bufs / v_bufs: per layer `[Hkv, L + N, D]` views (head-major storage for SDPA, token-major for fa4);
    positions [:L] filled by the text pass, positions [L:] by each step.
    cos / sin: video-token RoPE tables `[N, D/2]` (they depend on L through the temporal offset).
    noisy: `[T, 1, 1]` 1.0 for frames being denoised, 0.0 for clean conditioning frames.
    """

    text_len: int
    grid: tuple[int, int, int]  # latent frames, patch rows, patch columns
    k_bufs: list[torch.Tensor]
    v_bufs: list[torch.Tensor]
    cos: torch.Tensor
    sin: torch.Tensor
    noisy: torch.Tensor


class Cosmos3Transformer(nn.Module):
    _repeated_blocks = ("Cosmos3Layer",)
    # present in official checkpoints, never used for generation
    unused_keys = frozenset({"norm.weight", "lm_head.weight"})
    unused_prefixes = ("audio_", "action_")
    keep_fp32 = ("time_embedder.",)

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Cosmos3Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_style)
        self.proj_in = nn.Linear(cfg.patch_latent_dim, cfg.hidden_size)
        self.proj_out = nn.Linear(cfg.hidden_size, cfg.patch_latent_dim)
        self.time_embedder = TimestepEmbedder(cfg.hidden_size)
        self.sequence_parallel = None  # distributed.Ulysses under sequence parallelism (apply_sequence_parallel)
        self._pinned_text: _PinnedHostBuffers | None = None  # page-locked text weights (offload_text_tower)

    @property
    def dtype(self) -> torch.dtype:
        return self.proj_in.weight.dtype

    @property
    def device(self) -> torch.device:
        """Where the video tower (and the step) runs."""
        return self.proj_in.weight.device

    # ---- set-up (outside any compiled region) -------------------------------------------------

    def apply_fusion(self) -> None:
        """Fuse the video tower's q|k|v and gate|up projections (exact: the same dot products)."""
        for layer in self.layers:
            layer.self_attn.fuse_()
            layer.mlp_moe_gen.fuse_()

    def setup_buffers(self) -> None:
        """Fuse the video-tower projections (the step requires it) and build the per-head norm weights."""
        self.apply_fusion()
        for layer in self.layers:
            layer.setup_buffers()

    def set_attention_backend(self, backend: str, gqa: str = "native") -> None:
        """Attention backend for both towers: an SDPA backend ("auto" lets PyTorch choose) or "fa4"
        (FlashAttention-4 kernels, optional package; see attention_fa4); gqa: native | expand | fold (see
        `attention`; fa4 handles grouped heads natively and ignores it)."""
        if backend not in ("auto", "fa4") and backend not in _SDPA_BACKENDS:
            raise ValueError(f"unknown attention backend {backend!r}; choose auto, fa4, {', '.join(_SDPA_BACKENDS)}")
        if backend == "fa4":
            attention_fa4.check_available()
        if gqa not in GQA_MODES:
            raise ValueError(f"unknown gqa mode {gqa!r}; choose {', '.join(GQA_MODES)}")
        for layer in self.layers:
            layer.attn_backend = backend
            layer.gqa = gqa

    def set_fused_qk_rope(self, enabled: bool) -> None:
        """Run the video step's q/k RMSNorm, RoPE and K/V buffer writes as one Triton kernel
        (`triton_kernels.qk_norm_rope_kv`; CUDA and Triton needed) instead of the composable ops."""
        if enabled:
            if not fused_qk_rope_supported(self.device):
                raise RuntimeError("model.fused_qk_rope needs the model on a CUDA device and Triton installed")
            d = self.cfg.head_dim
            if d & (d - 1):
                raise RuntimeError(f"model.fused_qk_rope needs a power-of-two head_dim, got {d}")
            from . import triton_kernels  # noqa: F401  registers torch.ops.cosmos3.qk_norm_rope_kv
        for layer in self.layers:
            layer.fused_qk_rope = enabled

    def patch_grid(self, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        t, h, w = latent_shape
        p = self.cfg.latent_patch_size
        return t, -(-h // p), -(-w // p)

    def setup_branch(
        self, text_len: int, latent_shape: tuple[int, int, int], fps: float, clean_frames: tuple[int, ...] = (),
        temporal_compression: int = 4,
    ) -> Branch:
        """Allocate one CFG branch's static buffers and RoPE tables for a text length and latent size.

        Under sequence parallelism the buffers hold this rank's kv heads and the tables its tokens."""
        cfg, dev, dt, sp = self.cfg, self.device, self.dtype, self.sequence_parallel
        grid = self.patch_grid(latent_shape)
        n = grid[0] * grid[1] * grid[2]
        heads = cfg.num_key_value_heads
        if sp is not None:
            sp.setup_tokens(n)  # ⌈N/deg⌉ tokens per rank (zero-padded when deg does not divide N)
            heads //= sp.degree
        # [Hkv, L + N, D] views; the storage is head-major for SDPA (cuDNN reads it fastest) and token-major
        # [L + N, Hkv, D] for fa4. Set the attention backend before the branches: it fixes this layout.
        token_major = self.layers[0].attn_backend == "fa4"

        def kv_buffer() -> torch.Tensor:
            if token_major:
                return torch.zeros((text_len + n, heads, cfg.head_dim), device=dev, dtype=dt).transpose(0, 1)
            return torch.zeros((heads, text_len + n, cfg.head_dim), device=dev, dtype=dt)

        k_bufs = [kv_buffer() for _ in self.layers]
        v_bufs = [kv_buffer() for _ in self.layers]
        pos = ops.video_positions(
            grid, text_len, fps, float(cfg.base_fps), cfg.unified_3d_mrope_temporal_modality_margin,
            cfg.enable_fps_modulation, temporal_compression,
        )
        if not cfg.unified_3d_mrope_reset_spatial_ids:
            pos[1:] += text_len + cfg.unified_3d_mrope_temporal_modality_margin
        cos, sin = ops.mrope_tables(pos.to(dev), cfg.head_dim, cfg.rope_theta, cfg.rope_axes_dim, dt)
        if sp is not None:
            cos, sin = sp.shard_tokens(cos).contiguous(), sp.shard_tokens(sin).contiguous()  # [⌈N/deg⌉, D/2]
        noisy = torch.ones(grid[0], 1, 1, device=dev, dtype=torch.float32)
        for f in clean_frames:
            noisy[f] = 0.0
        return Branch(text_len, grid, k_bufs, v_bufs, cos, sin, noisy)

    # ---- text tower: once per prompt and CFG branch --------------------------------------------

    @staticmethod
    def is_text_param(name: str) -> bool:
        """Parameters only the text tower reads (they may live on the CPU: see `offload_text_tower`)."""
        if name.startswith("embed_tokens."):
            return True
        parts = name.split(".")
        if parts[0] != "layers":
            return False
        if parts[2] in ("mlp", "input_layernorm", "post_attention_layernorm"):
            return True
        return parts[2] == "self_attn" and parts[3] in ("to_q", "to_k", "to_v", "to_out", "norm_q", "norm_k",
                                                        "k_norm_und_for_gen")

    def _text_params(self, prefix: str) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if n.startswith(prefix) and self.is_text_param(n)]

    @property
    def text_offloaded(self) -> bool:
        return self.embed_tokens.weight.device != self.device

    def offload_text_tower(self, pin: bool = False) -> None:
        """Keep the text tower's weights in host memory; `text_pass` streams them in one layer at a time, so the
        GPU holds the video tower, the K/V buffers and at most two text layers.

        pin: page-lock them (CUDA only), so the streamed copies run at full bus speed and overlap compute.
        They are packed into one host buffer per dtype and registered in place (`cudaHostRegister`):
        page-locking that way measured 0.6 s per 4 GiB on an H100 host, against 3.2 s through
        `Tensor.pin_memory` (docs/benchmarks/cosmos3_nano_h100_20261126.md, §4)."""
        pin = pin and self.device.type == "cuda"
        with torch.no_grad():
            for name, p in self.named_parameters():
                if self.is_text_param(name) and p.device.type != "cpu":
                    p.data = p.data.cpu()
            if pin:
                params = [p for n, p in self.named_parameters() if self.is_text_param(n) and not p.data.is_pinned()]
                if params:
                    self._pinned_text = _PinnedHostBuffers(params)

    def text_pass(self, input_ids: torch.Tensor, branch: Branch) -> None:
        """Run the text tower over `input_ids` [L] and fill rows [:L] of the branch's K/V buffers."""
        self.text_passes([(input_ids, branch)])

    @torch.no_grad()
    def text_passes(self, prompts: list[tuple[torch.Tensor, Branch]]) -> None:
        """The text pass of several (input_ids [L], branch) pairs, layer by layer: each layer runs every prompt
        before the next, so an offloaded text tower crosses to the GPU once for all of them (the CFG branches of
        a request), not once per prompt. The same ops on the same values as one prompt at a time."""
        for input_ids, branch in prompts:
            if input_ids.shape[0] != branch.text_len:
                raise ValueError(f"text pass got {input_ids.shape[0]} tokens for a branch set up for {branch.text_len}")
        cfg, dev, sp = self.cfg, self.device, self.sequence_parallel
        emb = self.embed_tokens.weight
        runs = []  # per prompt: [hidden, cos, sin, length, branch]
        for input_ids, branch in prompts:
            L = input_ids.shape[0]
            cos, sin = ops.mrope_tables(
                ops.text_positions(L).to(dev), cfg.head_dim, cfg.rope_theta, cfg.rope_axes_dim, self.dtype
            )
            runs.append([F.embedding(input_ids.to(emb.device), emb).to(dev), cos, sin, L, branch])  # [L, d]
        last = len(self.layers) - 1
        streamer = _TextWeightStreamer(self, dev) if self.text_offloaded else None
        for i, layer in enumerate(self.layers):
            if streamer is not None:
                streamer.enter(i)
            for run in runs:
                h, cos, sin, L, branch = run
                if sp is None:
                    k_out, v_out = branch.k_bufs[i][:, :L].transpose(0, 1), branch.v_bufs[i][:, :L].transpose(0, 1)
                else:  # every rank runs the whole text tower, then keeps its own kv heads
                    full = (cfg.num_key_value_heads, L, cfg.head_dim)
                    k_out = torch.empty(full, device=dev, dtype=self.dtype).transpose(0, 1)  # [L, Hkv, D]
                    v_out = torch.empty(full, device=dev, dtype=self.dtype).transpose(0, 1)
                run[0] = layer.text_forward(h, cos, sin, k_out, v_out, last=i == last)
                if sp is not None:
                    branch.k_bufs[i][:, :L] = sp.shard_heads(k_out, dim=1).transpose(0, 1)
                    branch.v_bufs[i][:, :L] = sp.shard_heads(v_out, dim=1).transpose(0, 1)
            if streamer is not None:
                streamer.leave(i)

    # ---- video tower: every denoising step -----------------------------------------------------

    def embed_video(self, latents: torch.Tensor, timestep: torch.Tensor, noisy: torch.Tensor) -> torch.Tensor:
        """Patchify latents [1, C, T, h, w] (zero-padded to even h, w), project, add the timestep embedding
        to the tokens of noisy frames. timestep: 0-dim fp32 scheduler timestep (already truncated)."""
        p = self.cfg.latent_patch_size
        x = latents[0].to(self.dtype)
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (-w) % p, 0, (-h) % p))
        t = x.shape[1]
        tokens = rearrange(x, "c t (h p) (w q) -> (t h w) (p q c)", p=p, q=p)  # [N, p·p·C]
        hid = self.proj_in(tokens)  # [N, d]
        temb = self.time_embedder((timestep.float() * self.cfg.timestep_scale).reshape(1)).to(hid.dtype)  # [1, d]
        hid = hid.view(t, -1, hid.shape[-1]) + noisy.to(hid.dtype) * temb  # [T, h·w, d]
        return hid.view(-1, hid.shape[-1])

    def unembed_video(self, hid: torch.Tensor, latent_shape: torch.Size, grid, noisy: torch.Tensor) -> torch.Tensor:
        """Final norm, proj_out, unpatchify, crop the padding, zero the clean frames; fp32 [1, C, T, h, w]."""
        return self.unpatchify(self.proj_out(self.norm_moe_gen(hid)), latent_shape, grid, noisy)

    def unpatchify(self, out: torch.Tensor, latent_shape: torch.Size, grid, noisy: torch.Tensor) -> torch.Tensor:
        """[N, p·p·C] → fp32 [1, C, T, h, w], padding cropped, clean frames zeroed."""
        p = self.cfg.latent_patch_size
        t, gh, gw = grid
        v = rearrange(out, "(t h w) (p q c) -> c t (h p) (w q)", t=t, h=gh, w=gw, p=p, q=p)
        v = v[:, :, : latent_shape[-2], : latent_shape[-1]].float() * noisy
        return v.unsqueeze(0)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, branch: Branch) -> torch.Tensor:
        """The video step: latents [1, C, T, h, w], timestep 0-dim → velocity [1, C, T, h, w] fp32."""
        sp = self.sequence_parallel
        h = self.embed_video(latents, timestep, branch.noisy)  # [N, d]
        if sp is not None:
            h = sp.shard_tokens(h)  # [⌈N/deg⌉, d]: this rank's tokens (zero-padded past N)
        for layer, k_buf, v_buf in zip(self.layers, branch.k_bufs, branch.v_bufs):
            h = layer(h, (k_buf,), (v_buf,), branch.cos, branch.sin)
        if sp is None:
            return self.unembed_video(h, latents.shape, branch.grid, branch.noisy)
        out = sp.gather_tokens(self.proj_out(self.norm_moe_gen(h)))  # [N, p·p·C] on every rank
        return self.unpatchify(out, latents.shape, branch.grid, branch.noisy)

    @staticmethod
    def setup_batched(branches: list[Branch]) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables of several branches stacked for `forward_batched` ([B·N, D/2] each), built once."""
        return torch.cat([b.cos for b in branches]), torch.cat([b.sin for b in branches])

    def forward_batched(
        self, latents: torch.Tensor, timestep: torch.Tensor, branches: list[Branch], cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> list[torch.Tensor]:
        """The video step for several CFG branches at once (same latents and timestep, different text):
        their tokens go through every linear as one batch (bigger GEMMs, fewer launches), attention stays
        per branch. cos / sin from `setup_batched`. Returns one fp32 velocity per branch."""
        if self.sequence_parallel is not None:
            raise ValueError("batched CFG branches and sequence parallelism do not combine; use one or the other")
        h = self.embed_video(latents, timestep, branches[0].noisy)  # [N, d]: identical for every branch
        n, count = h.shape[0], len(branches)
        h = h.repeat(count, 1)  # [B·N, d]
        for i, layer in enumerate(self.layers):
            h = layer(h, tuple(b.k_bufs[i] for b in branches), tuple(b.v_bufs[i] for b in branches), cos, sin)
        out = self.proj_out(self.norm_moe_gen(h))  # [B·N, p·p·C]
        return [
            self.unpatchify(out[i * n : (i + 1) * n], latents.shape, b.grid, b.noisy) for i, b in enumerate(branches)
        ]

    video_step = forward
