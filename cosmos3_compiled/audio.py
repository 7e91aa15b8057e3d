"""The sound tokenizer's decoder (Cosmos3 AVAE, diffusers' `Cosmos3AVAEAudioTokenizer`): sound latents → waveform.

The checkpoint's `sound_tokenizer/` holds an Oobleck-style decoder: a 7-tap convolution up to the widest channel
count, then one block per upsampling stride (Snake, a transposed convolution, three dilated residual units), Snake
and a last 7-tap convolution down to the audio channels; the output is clamped to [-1, 1]. Every convolution is
weight-normalised in the file (`weight_g`, `weight_v`): the norm is folded into one plain weight at load, and each
Snake's `exp` of its log-scale parameters is folded too, so the forward is plain convolutions and one
`x + inv_beta · sin(alpha · x)²` per activation.

Only the decoder is read; the encoder's weights (`encoder.*`) are skipped unread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint_io import CheckpointError, read_header, read_json, stream_tensors, weight_files

# What the shipped tokenizer is (diffusers refuses anything else in `Cosmos3AVAEAudioTokenizer.__init__`); a
# config naming another value is refused here too, in one line.
_REQUIRED = {
    "model_type": "autoencoder_v2", "dec_type": "oobleck", "dec_use_snake": True, "dec_final_tanh": False,
    "dec_anti_aliasing": False, "dec_use_nearest_upsample": False, "dec_use_tanh_at_final": False,
    "activation": "snakebeta", "snake_logscale": True, "anti_aliasing": False, "use_cuda_kernel": False,
    "latent_mean": None, "latent_std": None,
}
_SNAKE_EPS = 1e-9  # added to beta before the reciprocal, as the reference does
AAC_SAMPLE_RATES = (96000, 88200, 64000, 48000, 44100, 32000, 24000, 22050, 16000, 12000, 11025, 8000, 7350)


@dataclass(frozen=True)
class AudioConfig:
    """The decoder's shape and the rates the pipeline needs, from `sound_tokenizer/config.json` (diffusers keys)."""

    sampling_rate: int = 48000
    latent_dim: int = 64  # vocoder_input_dim: the transformer's sound_dim
    channels: int = 320  # dec_dim
    channel_mults: tuple[int, ...] = (1, 2, 4, 8, 16)  # dec_c_mults
    strides: tuple[int, ...] = (2, 4, 5, 6, 8)  # dec_strides (applied in reverse order)
    audio_channels: int = 2  # dec_out_channels
    hop_size: int | None = None  # waveform samples per latent frame; None: the product of the strides

    @property
    def hop(self) -> int:
        return self.hop_size if self.hop_size is not None else math.prod(self.strides)

    def latent_len(self, num_frames: int, fps: float) -> int:
        """Sound latent frames for a clip, as the reference sizes them: ceil(int(F / fps · rate) / hop)."""
        samples = int(num_frames / fps * self.sampling_rate)
        return (samples + self.hop - 1) // self.hop

    @classmethod
    def from_dict(cls, raw: dict, where: str = "sound_tokenizer/config.json") -> AudioConfig:
        for key, want in _REQUIRED.items():
            if key in raw and raw[key] != want:
                raise CheckpointError(f"{where}: {key}={raw[key]!r} is not supported (the shipped tokenizer has {want!r})")
        kwargs = {}
        for ours, theirs in (("sampling_rate", "sampling_rate"), ("latent_dim", "vocoder_input_dim"),
                             ("channels", "dec_dim"), ("audio_channels", "dec_out_channels")):
            if theirs in raw:
                v = raw[theirs]
                if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                    raise CheckpointError(f"{where}: {theirs} must be a positive integer, got {v!r}")
                kwargs[ours] = v
        for ours, theirs in (("channel_mults", "dec_c_mults"), ("strides", "dec_strides")):
            if theirs in raw:
                v = raw[theirs]
                if not isinstance(v, (list, tuple)) or not v or any(
                        isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in v):
                    raise CheckpointError(f"{where}: {theirs} must be a list of positive integers, got {v!r}")
                kwargs[ours] = tuple(v)
        if raw.get("hop_size") is not None:
            kwargs["hop_size"] = int(raw["hop_size"])
        cfg = cls(**kwargs)
        if len(cfg.channel_mults) != len(cfg.strides):
            raise CheckpointError(f"{where}: dec_c_mults {list(cfg.channel_mults)} and dec_strides "
                                  f"{list(cfg.strides)} must have the same length")
        return cfg

    def to_dict(self) -> dict:
        """diffusers' config keys (decoder side)."""
        return {"sampling_rate": self.sampling_rate, "vocoder_input_dim": self.latent_dim, "dec_dim": self.channels,
                "dec_c_mults": list(self.channel_mults), "dec_strides": list(self.strides),
                "dec_out_channels": self.audio_channels, "hop_size": self.hop_size}


# The released tokenizer's decoder (diffusers' defaults), for benchmarks with random weights.
RELEASED = AudioConfig()
# A tiny tokenizer for tests and `tools/make_tiny_checkpoint.py --sound`: an AAC rate, 25 latent frames per second
# (8000 / 320, as the released 48000 / 1920), an odd stride (output_padding), widths of a few channels.
TINY = AudioConfig(sampling_rate=8000, latent_dim=16, channels=4, channel_mults=(1, 2, 2, 4), strides=(2, 5, 4, 8),
                   audio_channels=2)


class Snake(nn.Module):
    """x + inv_beta · sin(alpha · x)², per channel; `alpha` = exp(log alpha), `inv_beta` = 1 / (exp(log beta) + ε)
    folded at load (`fold_snake`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, dim, 1))
        self.inv_beta = nn.Parameter(torch.ones(1, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inv_beta * torch.sin(self.alpha * x).pow(2)


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int):
        super().__init__()
        self.snake1 = Snake(dim)
        self.conv1 = nn.Conv1d(dim, dim, kernel_size=7, dilation=dilation, padding=3 * dilation)
        self.snake2 = Snake(dim)
        self.conv2 = nn.Conv1d(dim, dim, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.snake2(self.conv1(self.snake1(x))))  # same length: no crop needed


class DecoderBlock(nn.Module):
    """Snake, ×stride transposed convolution (kernel 2·stride; odd strides pad one sample), three residual units."""

    def __init__(self, dim_in: int, dim_out: int, stride: int):
        super().__init__()
        self.snake1 = Snake(dim_in)
        self.conv_t1 = nn.ConvTranspose1d(dim_in, dim_out, kernel_size=2 * stride, stride=stride,
                                          padding=math.ceil(stride / 2), output_padding=stride % 2)
        self.res_unit1 = ResidualUnit(dim_out, 1)
        self.res_unit2 = ResidualUnit(dim_out, 3)
        self.res_unit3 = ResidualUnit(dim_out, 9)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_unit3(self.res_unit2(self.res_unit1(self.conv_t1(self.snake1(x)))))


class AudioDecoderNet(nn.Module):
    """Module names as in the file under `decoder.` (conv1, block.i, snake1, conv2)."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        mults = (1, *cfg.channel_mults)
        ups = tuple(reversed(cfg.strides))
        c = cfg.channels
        self.conv1 = nn.Conv1d(cfg.latent_dim, c * mults[-1], kernel_size=7, padding=3)
        n = len(ups)
        self.block = nn.ModuleList(DecoderBlock(c * mults[n - i], c * mults[n - i - 1], s) for i, s in enumerate(ups))
        self.snake1 = Snake(c)
        self.conv2 = nn.Conv1d(c, cfg.audio_channels, kernel_size=7, padding=3, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv1(z)
        for block in self.block:
            x = block(x)
        return self.conv2(self.snake1(x))


class AudioDecoder(nn.Module):
    """Sound latents `[C, T]` → waveform `[audio_channels, T · hop]` in [-1, 1], in the decoder's dtype (not
    trimmed to the video's length, as the reference returns it)."""

    def __init__(self, cfg: AudioConfig):
        super().__init__()
        self.cfg = cfg
        self.decoder = AudioDecoderNet(cfg)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder.conv1.weight.device

    @torch.no_grad()
    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        x = latents.to(device=self.device, dtype=self.dtype).unsqueeze(0)  # [1, C, T]
        return self.decoder(x).clamp(-1.0, 1.0)[0]  # [audio_channels, N]


# ---- loading ---------------------------------------------------------------------------------------------------


def _file_layout(model: AudioDecoder) -> dict[str, tuple[str, ...]]:
    """Each parameter of `model` → the file keys it is folded from."""
    layout = {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
            layout[f"{name}.weight"] = (f"{name}.weight_g", f"{name}.weight_v")
            if module.bias is not None:
                layout[f"{name}.bias"] = (f"{name}.bias",)
        elif isinstance(module, Snake):
            layout[f"{name}.alpha"] = (f"{name}.alpha",)
            layout[f"{name}.inv_beta"] = (f"{name}.beta",)
    return layout


def _expected_shapes(model: AudioDecoder) -> dict[str, tuple[int, ...]]:
    """File key → shape for every tensor the decoder reads (weight_g: the weight's first dim, then ones)."""
    shapes = {}
    params = dict(model.named_parameters())
    for name, keys in _file_layout(model).items():
        shape = tuple(params[name].shape)
        if len(keys) == 2:
            shapes[keys[0]] = (shape[0],) + (1,) * (len(shape) - 1)
            shapes[keys[1]] = shape
        else:
            shapes[keys[0]] = shape
    return shapes


def fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """`weight = g · v / ‖v‖`, the norm over every dim but the first, in fp32: torch's own weight-norm op (what
    `torch.nn.utils.weight_norm` computes before every forward of the reference), so the folded weight is the one
    the reference convolves with, bit for bit."""
    return torch._weight_norm(v.float(), g.float(), 0)


def fold_snake(log_alpha: torch.Tensor, log_beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, inv_beta) of a log-scale Snake, in fp32."""
    return torch.exp(log_alpha.float()), (torch.exp(log_beta.float()) + _SNAKE_EPS).reciprocal()


def read_audio_config(folder: str | Path) -> AudioConfig:
    """`sound_tokenizer/config.json` parsed and checked, and the decoder's weights present (headers read)."""
    folder = Path(folder)
    cfg = AudioConfig.from_dict(read_json(folder / "config.json"), where=str(folder / "config.json"))
    weight_files(folder)
    return cfg


def load_audio_decoder(folder: str | Path, dtype: torch.dtype, device: str | torch.device = "cpu",
                       cfg: AudioConfig | None = None) -> AudioDecoder:
    """The decoder of `folder` (a `sound_tokenizer/`), strictly: every decoder tensor present with its shape, no key
    outside the decoder and the encoder; the encoder is never read. Weights stream to `device` in fp32, are folded
    there (weight norm, Snake) and cast to `dtype`."""
    folder = Path(folder)
    cfg = cfg or read_audio_config(folder)
    with torch.device("meta"):
        model = AudioDecoder(cfg)
    files = weight_files(folder)
    header = read_header(files)
    expected = _expected_shapes(model)
    problems = []
    missing = sorted(k for k in expected if k not in header)
    if missing:
        problems.append(f"missing {len(missing)} tensor(s), e.g. {', '.join(missing[:3])}")
    extra = sorted(k for k in header if k not in expected and not k.startswith("encoder."))
    if extra:
        problems.append(f"unexpected {len(extra)} tensor(s), e.g. {', '.join(extra[:3])}")
    wrong = [f"{k} {tuple(header[k].shape)} (expected {expected[k]})" for k in sorted(expected)
             if k in header and tuple(header[k].shape) != expected[k]]
    if wrong:
        problems.append(f"{len(wrong)} shape mismatch(es), e.g. {'; '.join(wrong[:2])}")
    if problems:
        raise CheckpointError(f"{folder}: the sound tokenizer's weights do not fit its config.json: {'; '.join(problems)}")
    dev = torch.device(device)
    raw = stream_tensors(header, {k: (dev, torch.float32) for k in expected})
    state = {}
    layout = _file_layout(model)
    for name, keys in layout.items():
        if name.endswith(".weight"):
            state[name] = fold_weight_norm(raw[keys[0]], raw[keys[1]])
        elif name.endswith(".alpha"):
            snake = name[: -len(".alpha")]
            state[name], state[f"{snake}.inv_beta"] = fold_snake(raw[keys[0]], raw[layout[f"{snake}.inv_beta"][0]])
        elif name.endswith(".bias"):
            state[name] = raw[keys[0]]
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def build_random_audio_decoder(cfg: AudioConfig, dtype: torch.dtype, device: str | torch.device, seed: int = 0
                               ) -> AudioDecoder:
    """Seeded random (already folded) weights, drawn on `device`: benchmarks of the released size."""
    dev = torch.device(device)
    model = AudioDecoder(cfg).to(dev)
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = torch.randn(p.shape, generator=gen, device=dev)
            if name.endswith(".weight"):
                t /= math.sqrt(math.prod(p.shape[1:]))
            elif name.endswith(("alpha", "inv_beta")):
                t = 1.0 + 0.1 * t
            else:
                t *= 0.02
            p.copy_(t)
    return model.to(dtype).eval().requires_grad_(False)
