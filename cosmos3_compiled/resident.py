"""The models a job loads and prepares, and the one set of them a process keeps for the next job of a sweep."""

from __future__ import annotations

import gc
import json
import logging
from dataclasses import dataclass

import torch
from omegaconf import DictConfig, OmegaConf

from . import sharding
from .audio import AudioDecoder, load_audio_decoder
from .compile import CompilePlan, drop_compiled
from .components import build_embedded, load_checkpoint
from .distributed import Parallel, apply_row_parallel_decode, apply_sequence_parallel
from .model import Cosmos3Transformer
from .prompting import PromptTokenizer
from .request import Job, value
from .vae import WanVAE, load_vae

log = logging.getLogger(__name__)


@dataclass
class Models:
    """What a job loads and prepares once, and a later job with the same `resident_key` may reuse."""

    transformer: Cosmos3Transformer | None  # backends set, Ulysses applied, compiled per the plan
    vae: WanVAE | None
    tokenizer: PromptTokenizer
    source: str  # the checkpoint folder, or "embedded:<preset>"
    plan: CompilePlan
    row_decode: bool  # the VAE decode is split by rows over every rank of the job
    device: torch.device
    load_stats: dict  # the transformer weights read: bytes, seconds, GB/s (empty for the embedded default)
    audio: AudioDecoder | None = None  # the sound tokenizer's decoder (loaded for the first sound=true job)


def load_models(cfg: DictConfig, job: Job, device: torch.device, par: Parallel | None) -> Models:
    """Read the weights (checkpoint or embedded default), set the backends, apply the parallel layout and the
    compile plan."""
    s = job.settings
    offload_text, stats = cfg.compile.offload_text_tower, {}
    if job.checkpoint is None:
        transformer, vae, tokenizer = build_embedded(cfg.model.name, cfg.model.init_seed, device, s.dtype,
                                                     s.vae_dtype, offload_text_tower=offload_text,
                                                     pin_text_tower=bool(cfg.compile.pin_text_tower))
        source = f"embedded:{cfg.model.name}"
    else:
        transformer, vae, tokenizer = load_checkpoint(job.checkpoint, device, s.dtype, s.vae_dtype,
                                                      with_encoder=job.request.encodes,
                                                      offload_text_tower=offload_text, stats=stats,
                                                      pin_text_tower=bool(cfg.compile.pin_text_tower))
        source = str(job.checkpoint.folder)
        if stats.get("seconds"):
            stats["gb_per_s"] = stats["bytes"] / stats["seconds"] / 1e9
    transformer.set_attention_backend(s.attention_backend)
    transformer.set_fused_qk_rope(s.fused_qk_rope)
    if par is not None:
        apply_sequence_parallel(transformer, par.ulysses)
        if par.shard == "fsdp":  # after fusion (setup_buffers, at load) and Ulysses; before the compile plan
            sharding.apply_fsdp(transformer, par.mesh)
    vae.tiles = s.vae_tiles
    plan = CompilePlan.from_config(cfg.compile)
    plan.apply(transformer, vae)
    row_decode = par is not None and cfg.parallel.vae_rows and apply_row_parallel_decode(vae, par) is not None
    models = Models(transformer, vae, tokenizer, source, plan, row_decode, device, stats)
    add_audio(models, job)
    return models


def add_audio(models: Models, job: Job) -> None:
    """A sound=true job's sound decoder (`audio.load_audio_decoder`: strict, weight norm folded), in the model's
    dtype on its device; loaded once, kept with the models for later jobs."""
    if not job.request.sound_len or models.audio is not None:
        return
    models.audio = load_audio_decoder(job.checkpoint.folder / "sound_tokenizer", dtype=job.settings.dtype,
                                      device=models.device, cfg=job.checkpoint.sound)


def resident_key(cfg: DictConfig, job: Job) -> str:
    """Everything that decides what `load_models` builds; the request itself (prompt, seed, size, steps,
    guidance, its conditioning: models loaded without the VAE encoder gain it in place, `add_encoder`),
    compile.warmup_steps, compile.vae_warmup and the outputs are not part of it."""
    model = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True).items()
             if k not in ("height", "width", "num_frames")}  # request defaults only
    checkpoint = None if job.checkpoint is None else str(job.checkpoint.folder)
    compile_cfg = OmegaConf.to_container(cfg.compile, resolve=True, enum_to_str=True)
    compile_cfg.pop("warmup_steps")  # read by the denoise stage per job
    compile_cfg.pop("vae_warmup")  # likewise: when the compiled decode warms up, not what is compiled
    return json.dumps({
        "checkpoint": checkpoint, "model": model, "device": value(cfg.device), "dtype": value(cfg.dtype),
        "compile": compile_cfg,
    }, sort_keys=True)


def add_encoder(models: Models, job: Job) -> None:
    """Reused models that were loaded for a job without conditioning (no VAE encoder) take the checkpoint's
    encoder in place for an image- or video-to-video job; the transformer and every compiled graph stay."""
    vae = models.vae
    if not job.request.encodes or vae.encoder is not None or job.checkpoint is None:
        return
    full = load_vae(job.checkpoint.folder / "vae", dtype=job.settings.vae_dtype, device=models.device,
                    with_encoder=True, cfg=job.checkpoint.vae)
    if vae.memory_format == torch.channels_last_3d:
        full.apply_channels_last_3d()  # the encoder in the layout of the resident decoder
    vae.encoder, vae.quant_conv = full.encoder, full.quant_conv


class Resident:
    """The one set of loaded models of this process. A job holds them while it runs; afterwards they stay for
    the next job (Hydra's basic launcher runs a sweep's jobs in one process), which takes them when its
    `resident_key` matches. Any other key, or a failed job, frees them first, so two model sets never share
    the GPU and a job never inherits models left half-way by an error."""

    def __init__(self):
        self.key: str | None = None
        self.models: Models | None = None

    def take(self, key: str | None) -> Models | None:
        """The held models when they were built for `key`; otherwise free them and return None."""
        if key is not None and key == self.key:
            return self.models
        self.drop()
        return None

    def hold(self, key: str | None, models: Models) -> Models:
        self.drop()
        self.key, self.models = key, models
        return models

    def drop(self) -> None:
        models, self.key, self.models = self.models, None, None
        if models is not None:
            release(models)


RESIDENT = Resident()


def release(models: Models) -> None:
    """Drop the models and every compiled graph that references them."""
    models.transformer = models.vae = models.audio = None
    drop_compiled()
    gc.collect()
    if models.device.type == "cuda":
        torch.cuda.empty_cache()
