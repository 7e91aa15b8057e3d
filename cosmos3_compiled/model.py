"""Cosmos3 Omni transformer (video generation path), written for the compiler.

Two towers share each layer: the text tower ("und") and the video tower ("gen"). The text tower never
sees video tokens or the timestep, so its per-layer keys/values are computed once per prompt
(`text_pass`) into static buffers; the video tower runs every denoising step (`video_step`), writing
its own keys/values into the tail of the same buffers so attention reads one contiguous sequence.

Reads in paper order: embed → blocks → head. No compile calls, no distributed code, no I/O: the attention
kernel and its layouts come in as a path object (`attention.py`, `set_attention`), sequence parallelism as
that path plus a token hook (`tokens`, installed by distributed.apply_sequence_parallel), and an offloaded
text tower's weight streaming as a text-weight hook (`text_weights`, installed by offload.py).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from . import attention, fp8, ops
from .config import TransformerConfig
from .errors import RequestError


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
        quantized = fp8.fuse_fp8([self.gate_proj, self.up_proj])  # FP8 checkpoints: one scale per slice
        if quantized is not None:
            self.gate_up = quantized
        else:
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


def check_fused_qk_rope(device: torch.device, head_dim: int) -> None:
    """Raise a one-line `RequestError` when the fused q/k-norm + RoPE + K/V-write kernel (`triton_kernels`)
    cannot run on `device` for heads of `head_dim`."""
    if device.type != "cuda" or importlib.util.find_spec("triton") is None:
        raise RequestError("model.fused_qk_rope=true needs device=cuda and Triton; use null (auto) or false")
    if head_dim & (head_dim - 1):
        raise RequestError(f"model.fused_qk_rope=true needs a power-of-two head_dim, got {head_dim}; use false")


def fused_qk_rope_supported(device: torch.device, head_dim: int) -> bool:
    try:
        check_fused_qk_rope(device, head_dim)
    except RequestError:
        return False
    return True


def add_linear(h: torch.Tensor, x: torch.Tensor, linear: nn.Module) -> torch.Tensor:
    """h + linear(x); for a plain linear without a bias, accumulated into h in place (see `ops.add_linear_`).
    h is consumed."""
    if linear.bias is not None or isinstance(linear, fp8.Fp8Linear):
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
        quantized = fp8.fuse_fp8(lin)  # FP8 checkpoints: one weight and input scale per slice
        if quantized is not None:
            self.gen_qkv = quantized
        else:
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
        self.attention: attention.AttentionPath = attention.build_attention("auto")  # the model's one path
        self.fused_qk_rope = False  # video step's q/k norm + RoPE + K/V writes as one Triton kernel (CUDA)
        # The attention residual accumulates into the layer's input in place (no copy of h); compile modes whose
        # CUDA graphs (inductor's cudagraph trees) refuse graphs that mutate an input turn this off.
        self.accumulate_into_input = True

    def setup_buffers(self) -> None:
        """Static per-head q|k norm weight for the video tower (rebuilt whenever weights change)."""
        self.register_buffer("gen_qk_norm_weight", self.self_attn.gen_qk_norm_weight().detach().clone(), persistent=False)

    def text_forward(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_out: torch.Tensor, v_out: torch.Tensor,
        last: bool,
    ) -> torch.Tensor:
        """Text tower on h [L, d]; writes the keys the video tower reads (after norm and RoPE) and the values
        into k_out / v_out ([L, Hkv, D], from the path's `text_kv`). The last layer's text attention output
        and MLP are skipped: nothing downstream reads them."""
        a, cfg, path = self.self_attn, self.cfg, self.attention
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
        q = ops.apply_rope(q, cos, sin, out=path.new_queries(L, a.hq, a.hd, q))
        k = ops.apply_rope(k, cos, sin, out=path.new_queries(L, a.hkv, a.hd, k))
        h = h + a.to_out(path(q.transpose(0, 1), k.transpose(0, 1), v_out.transpose(0, 1), True))
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward(
        self, h: torch.Tensor, k_bufs: tuple[torch.Tensor, ...], v_bufs: tuple[torch.Tensor, ...], cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """Video tower on h [B·N, d]: the tokens of B CFG branches (usually B = 1) stacked, so they share
        every linear. k_bufs / v_bufs hold one [Hkv, L_b + N, D] buffer per branch with the text keys/values
        in positions [:L_b]; each branch's keys (after norm and RoPE) and values are written straight into
        [L_b:], and attention runs per branch. cos / sin: [B·N, D/2]. Under sequence parallelism N, Hkv
        and the tables are this rank's share (the attention path and the model's token hook decide)."""
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
        With `fused_qk_rope` (where the path takes it) everything before attention is one Triton kernel per
        branch, writing queries in the path's layout; otherwise the composable ops and the path's `video_step`."""
        a, cfg, path = self.self_attn, self.cfg, self.attention
        M, B = qkv.shape[0], len(k_bufs)
        N = M // B
        qk_heads = a.hq + a.hkv
        fused = self.fused_qk_rope and path.fuses_prologue
        if not fused:
            qk = qkv[:, : qk_heads * a.hd].view(M, qk_heads, a.hd)
            qk = ops.apply_qk_norm(qk, self.gen_qk_norm_weight, cfg.rms_norm_eps, cfg.norm_style)  # [M, Hq+Hkv, D]
            v = qkv[:, qk_heads * a.hd :].view(M, a.hkv, a.hd)
        outs = []
        for b, (k_buf, v_buf) in enumerate(zip(k_bufs, v_bufs)):
            rows = slice(b * N, (b + 1) * N)
            if fused:
                q = torch.ops.cosmos3.qk_norm_rope_kv(
                    qkv[rows], self.gen_qk_norm_weight, cos[rows], sin[rows], k_buf, v_buf, k_buf.shape[1] - N,
                    cfg.rms_norm_eps, cfg.norm_style == "nemotron", path.head_major_queries,
                )
                outs.append(path(q.transpose(0, 1), k_buf, v_buf, False))
            else:
                outs.append(path.video_step(qk[rows], v[rows], cos[rows], sin[rows], k_buf, v_buf))
        return outs[0] if B == 1 else torch.cat(outs)  # attention outputs (not K/V): one cat for B > 1


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(256, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t_scaled: torch.Tensor) -> torch.Tensor:
        w = self.linear_1.weight
        return self.linear_2(F.silu(self.linear_1(ops.timestep_sinusoid(t_scaled).to(w.dtype))))


class LocalTokens:
    """The token hook of a model on one device: every rank holds every video token (distributed.Ulysses is the
    sharded one)."""

    def setup_tokens(self, n: int) -> None:
        pass

    def shard_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return x


class ResidentTextWeights:
    """The text-weight hook of a model whose text tower stays on its device (offload.py streams it otherwise)."""

    def enter(self, i: int) -> None:
        pass

    def leave(self, i: int) -> None:
        pass


class DomainAwareLinear(nn.Module):
    """A linear projection with one weight and bias per embodiment domain (stored as the reference's embedding
    tables: `fc.weight` [domains, in·out] read as [in, out], `bias.weight` [domains, out]). The domain is a 0-dim
    long tensor, so a request's domain is data to the compiled step."""

    def __init__(self, in_features: int, out_features: int, domains: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.fc = nn.Embedding(domains, in_features * out_features)
        self.bias = nn.Embedding(domains, out_features)

    def forward(self, x: torch.Tensor, domain: torch.Tensor) -> torch.Tensor:
        # an embedding lookup, not `weight[domain]`: indexing with a 0-dim tensor reads its value on the host,
        # a sync that CUDA graph capture refuses
        w = self.fc(domain).view(self.in_features, self.out_features)  # [in, out]
        return x @ w + self.bias(domain)  # [A, out]


@dataclass
class Branch:
    """Everything one CFG branch's video step reads, allocated once (`Cosmos3Transformer.setup_branch`).

    k_bufs / v_bufs: per layer `[Hkv, L + N, D]` views (head-major storage for SDPA, token-major for fa4);
    positions [:L] filled by the text pass, positions [L:] by each step.
    cos / sin: video-token RoPE tables `[N + S, D/2]` (they depend on L through the temporal offset).
    noisy: `[T, 1, 1]` 1.0 for frames being denoised, 0.0 for clean conditioning frames.
    sound_len: S, the sound segment's tokens after the N vision tokens (0: no sound). The video tower's tokens are
    segments (vision, then sound); the layers see one sequence of N + S tokens and never which segment a token
    is in: only the embedding before them and the heads after them do.
    """

    text_len: int
    grid: tuple[int, int, int]  # latent frames, patch rows, patch columns
    k_bufs: list[torch.Tensor]
    v_bufs: list[torch.Tensor]
    cos: torch.Tensor
    sin: torch.Tensor
    noisy: torch.Tensor
    sound_len: int = 0
    # the action segment after vision (and sound): its tokens, `[A, 1]` noisy mask (all 1 or all 0), the domain
    # row (0-dim long) and `[1, action_dim]` 1.0 on the domain's channels, 0.0 on the padding
    action_len: int = 0
    action_noisy: torch.Tensor | None = None
    action_domain: torch.Tensor | None = None
    action_channels: torch.Tensor | None = None

    @property
    def vision_len(self) -> int:
        t, h, w = self.grid
        return t * h * w


class Cosmos3Transformer(nn.Module):
    _repeated_blocks = ("Cosmos3Layer",)
    # present in official checkpoints, never used for generation
    unused_keys = frozenset({"norm.weight", "lm_head.weight"})
    unused_prefixes = ("audio_", "action_")
    keep_fp32 = ("time_embedder.",)
    local_tokens = LocalTokens()

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Cosmos3Layer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm_moe_gen = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_style)
        self.proj_in = nn.Linear(cfg.patch_latent_dim, cfg.hidden_size)
        self.proj_out = nn.Linear(cfg.hidden_size, cfg.patch_latent_dim)
        self.time_embedder = TimestepEmbedder(cfg.hidden_size)
        if cfg.sound_gen:  # the sound segment's projections (registered last: the other weights' draws stay put)
            self.audio_proj_in = nn.Linear(cfg.sound_dim, cfg.hidden_size)
            self.audio_proj_out = nn.Linear(cfg.hidden_size, cfg.sound_dim)
            self.audio_modality_embed = nn.Parameter(torch.zeros(cfg.hidden_size))
        if cfg.action_gen:  # the action segment's domain-aware projections (registered last, as the audio head)
            d, a, m = cfg.hidden_size, cfg.action_dim, cfg.num_embodiment_domains
            self.action_proj_in = DomainAwareLinear(a, d, m)
            self.action_proj_out = DomainAwareLinear(d, a, m)
            self.action_modality_embed = nn.Parameter(torch.zeros(d))
        self.unused_prefixes = tuple(p for p, used in (("audio_", cfg.sound_gen), ("action_", cfg.action_gen))
                                     if not used)
        self.tokens = self.local_tokens  # token hook: shard before the layers, gather after
        self.text_weights = ResidentTextWeights()  # text-weight hook around each text layer (offload.py)

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

    @property
    def attention(self) -> attention.AttentionPath:
        return self.layers[0].attention

    def set_attention(self, path: attention.AttentionPath) -> None:
        """The attention path of both towers. Set it before the branches: it fixes their K/V buffer layout."""
        for layer in self.layers:
            layer.attention = path

    def set_attention_backend(self, backend: str) -> None:
        """`set_attention(build_attention(backend))`, checked first (attention.check_backend): an SDPA backend
        (auto | cudnn | flash | efficient | math) or fa4 (FlashAttention-4, optional package)."""
        attention.check_backend(backend, self.device, self.dtype)
        self.set_attention(attention.build_attention(backend))

    def set_fused_qk_rope(self, enabled: bool) -> None:
        """Run the video step's q/k RMSNorm, RoPE and K/V buffer writes as one Triton kernel
        (`triton_kernels.qk_norm_rope_kv`; CUDA and Triton needed) instead of the composable ops."""
        if enabled:
            check_fused_qk_rope(self.device, self.cfg.head_dim)
            from . import triton_kernels  # noqa: F401  optional Triton: registers torch.ops.cosmos3.qk_norm_rope_kv
        for layer in self.layers:
            layer.fused_qk_rope = enabled

    def patch_grid(self, latent_shape: tuple[int, int, int]) -> tuple[int, int, int]:
        t, h, w = latent_shape
        p = self.cfg.latent_patch_size
        return t, -(-h // p), -(-w // p)

    def setup_branch(
        self, text_len: int, latent_shape: tuple[int, int, int], fps: float, clean_frames: tuple[int, ...] = (),
        temporal_compression: int = 4, sound_len: int = 0, action_len: int = 0, action_clean: bool = False,
        action_domain: int = 0, action_width: int = 0,
    ) -> Branch:
        """Allocate one CFG branch's static buffers and RoPE tables for a text length and latent size, and
        `sound_len` sound latent frames (a sound segment after the vision tokens; 0: none).

        The attention path sets the buffers' layout and heads, the token hook the tables' tokens."""
        cfg, dev, dt = self.cfg, self.device, self.dtype
        if sound_len and not cfg.sound_gen:
            raise ValueError("a sound segment needs a transformer with sound_gen (its audio head)")
        if action_len and not cfg.action_gen:
            raise ValueError("an action segment needs a transformer with action_gen (its action head)")
        grid = self.patch_grid(latent_shape)
        n = grid[0] * grid[1] * grid[2] + sound_len + action_len
        self.tokens.setup_tokens(n)

        def kv_buffer() -> torch.Tensor:
            return self.attention.new_kv_buffer(text_len + n, cfg.num_key_value_heads, cfg.head_dim, dev, dt)

        k_bufs = [kv_buffer() for _ in self.layers]
        v_bufs = [kv_buffer() for _ in self.layers]
        pos = ops.video_positions(
            grid, text_len, fps, float(cfg.base_fps), cfg.unified_3d_mrope_temporal_modality_margin,
            cfg.enable_fps_modulation, temporal_compression,
        )
        if sound_len:
            # sound starts at the vision's temporal offset (the two are temporal siblings) and advances by
            # base_fps / sound_latent_fps per latent frame (no temporal compression); rows = columns = 0
            sound = ops.video_positions(
                (sound_len, 1, 1), text_len, float(cfg.sound_latent_fps), float(cfg.base_fps),
                cfg.unified_3d_mrope_temporal_modality_margin, cfg.enable_fps_modulation, 1,
            )
            pos = torch.cat([pos, sound], dim=1)  # [3, N + S]
        if action_len:
            # actions are transitions: token i sits at frame i + 1 of the clip, at the vision's offset, one pixel
            # frame (base_fps / temporal_compression latent steps per fps) apart; rows = columns = 0
            acts = ops.video_positions(
                (action_len, 1, 1), text_len, fps, float(cfg.base_fps), cfg.unified_3d_mrope_temporal_modality_margin,
                cfg.enable_fps_modulation, 1, base_temporal_compression=temporal_compression, start=1,
            )
            pos = torch.cat([pos, acts], dim=1)  # [3, N + S + A]
        if not cfg.unified_3d_mrope_reset_spatial_ids:
            pos[1:] += text_len + cfg.unified_3d_mrope_temporal_modality_margin
        cos, sin = ops.mrope_tables(pos.to(dev), cfg.head_dim, cfg.rope_theta, cfg.rope_axes_dim, dt)
        cos, sin = self.tokens.shard_tokens(cos), self.tokens.shard_tokens(sin)
        noisy = torch.ones(grid[0], 1, 1, device=dev, dtype=torch.float32)
        for f in clean_frames:
            noisy[f] = 0.0
        branch = Branch(text_len, grid, k_bufs, v_bufs, cos, sin, noisy, sound_len)
        if action_len:
            branch.action_len = action_len
            branch.action_noisy = torch.full((action_len, 1), 0.0 if action_clean else 1.0, device=dev)
            branch.action_domain = torch.tensor(action_domain, device=dev, dtype=torch.long)
            channels = torch.zeros(1, cfg.action_dim, device=dev)
            channels[:, :action_width] = 1.0
            branch.action_channels = channels
        return branch

    # ---- text tower: once per prompt and CFG branch --------------------------------------------

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
        cfg, dev, path, weights = self.cfg, self.device, self.attention, self.text_weights
        emb = self.embed_tokens.weight
        runs = []  # per prompt: [hidden, cos, sin, length, branch]
        for input_ids, branch in prompts:
            L = input_ids.shape[0]
            cos, sin = ops.mrope_tables(
                ops.text_positions(L).to(dev), cfg.head_dim, cfg.rope_theta, cfg.rope_axes_dim, self.dtype
            )
            runs.append([F.embedding(input_ids.to(emb.device), emb).to(dev), cos, sin, L, branch])  # [L, d]
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            weights.enter(i)
            for run in runs:
                h, cos, sin, L, branch = run
                k_out, v_out = path.text_kv(branch.k_bufs[i], branch.v_bufs[i], L)
                run[0] = layer.text_forward(h, cos, sin, k_out, v_out, last=i == last)
                path.keep_text_kv(branch.k_bufs[i], branch.v_bufs[i], k_out, v_out)
            weights.leave(i)

    # ---- video tower: every denoising step -----------------------------------------------------

    def embed_time(self, timestep: torch.Tensor) -> torch.Tensor:
        """timestep: 0-dim fp32 scheduler timestep (already truncated) → its embedding [1, d] (model dtype)."""
        return self.time_embedder((timestep.float() * self.cfg.timestep_scale).reshape(1)).to(self.dtype)

    def embed_sound(self, sound: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """The sound segment's tokens: latents [C_s, S] → `audio_proj_in` + the modality embedding + the timestep
        embedding `temb` [1, d] (every sound frame is noisy) → [S, d]."""
        x = self.audio_proj_in(sound.t().to(self.dtype)) + self.audio_modality_embed  # [S, d]
        return x + temb

    def sound_velocity(self, h: torch.Tensor) -> torch.Tensor:
        """The sound segment's head on its final-normed hidden states [S, d] → velocity [C_s, S] fp32."""
        return self.audio_proj_out(h).t().float()

    def embed_action(self, action: torch.Tensor, temb: torch.Tensor, branch: Branch) -> torch.Tensor:
        """The action segment's tokens: latents [A, action_dim] → the domain's `action_proj_in` + the modality
        embedding + the timestep embedding on noisy tokens → [A, d]."""
        x = self.action_proj_in(action.to(self.dtype), branch.action_domain) + self.action_modality_embed  # [A, d]
        return x + branch.action_noisy.to(x.dtype) * temb

    def action_velocity(self, h: torch.Tensor, branch: Branch) -> torch.Tensor:
        """The action segment's head on its final-normed hidden states [A, d] → velocity [A, action_dim] fp32, zero
        on clean tokens and on the domain's padding channels."""
        v = self.action_proj_out(h, branch.action_domain).float()
        return v * branch.action_noisy * branch.action_channels

    def embed_video(self, latents: torch.Tensor, timestep: torch.Tensor, noisy: torch.Tensor,
                    temb: torch.Tensor | None = None) -> torch.Tensor:
        """Patchify latents [1, C, T, h, w] (zero-padded to even h, w), project, add the timestep embedding
        to the tokens of noisy frames. timestep: 0-dim fp32 scheduler timestep (already truncated); `temb`: its
        embedding when the caller already has it (`embed_time`)."""
        p = self.cfg.latent_patch_size
        x = latents[0].to(self.dtype)
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (-w) % p, 0, (-h) % p))
        t = x.shape[1]
        tokens = rearrange(x, "c t (h p) (w q) -> (t h w) (p q c)", p=p, q=p)  # [N, p·p·C]
        hid = self.proj_in(tokens)  # [N, d]
        temb = self.embed_time(timestep) if temb is None else temb  # [1, d]
        hid = hid.view(t, -1, hid.shape[-1]) + noisy.to(hid.dtype) * temb  # [T, h·w, d]
        return hid.view(-1, hid.shape[-1])

    def unpatchify(self, out: torch.Tensor, latent_shape: torch.Size, grid, noisy: torch.Tensor) -> torch.Tensor:
        """[N, p·p·C] → fp32 [1, C, T, h, w], padding cropped, clean frames zeroed."""
        p = self.cfg.latent_patch_size
        t, gh, gw = grid
        v = rearrange(out, "(t h w) (p q c) -> c t (h p) (w q)", t=t, h=gh, w=gw, p=p, q=p)
        v = v[:, :, : latent_shape[-2], : latent_shape[-1]].float() * noisy
        return v.unsqueeze(0)

    def embed_step(self, latents: torch.Tensor, timestep: torch.Tensor, noisy: torch.Tensor,
                   sound: torch.Tensor | None = None, action: torch.Tensor | None = None,
                   branch: Branch | None = None) -> torch.Tensor:
        """The video tower's input tokens: the vision segment [N, d], then the sound segment's [S, d] and the action
        segment's [A, d] when there are (→ [N + S + A, d]). `branch` holds the action segment's domain and mask."""
        if sound is None and action is None:
            return self.embed_video(latents, timestep, noisy)
        temb = self.embed_time(timestep)
        parts = [self.embed_video(latents, timestep, noisy, temb)]
        if sound is not None:
            parts.append(self.embed_sound(sound, temb))
        if action is not None:
            parts.append(self.embed_action(action, temb, branch))
        return torch.cat(parts)

    def segment_heads(self, h: torch.Tensor, latents: torch.Tensor, branch: Branch, sound: bool, action: bool):
        """Each segment of the final-normed hidden states [N + S + A, d] through its own head: (velocity, sound
        velocity?, action velocity?)."""
        n = branch.vision_len
        outs = [self.unpatchify(self.proj_out(h[:n]), latents.shape, branch.grid, branch.noisy)]
        if sound:
            outs.append(self.sound_velocity(h[n : n + branch.sound_len]))
        if action:
            outs.append(self.action_velocity(h[n + branch.sound_len :], branch))
        return tuple(outs)

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, branch: Branch,
                sound: torch.Tensor | None = None, action: torch.Tensor | None = None):
        """The video step: latents [1, C, T, h, w], timestep 0-dim → velocity [1, C, T, h, w] fp32; with the
        sound segment's latents `sound` [C_s, S] (a branch set up with `sound_len` S) → (velocity, sound
        velocity [C_s, S] fp32); with the action segment's latents `action` [A, action_dim] also its velocity
        (velocity, sound velocity?, action velocity [A, action_dim] fp32)."""
        h = self.embed_step(latents, timestep, branch.noisy, sound, action, branch)
        h = self.tokens.shard_tokens(h)  # [N (+S +A), d] or this rank's
        for layer, k_buf, v_buf in zip(self.layers, branch.k_bufs, branch.v_bufs):
            h = layer(h, (k_buf,), (v_buf,), branch.cos, branch.sin)
        if sound is None and action is None:
            out = self.tokens.gather_tokens(self.proj_out(self.norm_moe_gen(h)))  # [N, p·p·C]
            return self.unpatchify(out, latents.shape, branch.grid, branch.noisy)
        h = self.tokens.gather_tokens(self.norm_moe_gen(h))  # [N + S + A, d]: each segment to its own head
        return self.segment_heads(h, latents, branch, sound is not None, action is not None)

    @staticmethod
    def setup_batched(branches: list[Branch]) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables of several branches stacked for `forward_batched` ([B·N, D/2] each), built once."""
        return torch.cat([b.cos for b in branches]), torch.cat([b.sin for b in branches])

    def forward_batched(
        self, latents: torch.Tensor, timestep: torch.Tensor, branches: list[Branch], cos: torch.Tensor,
        sin: torch.Tensor, sound: torch.Tensor | None = None, action: torch.Tensor | None = None,
    ) -> list:
        """The video step for several CFG branches at once (same latents and timestep, different text):
        their tokens go through every linear as one batch (bigger GEMMs, fewer launches), attention stays
        per branch. cos / sin from `setup_batched`. Returns one fp32 velocity per branch (with `sound`: one
        (velocity, sound velocity) pair per branch, as `forward`)."""
        h = self.embed_step(latents, timestep, branches[0].noisy, sound, action, branches[0])  # the same for all
        h = self.tokens.shard_tokens(h)
        n, count = h.shape[0], len(branches)
        h = h.repeat(count, 1)  # [B·N, d]
        for i, layer in enumerate(self.layers):
            h = layer(h, tuple(b.k_bufs[i] for b in branches), tuple(b.v_bufs[i] for b in branches), cos, sin)
        if sound is None and action is None:
            out = self.proj_out(self.norm_moe_gen(h))  # [B·N, p·p·C]
            return [
                self.unpatchify(self.tokens.gather_tokens(out[i * n : (i + 1) * n]), latents.shape, b.grid, b.noisy)
                for i, b in enumerate(branches)
            ]
        h = self.norm_moe_gen(h)
        outs = []
        for i, b in enumerate(branches):
            hb = self.tokens.gather_tokens(h[i * n : (i + 1) * n])  # [N + S + A, d]
            outs.append(self.segment_heads(hb, latents, b, sound is not None, action is not None))
        return outs

    video_step = forward
