"""Structured-config schemas for the Hydra app: a mistyped key or a wrong value type fails at compose time."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


class Device(str, Enum):
    auto = "auto"  # CUDA when present (the embedded default stays on the CPU)
    cpu = "cpu"
    cuda = "cuda"


class DType(str, Enum):
    auto = "auto"  # the checkpoint's weights on CUDA, float32 on the CPU
    float32 = "float32"
    bfloat16 = "bfloat16"


class FramesOut(str, Enum):
    none = "none"
    uint8 = "uint8"
    float32 = "float32"


class X264Preset(str, Enum):
    ultrafast = "ultrafast"
    superfast = "superfast"
    veryfast = "veryfast"
    faster = "faster"
    fast = "fast"
    medium = "medium"
    slow = "slow"
    slower = "slower"
    veryslow = "veryslow"


class CompileMode(str, Enum):
    auto = "auto"  # cudagraph on CUDA, eager on the CPU (VAE: compiled on CUDA when the step compiles)
    eager = "eager"  # no compilation
    default = "default"  # inductor kernels
    max_autotune_no_cudagraphs = "max_autotune_no_cudagraphs"  # inductor with GEMM/conv autotuning
    max_autotune = "max_autotune"  # autotuning plus inductor's CUDA graph trees
    reduce_overhead = "reduce_overhead"  # inductor kernels plus its CUDA graph trees
    cudagraph = "cudagraph"  # inductor kernels, then one CUDA graph of the whole denoise step (ours)


class CompileScope(str, Enum):
    blocks = "blocks"  # each repeated layer (regional)
    full = "full"  # the whole video step


class ConditionKeep(str, Enum):
    first = "first"  # the clip's first frames condition the output's start
    last = "last"  # the clip's last frames do (continue the clip from where it ends)


class Schedule(str, Enum):
    checkpoint = "checkpoint"  # whatever scheduler_config.json says
    karras = "karras"  # Karras flow sigmas (published Cosmos3 configs)
    shift = "shift"  # flow sigmas shifted by `flow_shift` (sglang's T2V default)


@dataclass
class ModelConfig:
    name: str = "debug"
    init_seed: int = 0
    distilled: bool = False
    height: int = 128
    width: int = 128
    num_frames: int = 9
    attention_backend: str = "auto"
    batch_cfg: bool = False
    fused_qk_rope: Optional[bool] = None
    vae_dtype: Optional[DType] = None
    vae_tiles: Optional[int] = None


@dataclass
class SamplerConfig:
    num_inference_steps: Optional[int] = None  # None: the checkpoint's fixed schedule, else the reference's 35
    guidance_scale: Optional[float] = None  # None: 1.0 for a distilled checkpoint, else the reference's 6.0
    schedule: Schedule = Schedule.checkpoint
    flow_shift: float = 10.0
    use_system_prompt: Optional[bool] = None


@dataclass
class CompileConfig:
    mode: CompileMode = CompileMode.auto
    scope: CompileScope = CompileScope.blocks
    fullgraph: bool = True
    dynamic: bool = False
    recompile_limit: int = 8
    warmup_steps: int = 1
    inductor: dict[str, Any] = field(default_factory=dict)
    vae: CompileMode = CompileMode.auto
    text_pass: CompileMode = CompileMode.eager
    cache_dir: Optional[str] = "auto"
    offload_text_tower: Optional[bool] = None
    pin_text_tower: Optional[bool] = None
    vae_warmup: Optional[bool] = None  # the decode units compiled on a background thread during the denoise loop


class PrecisionPolicy(str, Enum):
    checkpoint = "checkpoint"  # the FP8 checkpoint's shipped per-step policy (W8A8 where it ships none)
    a16 = "a16"  # W8A16 at every step (FP8 weights dequantised, ordinary GEMMs)
    a8 = "a8"  # W8A8 at every step (inputs quantised with their static scales, FP8 GEMMs)


@dataclass
class PrecisionConfig:
    policy: PrecisionPolicy = PrecisionPolicy.checkpoint
    first_steps: Optional[int] = None  # None: the checkpoint's (or the reference's default) W8A16 window
    last_steps: Optional[int] = None
    fp8_attention: bool = False  # the video attention in FP8 at the W8A8 steps (not the reference's arithmetic)


class ActionMode(str, Enum):
    forward_dynamics = "forward_dynamics"  # first frame and actions clean → video
    policy = "policy"  # first frame clean → video and actions
    inverse_dynamics = "inverse_dynamics"  # the whole clip clean → actions


@dataclass
class ActionConfig:
    mode: Optional[ActionMode] = None  # None: no action task
    domain: Optional[str] = None
    chunk_size: Optional[int] = None
    resolution_tier: int = 480
    actions: Optional[str] = None
    raw_dim: Optional[int] = None
    view_point: str = "ego_view"


class ShardMode(str, Enum):
    none = "none"  # every rank holds the whole model
    fsdp = "fsdp"  # the video tower's weights sharded over every rank (FSDP2, sharding.py)


@dataclass
class ParallelConfig:
    cfg: bool = False
    ulysses: int = 1
    backend: Optional[str] = None
    vae_rows: bool = False
    shard: ShardMode = ShardMode.none


@dataclass
class OutputConfig:
    frames: FramesOut = FramesOut.none
    video: bool = True
    progress: bool = True
    crf: int = 18
    preset: X264Preset = X264Preset.medium
    dir: Optional[str] = None


@dataclass
class GenerateConfig:
    checkpoint: Optional[str] = None
    checkpoint_revision: Optional[str] = None
    prompt: str = "A red fox trots through fresh snow at dawn, steam rising from its breath."
    negative_prompt: str = ""
    prompt_file: Optional[str] = None
    image: Optional[str] = None
    video: Optional[str] = None
    condition_frames: list[int] = field(default_factory=lambda: [0, 1])
    condition_keep: ConditionKeep = ConditionKeep.first
    add_resolution_template: bool = True
    add_duration_template: bool = True
    sound: bool = False
    height: Optional[int] = None
    width: Optional[int] = None
    num_frames: Optional[int] = None
    fps: float = 24.0
    seed: int = 0
    device: Device = Device.auto
    dtype: DType = DType.auto
    keep_loaded: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    action: ActionConfig = field(default_factory=ActionConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


def unknown_keys(node, schema: type = None, prefix: str = "") -> list[str]:
    """Dotted keys of a composed config that the schema does not declare (Hydra's `+key=value` adds them to a
    structured config silently). Free-form dict fields (`compile.inductor`) are not walked."""
    schema = schema or GenerateConfig
    hints = typing.get_type_hints(schema)
    found = []
    for key in node.keys():
        dotted = f"{prefix}{key}"
        if key not in hints:
            found.append(dotted)
        elif dataclasses.is_dataclass(hints[key]):
            found += unknown_keys(node[key], hints[key], dotted + ".")
    return found


def register_configs() -> None:
    """The root schema types every group's node too, so group files need no schema of their own."""
    ConfigStore.instance().store(name="generate_schema", node=GenerateConfig)
