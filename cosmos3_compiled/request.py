"""The request and every check on it and on the settings, each written once, all before any weights are read.

`prepare(cfg, out_dir)` turns a composed config into a `Job`: the typed request, the resolved settings, the
checkpoint's component configs (each parsed once and handed on to the loaders) and the one scheduler. Anything
wrong raises `RequestError` with one line.
"""

from __future__ import annotations

import dataclasses
import difflib
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image

from . import attention
from .components import DTYPES, CheckpointSpec, read_checkpoint
from .config import TransformerConfig, preset
from .defaults import REFERENCE_SIZE, machine_defaults, request_defaults
from .errors import RequestError
from .hub import resolve_checkpoint
from .schema import unknown_keys
from .scheduler import COSMOS3_SCHEDULER_CONFIG, FlowUniPCScheduler, merge_schedule_overrides
from .model import check_fused_qk_rope, fused_qk_rope_supported


@dataclass(frozen=True)
class Request:
    """What to generate: the inputs a user varies per job (the model and compile settings are `Settings`)."""

    prompt: str
    negative_prompt: str
    height: int
    width: int
    num_frames: int
    fps: float
    seed: int
    num_inference_steps: int
    guidance_scale: float
    image: Path | None = None
    use_system_prompt: bool = True

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.num_frames - 1) // 4 + 1, self.height // 16, self.width // 16

    @property
    def use_cfg(self) -> bool:
        return self.guidance_scale != 1.0

    @property
    def image_to_video(self) -> bool:
        return self.image is not None and self.num_frames > 1

    @property
    def clean_frames(self) -> tuple[int, ...]:
        """Latent frames kept clean (not denoised): frame 0 in image-to-video."""
        return (0,) if self.image_to_video else ()


@dataclass(frozen=True)
class Settings:
    """How to run it: resolved once from the config and checked against this machine."""

    device: torch.device
    dtype: torch.dtype
    vae_dtype: torch.dtype
    attention_backend: str
    fused_qk_rope: bool
    vae_tiles: int


@dataclass
class Job:
    request: Request
    settings: Settings
    checkpoint: CheckpointSpec | None  # None: the embedded default
    scheduler: FlowUniPCScheduler
    out_dir: Path
    cfg: DictConfig  # the composed config with every `auto` / unset value resolved (what the stages read)
    auto: dict  # {key: "value: why"} for each value chosen by `defaults` (metrics.json `auto`)


def value(x):
    """An OmegaConf enum node's plain value."""
    return x.value if hasattr(x, "value") else x


def check_keys(cfg: DictConfig) -> None:
    """Refuse keys the schema does not declare, however they were added (`+promt=...` included)."""
    unknown = unknown_keys(cfg)
    if unknown:
        key = unknown[0]
        parent, _, leaf = key.rpartition(".")
        known = (OmegaConf.select(cfg, parent) if parent else cfg).keys()
        near = difflib.get_close_matches(leaf, [str(k) for k in known if str(k) != leaf], n=1)
        hint = f"; did you mean {parent + '.' if parent else ''}{near[0]}?" if near else ""
        raise RequestError(f"unknown setting {key!r} (not in the config schema){hint}")


def build_request(cfg: DictConfig) -> Request:
    if any(cfg[k] is None for k in REFERENCE_SIZE):
        cfg, _ = request_defaults(cfg)
    h, w, f, fps = int(cfg.height), int(cfg.width), int(cfg.num_frames), float(cfg.fps)
    if h <= 0 or w <= 0 or h % 16 or w % 16:
        raise RequestError(f"height and width must be positive multiples of 16, got height={h} width={w}")
    if f < 1 or (f - 1) % 4:
        raise RequestError(f"num_frames must be 4k+1 (1, 5, 9, ..., 81, ...), got {f}")
    prompt = str(cfg.prompt)
    if cfg.prompt_file is not None:
        path = Path(str(cfg.prompt_file)).expanduser()
        try:
            prompt = path.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as err:
            raise RequestError(f"prompt_file {path} cannot be read as UTF-8 text ({err})") from None
    if not prompt.strip():
        raise RequestError("prompt is empty: pass prompt='...'")
    if fps <= 0:
        raise RequestError(f"fps must be positive, got {fps}")
    steps = int(cfg.sampler.num_inference_steps)
    if steps < 1:
        raise RequestError(f"sampler.num_inference_steps must be >= 1, got {steps}")
    image = None
    if cfg.image is not None:
        image = Path(str(cfg.image)).expanduser()
        if not image.is_file():
            raise RequestError(f"conditioning image {image} does not exist")
        try:
            with Image.open(image) as im:
                im.verify()  # header only: cheap
        except Exception as err:
            raise RequestError(f"conditioning image {image} is not a readable image ({err})") from None
        if f == 1:
            raise RequestError("image conditioning needs num_frames > 1 (with num_frames=1 the reference ignores it)")
    return Request(
        prompt=prompt, negative_prompt=str(cfg.negative_prompt or ""), height=h, width=w, num_frames=f,
        fps=fps, seed=int(cfg.seed), num_inference_steps=steps, guidance_scale=float(cfg.sampler.guidance_scale),
        image=image, use_system_prompt=cfg.sampler.use_system_prompt is None or bool(cfg.sampler.use_system_prompt),
    )


def check_settings(cfg: DictConfig, model: TransformerConfig) -> Settings:
    """`model`: the transformer's config (the checkpoint's, or the embedded preset's)."""
    device = torch.device(value(cfg.device))  # resolved and checked against this machine by `defaults`
    dtype = DTYPES[value(cfg.dtype)]
    vae_dtype = DTYPES[value(cfg.model.vae_dtype)] if cfg.model.vae_dtype is not None else dtype
    mode = value(cfg.compile.mode)
    if mode in ("cudagraph", "reduce_overhead", "max_autotune") and device.type != "cuda":
        raise RequestError(f"compile={mode} uses CUDA graphs: it needs device=cuda")
    backend = str(cfg.model.attention_backend)
    attention.check_backend(backend, device, dtype)
    if cfg.compile.pin_text_tower and not (cfg.compile.offload_text_tower and device.type == "cuda"):
        raise RequestError("compile.pin_text_tower=true needs compile.offload_text_tower=true and device=cuda")
    fused = cfg.model.fused_qk_rope
    if fused:
        check_fused_qk_rope(device, model.head_dim)
    fused = fused_qk_rope_supported(device, model.head_dim) if fused is None else bool(fused)
    tiles, latent_width = int(cfg.model.vae_tiles), int(cfg.width) // 16
    if not 1 <= tiles <= max(1, latent_width):
        raise RequestError(f"model.vae_tiles={tiles}: use 1 to {latent_width} (the latent width, width/16) strips")
    if tiles > 1 and cfg.parallel.vae_rows:
        raise RequestError("model.vae_tiles > 1 and parallel.vae_rows=true are two different decode splits: pick one")
    if not 0 <= cfg.output.crf <= 51:
        raise RequestError(f"output.crf={cfg.output.crf}: H.264 takes 0 (lossless) to 51")
    return Settings(device, dtype, vae_dtype, backend, fused, tiles)


def check_output_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RequestError(f"output directory {out_dir} is not writable ({err.strerror})") from None


def build_scheduler(cfg: DictConfig, checkpoint: CheckpointSpec | None) -> FlowUniPCScheduler:
    raw = dict(COSMOS3_SCHEDULER_CONFIG) if checkpoint is None else checkpoint.scheduler
    raw = merge_schedule_overrides(raw, value(cfg.sampler.schedule), float(cfg.sampler.flow_shift))
    return FlowUniPCScheduler.from_config(raw)


def prepare(cfg: DictConfig, out_dir: str | Path, writes: bool = True) -> Job:
    """Every check, cheapest first (the request before a Hub download); `writes`: this process writes the
    outputs (global rank 0). `auto` and unset values are resolved here (`defaults`), explicit ones kept."""
    check_keys(cfg)
    cfg, auto = request_defaults(cfg)
    request = build_request(cfg)
    checkpoint = None
    if cfg.checkpoint is not None:
        checkpoint = read_checkpoint(resolve_checkpoint(str(cfg.checkpoint), cfg.checkpoint_revision))
    elif cfg.checkpoint_revision is not None:
        raise RequestError("checkpoint_revision= needs checkpoint=<a Hub id>")
    model = preset(cfg.model.name) if checkpoint is None else checkpoint.transformer
    cfg, chosen = machine_defaults(cfg, checkpoint, request, model)
    auto.update(chosen)
    request = dataclasses.replace(request, use_system_prompt=bool(cfg.sampler.use_system_prompt))
    settings = check_settings(cfg, model)
    out_dir = Path(out_dir)
    if writes:
        check_output_dir(out_dir)
    return Job(request, settings, checkpoint, build_scheduler(cfg, checkpoint), out_dir, cfg, auto)
