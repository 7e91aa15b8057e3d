"""Transformer configuration: read from `transformer/config.json`, or a named preset."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

from .checkpoint_io import read_json
from .errors import RequestError


ConfigError = RequestError  # the one user-error type (errors.py)


@dataclass(frozen=True)
class TransformerConfig:
    """Every field of the reference's `Cosmos3OmniTransformer` config that changes the video path."""

    hidden_size: int = 4096
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    intermediate_size: int = 12288
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    rope_axes_dim: tuple[int, int, int] = (24, 20, 20)  # mRoPE slots per axis (time, row, column)
    attention_bias: bool = False
    hidden_act: str = "silu"  # "silu" (gated MLP) or "relu2" (Edge: ungated, squared ReLU)
    qk_norm_for_text: bool = True
    use_und_k_norm_for_gen: bool = False
    latent_channel: int = 48
    latent_patch_size: int = 2
    patch_latent_dim: int = 192
    timestep_scale: float = 0.001
    vocab_size: int = 151936
    base_fps: int = 24
    enable_fps_modulation: bool = True
    unified_3d_mrope_reset_spatial_ids: bool = True
    unified_3d_mrope_temporal_modality_margin: int = 15000
    # The audio head (`audio_proj_in/out`, `audio_modality_embed`): loaded when sound_gen, run by `sound=true`.
    sound_gen: bool = False
    sound_dim: int = 0  # sound latent channels (the sound tokenizer's vocoder_input_dim); 0: no audio head
    sound_latent_fps: float = 25.0  # sound latent frames per second (their temporal positions)
    # The action head (`action_proj_in/out`: one projection per embodiment domain, `action_modality_embed`): loaded
    # when action_gen, run by `action.mode`.
    action_gen: bool = False
    action_dim: int = 0  # action channels of the head (raw domain actions are zero-padded to it); 0: no action head
    num_embodiment_domains: int = 32  # rows of the domain-aware projections

    def __post_init__(self) -> None:
        self.validate()

    @property
    def kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def norm_style(self) -> str:
        """The two RMSNorm flavours of the reference differ only in where bf16 rounding happens."""
        return "nemotron" if self.hidden_act == "relu2" else "standard"

    def validate(self) -> None:
        problems = []
        if self.hidden_act not in ("silu", "relu2"):
            problems.append(f"hidden_act must be 'silu' or 'relu2', got {self.hidden_act!r}")
        if self.num_key_value_heads <= 0 or self.num_attention_heads % self.num_key_value_heads:
            problems.append(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            problems.append(f"head_dim must be even, got {self.head_dim}")
        if len(self.rope_axes_dim) != 3 or sum(self.rope_axes_dim) != self.head_dim // 2:
            problems.append(
                f"rope_axes_dim {list(self.rope_axes_dim)} must have 3 entries summing to head_dim/2 = {self.head_dim // 2}"
            )
        else:
            half = self.head_dim // 2
            rows = len(range(1, min(3 * self.rope_axes_dim[1], half), 3))
            cols = len(range(2, min(3 * self.rope_axes_dim[2], half), 3))
            if (rows, cols) != tuple(self.rope_axes_dim[1:]):
                problems.append(f"rope_axes_dim {list(self.rope_axes_dim)}: row/column sections do not fit the interleaved layout")
        p = self.latent_patch_size
        if self.patch_latent_dim != p * p * self.latent_channel:
            problems.append(
                f"patch_latent_dim ({self.patch_latent_dim}) must equal latent_patch_size² × latent_channel "
                f"({p}² × {self.latent_channel} = {p * p * self.latent_channel})"
            )
        if self.sound_gen and self.sound_dim < 1:
            problems.append(f"sound_gen needs sound_dim >= 1, got {self.sound_dim}")
        if self.sound_latent_fps <= 0:
            problems.append(f"sound_latent_fps must be positive, got {self.sound_latent_fps}")
        if self.action_gen and (self.action_dim < 1 or self.num_embodiment_domains < 1):
            problems.append(f"action_gen needs action_dim >= 1 and num_embodiment_domains >= 1, got "
                            f"{self.action_dim} and {self.num_embodiment_domains}")
        if self.use_und_k_norm_for_gen and self.qk_norm_for_text:
            problems.append("use_und_k_norm_for_gen only applies when qk_norm_for_text is false")
        if problems:
            raise ConfigError("invalid transformer config: " + "; ".join(problems))

    def check_vae(self, z_dim: int) -> None:
        if z_dim != self.latent_channel:
            raise ConfigError(
                f"transformer latent_channel ({self.latent_channel}) does not match the VAE z_dim ({z_dim}); "
                "the transformer and vae folders come from different models"
            )

    @classmethod
    def from_dict(cls, raw: dict) -> TransformerConfig:
        hints = typing.get_type_hints(cls)
        kwargs = {k: _typed(k, v, hints[k]) for k, v in raw.items() if k in hints and v is not None}
        axes = raw.get("rope_axes_dim")
        if axes is None and isinstance(raw.get("rope_scaling"), dict):
            axes = raw["rope_scaling"].get("mrope_section")
        if axes is not None:
            if not isinstance(axes, (list, tuple)) or not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
                raise ConfigError(f"rope_axes_dim must be a list of 3 integers, got {axes!r}")
            kwargs["rope_axes_dim"] = tuple(axes)
        return cls(**kwargs)

    @classmethod
    def from_folder(cls, folder: str | Path) -> TransformerConfig:
        path = Path(folder) / "config.json"
        try:
            return cls.from_dict(read_json(path))
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["rope_axes_dim"] = list(self.rope_axes_dim)
        if not self.sound_dim:
            d["sound_dim"] = None  # the reference's value for "no audio head"
        if not self.action_dim:
            d["action_dim"] = None  # likewise for "no action head"
        return d


def _typed(key: str, value, kind):
    """A config.json value checked against the field's type (JSON ints count as floats), else one line."""
    if typing.get_origin(kind) is tuple:
        return value  # rope_axes_dim: checked by from_dict
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not ok:
        raise ConfigError(f"{key} must be {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value


_DEBUG = TransformerConfig(
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    intermediate_size=128,
    rope_axes_dim=(4, 2, 2),
    vocab_size=1024,
)

PRESETS: dict[str, TransformerConfig] = {
    # Tiny: the embedded default model and the tests. vocab covers the built-in tokenizer (1014 ids).
    "debug": _DEBUG,
    # Tiny Edge-style variant (ungated relu² MLP, no text q/k norm, extra k-norm for the video tower).
    "debug_edge": dataclasses.replace(_DEBUG, hidden_act="relu2", qk_norm_for_text=False, use_und_k_norm_for_gen=True),
    # The reference's defaults: Cosmos3 Nano.
    "nano": TransformerConfig(),
    # Cosmos3 Super (≈64 B: 32 B text + 32 B video tower), random weights for benchmarks; a real checkpoint's
    # config.json is always read instead. Confirmed in public code: 64 layers and 8 KV heads (xdit-project/xDiT
    # xfuser/.../runner_models/cosmos3.py: FP8 overrides for layers 0-9 and 54-63; its Ulysses test: "Cosmos3-Super
    # ... 8 KV heads"), base_fps 16 and no audio branch (RyukoMatoiFan/ComfyUI-Cosmos3 README: "16 for
    # Cosmos3-Super", "Cosmos3-Super is video-only"). From the issue / shared/COSMOS3.md (NVIDIA's model card
    # figures): hidden 5120, 64 query heads. Inferred (both towers start from Qwen3-VL-32B, as Nano's from
    # Qwen3-VL-8B, whose text config Nano's defaults match): intermediate_size 25600, head_dim 128, rope_theta 5e6,
    # mRoPE (24, 20, 20), vocab 151936, eps 1e-6, silu MLP, text q/k norm; the count checks it: 487.6 M per layer
    # and tower × 64 = 31.2 B per tower, + 0.78 B embeddings (tests/test_sharding.py).
    "super": TransformerConfig(
        hidden_size=5120,
        num_hidden_layers=64,
        num_attention_heads=64,
        num_key_value_heads=8,
        intermediate_size=25600,
        base_fps=16,
    ),
}


def preset(name: str) -> TransformerConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}") from None


def replace(cfg: TransformerConfig, **changes) -> TransformerConfig:
    return dataclasses.replace(cfg, **changes)


__all__ = ["ConfigError", "TransformerConfig", "PRESETS", "preset", "replace"]
