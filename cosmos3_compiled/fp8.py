"""ModelOpt FP8 checkpoints (static per-tensor scales): the FP8 linear, the per-step precision policy, the format.

Format (HF export of ModelOpt FP8): every quantized linear has `weight` in float8_e4m3fn, a float32 scalar
`weight_scale` (amax|W| / 448) and a float32 scalar `input_scale` (calibrated amax|x| / 448);
`transformer/config.json` carries `quantization_config` (`quant_method: modelopt`, `quant_algo: FP8`, and for
the video checkpoints `runtime.diffusion_step_policy`). Excluded modules (proj_in, proj_out, time embedder,
embeddings, norms) keep their ordinary dtype and load as before.

Two regimes of one linear (`Fp8Linear.mode`):
  "a16"  W8A16: the weight dequantised to the activation dtype (fp8 → dtype, times weight_scale in that dtype),
         then an ordinary GEMM: diffusers 0.42.1 `_w8a16_linear`, term for term.
  "a8"   W8A8: the input quantised with its static scale (x / input_scale in fp32, clamped to ±448, cast to
         e4m3 with round-to-nearest-even), then `torch._scaled_mm(x8, w8.t(), input_scale, weight_scale)` on
         CUDA; elsewhere an exact emulation (both operands dequantised, fp32 matmul, scaled, cast).

Which regime each linear runs at a denoising step is the policy (`Fp8Policy`, diffusers' `mixed_precision.py`),
applied to the reference's path classification (`linear_group`), which is NOT the tower split: the reference
matches the text tower's attention projections (`to_q`, `to_k`, `to_v`, `to_out`) as "generation" and the video
tower's (`add_q_proj`, `add_k_proj`, `add_v_proj`, `to_add_out`) as "reasoner"; only the MLPs follow the towers
(`mlp_moe_gen` generation, `mlp` reasoner). So with the shipped policy the video tower's attention projections
run W8A16 at every step, its MLP switches with the step, and the text tower's K/V change with the step (its
q/k/v/out projections switch), so the text pass is recomputed whenever the regime changes (`regime_changes`).

How the regime reaches the compiled step: `set_step_regime` sets `mode` on every FP8 linear from the host,
outside any compiled region. `mode` is a Python constant to the compiler, so each compiled region holds exactly
two graphs (one per regime, each guarded on the modes) and switching between them is a guard hit, never a
recompile once both were warmed up; a CUDA-graph step runner keeps one captured graph per regime likewise.

Fusion (`fuse_fp8`): q|k|v and gate|up with different weight scales are fused with one scale per output slice.
W8A16 dequantises with a per-row scale (elementwise the same products as the separate linears, one GEMM); W8A8
runs one `_scaled_mm` when the slices share their scales; when they share only the input scale (the usual case:
q|k|v and gate|up read the same input, so calibration gives them the same one) one quantisation of the input and
one `_scaled_mm` with row-wise scales (the input scale for every token, each output row its slice's weight scale);
else one per slice (the outputs concatenated).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .errors import RequestError

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
SCALE_KEYS = ("weight_scale", "input_scale")
REGIMES = ("a16", "a8")
POLICIES = ("checkpoint", "a16", "a8")
GROUPS = ("generation", "reasoner", None)  # the reference's policy groups (`linear_group`); None: left on W8A8
# `_scaled_mm(use_fast_accum=...)`: Hopper's fast FP8 accumulation (fewer fp32 promotions of the partial sums)
FAST_ACCUM = True

_REQUIRED_POLICY_FIELDS = ("schema_version", "type", "index_space", "scope", "default_mode", "first_steps",
                           "last_steps", "overlap", "reasoner")


# ---------------------------------------------------------------------------------------------------- arithmetic


def quantize_input(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Static per-tensor FP8 quantisation: x / scale in fp32, clamped to ±448, cast to e4m3 (nearest even)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)


def dequantize_weight(weight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The W8A16 weight: fp8 → `dtype`, times the scale in `dtype` (a 0-dim scale or one per output row)."""
    s = scale.to(dtype)
    return weight.to(dtype) * (s if s.dim() == 0 else s.view(-1, 1))


def scaled_mm(x8: torch.Tensor, w8: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """x8 [M, K] @ w8 [N, K]ᵀ · scale_a · scale_b (+ bias); scale_a 0-dim fp32, scale_b 0-dim or one per output
    row [N] (row-wise scaling, without bias). `torch._scaled_mm` on CUDA; elsewhere its exact emulation: fp8
    products are exact in fp32, accumulated in fp32, scaled, bias added in fp32, one rounding to `out_dtype`."""
    if x8.is_cuda:
        dev = x8.device  # an offloaded text tower's scales stay in host memory
        if scale_b.dim() == 1:  # row-wise: _scaled_mm takes [M, 1] and [1, N] scales
            rows = scale_a.to(dev).reshape(1, 1).expand(x8.shape[0], 1).contiguous()
            return torch._scaled_mm(x8, w8.t(), scale_a=rows, scale_b=scale_b.to(dev).reshape(1, -1),
                                    out_dtype=out_dtype, use_fast_accum=FAST_ACCUM)
        return tensorwise_scaled_mm(x8, w8, scale_a.to(dev), scale_b.to(dev), bias, out_dtype)
    acc = (x8.float() @ w8.float().t()) * (scale_a.float() * scale_b.float())
    if bias is not None:
        acc = acc + bias.float()
    return acc.to(out_dtype)


@torch.library.custom_op("cosmos3::tensorwise_scaled_mm", mutates_args=())
def tensorwise_scaled_mm(x8: torch.Tensor, w8: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor,
                         bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """`torch._scaled_mm` with one scale per operand, opaque to inductor. Its own lowering of `_scaled_mm` (torch
    2.11) breaks on a per-tensor scale that is a 0-dim view into a fused linear's per-slice scale vector; the GEMM
    is cuBLAS either way, and the input quantisation before it still fuses into the previous kernel.
    cuBLASLt refuses a scale pointer off 16-byte alignment (a later slice's scale inside that vector): such a
    scale is copied first."""
    scale_a, scale_b = (t.clone() if t.data_ptr() % 16 else t for t in (scale_a, scale_b))
    return torch._scaled_mm(x8, w8.t(), scale_a=scale_a, scale_b=scale_b, bias=bias, out_dtype=out_dtype,
                            use_fast_accum=FAST_ACCUM)


@tensorwise_scaled_mm.register_fake
def _(x8, w8, scale_a, scale_b, bias, out_dtype):
    return x8.new_empty((x8.shape[0], w8.shape[0]), dtype=out_dtype)


class Fp8Linear(nn.Module):
    """A linear holding its FP8 weight and scales under the official key names (`weight`, `weight_scale`,
    `input_scale`, optional `bias`). `mode` picks W8A16 ("a16") or W8A8 ("a8"); `group` is the reference's
    policy group ("generation", "reasoner" or None: a linear the reference leaves on its native W8A8).

    A fused linear (`concat`) keeps one weight and input scale per output slice (`slices`, their sizes)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scale_shape: tuple[int, ...] = (),
                 device=None, bias_dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8, device=device),
                                   requires_grad=False)
        self.weight_scale = nn.Parameter(torch.ones(scale_shape, dtype=torch.float32, device=device),
                                         requires_grad=False)
        self.input_scale = nn.Parameter(torch.ones(scale_shape, dtype=torch.float32, device=device),
                                        requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, dtype=bias_dtype, device=device), requires_grad=False)
                     if bias else None)
        self.slices: tuple[int, ...] = (out_features,)
        self.mode = "a8"
        self.group: str | None = None

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, slices={self.slices}, mode={self.mode}, group={self.group}"

    @classmethod
    def concat(cls, parts: list[Fp8Linear]) -> Fp8Linear:
        """One linear for several of the same input (their outputs stacked), exact in both regimes."""
        w = torch.cat([p.weight.data for p in parts])
        bias = torch.cat([p.bias.data for p in parts]) if parts[0].bias is not None else None
        out = cls(w.shape[1], w.shape[0], bias is not None, (len(parts),), device=w.device,
                  bias_dtype=None if bias is None else bias.dtype)
        out.weight = nn.Parameter(w, requires_grad=False)
        out.weight_scale = nn.Parameter(torch.stack([p.weight_scale.data.reshape(()) for p in parts]),
                                        requires_grad=False)
        if any(p.input_scale is None for p in parts):
            out.input_scale = None
        else:
            out.input_scale = nn.Parameter(torch.stack([p.input_scale.data.reshape(()) for p in parts]),
                                           requires_grad=False)
        if bias is not None:
            out.bias = nn.Parameter(bias, requires_grad=False)
        out.slices = tuple(p.out_features for p in parts)
        groups = {p.group for p in parts}
        if len(groups) != 1:
            raise ValueError(f"cannot fuse FP8 linears of different policy groups {sorted(map(str, groups))}")
        out.group, out.mode = groups.pop(), parts[0].mode
        out.setup_buffers()
        return out

    def setup_buffers(self) -> None:
        """The per-row weight scale of a fused linear with different slice scales (W8A16's dequantisation) and
        whether W8A8 can run as one scaled GEMM (every slice with the same weight and input scale)."""
        ws = self.weight_scale.detach().reshape(-1)
        xs = ws if self.input_scale is None else self.input_scale.detach().reshape(-1)
        self.shared_input = bool((xs == xs[0]).all())
        self.uniform = bool((ws == ws[0]).all()) and self.shared_input
        rows = ws[:1].reshape(()) if self.uniform else torch.repeat_interleave(
            ws, torch.tensor(self.slices, device=ws.device))
        self.register_buffer("row_scale", rows.clone(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "a16":
            return F.linear(x, dequantize_weight(self.weight, self.row_scale, x.dtype), self.bias)
        return self.forward_a8(x)

    def forward_a8(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is None:  # request.prepare refuses such a job before any weights are read
            raise RuntimeError("W8A8 needs an input_scale; this FP8 linear was exported without one")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        ws, xs = self.weight_scale.reshape(-1), self.input_scale.reshape(-1)
        if self.uniform:
            out = scaled_mm(quantize_input(x2, xs[0]), self.weight, xs[0], ws[0], self.bias, x.dtype)
        elif self.shared_input and self.bias is None:  # one quantised input, row-wise weight scales
            out = scaled_mm(quantize_input(x2, xs[0]), self.weight, xs[0], self.row_scale, None, x.dtype)
        else:
            outs, start = [], 0
            for i, n in enumerate(self.slices):
                b = None if self.bias is None else self.bias[start : start + n]
                outs.append(scaled_mm(quantize_input(x2, xs[i]), self.weight[start : start + n], xs[i], ws[i], b,
                                      x.dtype))
                start += n
            out = torch.cat(outs, dim=-1)
        return out.view(*lead, self.out_features)


def fp8_linears(model: nn.Module) -> list[Fp8Linear]:
    return [m for m in model.modules() if isinstance(m, Fp8Linear)]


def is_fp8_model(model: nn.Module) -> bool:
    return any(isinstance(m, Fp8Linear) for m in model.modules())


# ---------------------------------------------------------------------------------------------------- loading


def linear_group(name: str) -> str | None:
    """The reference's policy group of a linear by its official module name (diffusers 0.42.1
    `_classify_cosmos3_linear`): text-tower attention projections and the video MLP are "generation", video-tower
    attention projections and the text MLP "reasoner", anything else None."""
    generation_attn = (".self_attn.to_q", ".self_attn.to_k", ".self_attn.to_v", ".self_attn.to_out")
    reasoner_attn = (".self_attn.add_q_proj", ".self_attn.add_k_proj", ".self_attn.add_v_proj",
                     ".self_attn.to_add_out")
    if ".mlp_moe_gen." in name or name.endswith(generation_attn):
        return "generation"
    if ".mlp." in name or name.endswith(reasoner_attn):
        return "reasoner"
    return None


def quantized_modules(keys) -> list[str]:
    """The module names of a checkpoint's keys that carry a `weight_scale` (the quantized linears)."""
    return [k[: -len(".weight_scale")] for k in keys if k.endswith(".weight_scale")]


def swap_in_fp8_(model: nn.Module, header: dict) -> int:
    """Replace (on the meta device) every nn.Linear the checkpoint quantized by an `Fp8Linear` of the same
    shape, with the file's scale shapes, so the strict loader checks and assigns the FP8 keys like any other.
    Returns how many linears were replaced."""
    names = quantized_modules(header)
    count = 0
    for name in names:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, leaf, None)
        if not isinstance(old, nn.Linear):
            continue  # not a module of ours: the strict check reports its keys
        new = Fp8Linear(old.in_features, old.out_features, old.bias is not None,
                        tuple(header[f"{name}.weight_scale"].shape), device="meta")
        if f"{name}.input_scale" in header:
            shape = tuple(header[f"{name}.input_scale"].shape)
            new.input_scale = nn.Parameter(torch.ones(shape, device="meta"), requires_grad=False)
        else:  # a weight-only export: W8A16 only (request.prepare refuses a policy with W8A8 steps for it)
            new.input_scale = None
        new.group = linear_group(name)
        setattr(parent, leaf, new)
        count += 1
    return count


def finish_load_(model: nn.Module) -> None:
    """After the weights are assigned: check every FP8 linear is what the arithmetic expects (fp8 weight,
    positive scalar scales) and build its buffers."""
    for name, m in model.named_modules():
        if not isinstance(m, Fp8Linear):
            continue
        if m.weight.dtype != FP8:
            raise RequestError(f"{name}.weight is {m.weight.dtype}; an FP8 linear needs float8_e4m3fn")
        for key in SCALE_KEYS:
            s = getattr(m, key)
            if s is None:
                continue
            if s.numel() != len(m.slices) or not bool((s > 0).all()):
                raise RequestError(f"{name}.{key} must be one positive per-tensor scale, got shape {tuple(s.shape)}")
        m.setup_buffers()


def fuse_fp8(parts: list[nn.Module]) -> Fp8Linear | None:
    """The fused linear of `parts` when they are FP8 linears (None when they are ordinary ones)."""
    kinds = {isinstance(p, Fp8Linear) for p in parts}
    if kinds == {False}:
        return None
    if kinds != {True}:
        raise RequestError("cannot fuse an FP8 linear with an unquantized one (checkpoint quantized only part of "
                           "a q|k|v or gate|up group)")
    return Fp8Linear.concat(parts)


def read_quantization_config(folder: str | Path) -> dict | None:
    """`quantization_config` of `transformer/config.json` (folder: the transformer folder), checked: None for an
    unquantized checkpoint; a one-line error for a quantization this package does not run."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    qc = json.loads(path.read_text()).get("quantization_config")
    if qc is None:
        return None
    method = str(qc.get("quant_method", "")).lower()
    algo = str(qc.get("quant_algo") or qc.get("quant_type") or "").upper()
    if method != "modelopt" or algo != "FP8":
        raise RequestError(f"{path}: quantization_config quant_method={method!r} quant_algo={algo!r}; only ModelOpt "
                           "FP8 (static per-tensor) checkpoints are supported")
    return qc


# ---------------------------------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class Fp8Policy:
    """Which regime each policy group runs at each denoising step (diffusers' `Cosmos3MixedPrecisionConfig`).

    mixed: the first/last-N schedule is on (False: every FP8 linear stays on the native W8A8, as distilled
    checkpoints without a policy do, and as `policy=a8` asks); first_steps / last_steps: W8A16 windows of the
    generation group; overlap: regime where the windows overlap; reasoner_a16: the reasoner group always W8A16
    (False: always W8A8); all_a16: `policy=a16`, every FP8 linear W8A16 at every step (our override).
    """

    mixed: bool = False
    first_steps: int = 3
    last_steps: int = 3
    overlap: str = "a16"
    reasoner_a16: bool = True
    all_a16: bool = False
    fp8_attention: bool = False  # `precision.fp8_attention`: the video tower's attention in FP8 at the W8A8 steps

    @classmethod
    def resolve(cls, quantization_config: dict | None, policy: str = "checkpoint", first_steps: int | None = None,
                last_steps: int | None = None) -> Fp8Policy:
        """The checkpoint's policy (`runtime.diffusion_step_policy`), with the overrides `policy`
        (checkpoint | a16 | a8), `first_steps`, `last_steps`. As the reference: a checkpoint without a policy
        runs W8A8 unless first/last counts are given, which turn the default schedule on."""
        if policy not in POLICIES:
            raise RequestError(f"precision.policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        for label, n in (("first_steps", first_steps), ("last_steps", last_steps)):
            if n is not None and (not isinstance(n, int) or isinstance(n, bool) or n < 0):
                raise RequestError(f"precision.{label} must be a non-negative integer, got {n!r}")
        if policy == "a16":
            return cls(all_a16=True)
        if policy == "a8" or quantization_config is None:
            return cls()
        runtime = quantization_config.get("runtime") or {}
        spec = runtime.get("diffusion_step_policy")
        if spec is None:
            if first_steps is None and last_steps is None:
                return cls()  # distilled checkpoints: native W8A8
            parsed = cls(mixed=True)
        else:
            parsed = parse_step_policy(spec)
        return cls(mixed=True, first_steps=parsed.first_steps if first_steps is None else first_steps,
                   last_steps=parsed.last_steps if last_steps is None else last_steps, overlap=parsed.overlap,
                   reasoner_a16=parsed.reasoner_a16)

    def generation_a16(self, step: int, num_steps: int) -> bool:
        """Whether the generation group runs W8A16 at step `step` of `num_steps`."""
        if not 0 <= step < num_steps:
            raise IndexError(f"step {step} outside [0, {num_steps})")
        if self.all_a16:
            return True
        if not self.mixed or num_steps == 1:  # a one-step request keeps the base W8A8 (as the reference)
            return False
        first, last = step < self.first_steps, step >= num_steps - self.last_steps
        if first and last:
            return self.overlap == "a16"
        return first or last

    def group_regime(self, group: str | None, step: int, num_steps: int) -> str:
        if self.all_a16:
            return "a16"
        if group == "generation":
            return "a16" if self.generation_a16(step, num_steps) else "a8"
        if group == "reasoner" and self.mixed:
            return "a16" if self.reasoner_a16 else "a8"
        return "a8"

    def step_modes(self, step: int, num_steps: int) -> tuple[str, ...]:
        """The modes of the generation group, the reasoner group and the unclassified linears at `step`, and the
        video attention's precision ("fp8" / "bf16"): what a compiled graph of the step depends on (two steps
        with the same modes run the same graphs)."""
        modes = tuple(self.group_regime(g, step, num_steps) for g in GROUPS)
        return (*modes, "fp8" if self.attention_fp8(step, num_steps) else "bf16")

    def attention_fp8(self, step: int, num_steps: int) -> bool:
        """Whether the video tower's attention runs in FP8 at `step`: with the option on, at the W8A8 steps."""
        return self.fp8_attention and not self.generation_a16(step, num_steps)

    def uses_a8(self, num_steps: int, groups=GROUPS) -> bool:
        """Whether any linear of `groups` runs W8A8 at any of `num_steps` steps (it then needs its input_scale)."""
        return any(self.group_regime(g, i, num_steps) == "a8" for g in groups for i in range(num_steps))

    def describe(self) -> dict:
        """metrics.json `precision`: what the policy resolved to (the overrides asked for are in `config`)."""
        attn = {"fp8_attention": "at the W8A8 steps"} if self.fp8_attention else {}
        if self.all_a16 or not self.mixed:
            return {"every_step": "a16" if self.all_a16 else "a8", **attn}
        return {"first_steps": self.first_steps, "last_steps": self.last_steps, "overlap": self.overlap,
                "reasoner": "a16" if self.reasoner_a16 else "a8", **attn}

    def schedule(self, num_steps: int) -> list[str]:
        """Per step: "W8A16" or "W8A8" (the generation group), as diffusers' `precision_name` names them."""
        return ["W8A16" if self.generation_a16(i, num_steps) else "W8A8" for i in range(num_steps)]

    def regime_changes(self, num_steps: int) -> list[int]:
        """The steps whose generation-group regime differs from the step before (step 0 included): where the
        text K/V must be recomputed (the text tower's attention projections are in the generation group)."""
        s = self.schedule(num_steps)
        return [i for i in range(num_steps) if i == 0 or s[i] != s[i - 1]]


def parse_step_policy(spec: dict) -> Fp8Policy:
    """`runtime.diffusion_step_policy` checked as the reference checks it (schema 1, first_last_n)."""
    if not isinstance(spec, dict):
        raise RequestError("quantization_config.runtime.diffusion_step_policy must be a mapping")
    missing = [k for k in _REQUIRED_POLICY_FIELDS if k not in spec]
    if missing:
        raise RequestError(f"diffusion_step_policy is missing {missing}")
    expected = {"schema_version": 1, "type": "first_last_n", "index_space": "denoising_loop_iteration",
                "default_mode": "native"}
    for key, value in expected.items():
        if spec[key] != value:
            raise RequestError(f"unsupported diffusion_step_policy.{key}={spec[key]!r} (expected {value!r})")
    if list(spec["scope"]) != ["transformer"]:
        raise RequestError(f"unsupported diffusion_step_policy.scope={spec['scope']!r} (expected ['transformer'])")

    def window(key: str) -> int:
        w = spec[key]
        if not isinstance(w, dict) or w.get("mode") not in ("a16", "native"):
            raise RequestError(f"diffusion_step_policy.{key} must be {{count, mode: a16|native}}, got {w!r}")
        n = w.get("count")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise RequestError(f"diffusion_step_policy.{key}.count must be a non-negative integer, got {n!r}")
        return n if w["mode"] == "a16" else 0

    if spec["overlap"] not in ("a16", "native"):
        raise RequestError(f"diffusion_step_policy.overlap must be a16 or native, got {spec['overlap']!r}")
    if spec["reasoner"] not in ("a16", "native"):
        raise RequestError(f"diffusion_step_policy.reasoner must be a16 or native, got {spec['reasoner']!r}")
    return Fp8Policy(mixed=True, first_steps=window("first_steps"), last_steps=window("last_steps"),
                     overlap=spec["overlap"], reasoner_a16=spec["reasoner"] == "a16")


def set_step_regime(model: nn.Module, policy: Fp8Policy, step: int, num_steps: int) -> str:
    """Set every FP8 linear's mode for step `step` (host side, before the step and its text pass); returns the
    step's name ("W8A16" / "W8A8", the generation group's regime)."""
    for m in fp8_linears(model):
        m.mode = policy.group_regime(m.group, step, num_steps)
    model.attention.fp8 = policy.attention_fp8(step, num_steps)
    return "W8A16" if policy.generation_a16(step, num_steps) else "W8A8"


def apply_step_regime(model: nn.Module, policy: Fp8Policy, step: int, num_steps: int) -> bool:
    """`set_step_regime`, returning whether any linear's mode changed: the text K/V computed before are then
    stale (the text tower's attention projections and MLP are FP8 linears too) and must be recomputed."""
    before = [m.mode for m in fp8_linears(model)]
    set_step_regime(model, policy, step, num_steps)
    return [m.mode for m in fp8_linears(model)] != before


def missing_input_scales(header) -> list[str]:
    """The quantized linears (module names) of a checkpoint header without an `input_scale`: W8A16 only."""
    return [n for n in quantized_modules(header) if f"{n}.input_scale" not in header]


# ---------------------------------------------------------------------------------------------------- writing


def default_quantization_config(step_policy: bool = True) -> dict:
    """The `quantization_config` of the official FP8 revisions (with the shipped first/last-3 policy)."""
    qc = {"quant_method": "modelopt", "quant_algo": "FP8",
          "ignore": ["proj_in", "proj_out", "time_embedder*", "audio_proj_*", "action_proj_*", "lm_head"]}
    if step_policy:
        qc["runtime"] = {"diffusion_step_policy": {
            "schema_version": 1, "type": "first_last_n", "index_space": "denoising_loop_iteration",
            "scope": ["transformer"], "default_mode": "native", "first_steps": {"count": 3, "mode": "a16"},
            "last_steps": {"count": 3, "mode": "a16"}, "overlap": "a16", "reasoner": "a16"}}
    return qc


def quantizable(name: str) -> bool:
    """Whether the official export quantizes the linear `name`: the decoder layers' projections."""
    return name.startswith("layers.") and linear_group(name) is not None


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor FP8 weight quantisation: scale = amax|W| / 448, W / scale cast to e4m3."""
    scale = (w.detach().float().abs().amax() / FP8_MAX).clamp(min=1e-12)
    return (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale.reshape(())


def quantize_state_dict(state: dict[str, torch.Tensor], input_amax: dict[str, float]) -> dict[str, torch.Tensor]:
    """The FP8 export of an unquantized transformer state dict: every quantizable linear whose input amax was
    calibrated (`input_amax`: module name → amax|x|) gets fp8 `weight`, `weight_scale` and `input_scale`."""
    out = dict(state)
    for name, amax in input_amax.items():
        if not quantizable(name):
            continue
        w8, ws = quantize_weight(state[f"{name}.weight"])
        out[f"{name}.weight"] = w8
        out[f"{name}.weight_scale"] = ws
        out[f"{name}.input_scale"] = torch.tensor(max(float(amax), 1e-12) / FP8_MAX, dtype=torch.float32)
    return out


# official names of the inputs a fused video-tower linear stands for (they read the same input)
_FUSED_NAMES = {"gen_qkv": ("add_q_proj", "add_k_proj", "add_v_proj"), "gate_up": ("gate_proj", "up_proj")}


@torch.no_grad()
def calibrate_input_amax(model: nn.Module, input_ids: torch.Tensor, latents: torch.Tensor, timesteps, fps: float
                         ) -> dict[str, float]:
    """amax|x| of every decoder-layer linear's input (official module names) over one text pass and a video step
    per timestep of an unquantized `Cosmos3Transformer`: what a static calibration records, for test and
    benchmark checkpoints (NVIDIA calibrates on real prompts)."""
    amax: dict[str, float] = {}
    hooks = []
    for name, m in model.named_modules():
        if not (isinstance(m, nn.Linear) and name.startswith("layers.")):
            continue
        parent, _, leaf = name.rpartition(".")
        names = [f"{parent}.{n}" for n in _FUSED_NAMES.get(leaf, (leaf,))]

        def hook(_m, args, _out, names=names):
            value = args[0].detach().abs().max().item()
            for n in names:
                amax[n] = max(amax.get(n, 0.0), value)

        hooks.append(m.register_forward_hook(hook))
    try:
        branch = model.setup_branch(input_ids.shape[0], tuple(latents.shape[2:]), fps=fps)
        model.text_pass(input_ids, branch)
        for t in timesteps:
            model.video_step(latents, torch.tensor(float(t), device=latents.device), branch)
    finally:
        for h in hooks:
            h.remove()
    return amax
