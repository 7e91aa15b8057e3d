"""Assemble and run the text/image-to-video pipeline from a composed Hydra config.

The one place where components and stages are instantiated; each stage gets only its own settings.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import attention_fa4
from .checkpoint_io import CheckpointError, read_json
from .compile import (
    MODES, CompileCache, CompileSettings, apply_compile, apply_compile_text, apply_compile_vae, compile_counters,
    setup_compile_cache,
)
from .components import DTYPES, build_embedded, check_checkpoint_folder, load_checkpoint
from .config import ConfigError, preset
from .model import fused_qk_rope_supported
from .distributed import ParallelError, apply_row_parallel_decode, apply_sequence_parallel, init_parallel, teardown
from .progress import set_progress_enabled
from .scheduler import COSMOS3_SCHEDULER_CONFIG, FlowUniPCScheduler, SchedulerConfigError


log = logging.getLogger(__name__)


class RequestError(ValueError):
    """A request that cannot run; raised before any model is loaded."""


USER_ERRORS = (RequestError, CheckpointError, ConfigError, SchedulerConfigError, ParallelError)


def _value(x):
    return x.value if hasattr(x, "value") else x


def build_request(cfg: DictConfig):
    from cosmos3_compiled.stages.state import Request

    h, w, f, fps = int(cfg.height), int(cfg.width), int(cfg.num_frames), float(cfg.fps)
    if h <= 0 or w <= 0 or h % 16 or w % 16:
        raise RequestError(f"height and width must be positive multiples of 16, got height={h} width={w}")
    if f < 1 or (f - 1) % 4:
        raise RequestError(f"num_frames must be 4k+1 (1, 5, 9, ..., 81, ...), got {f}")
    if not str(cfg.prompt).strip():
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
            from PIL import Image

            with Image.open(image) as im:
                im.verify()  # header only: cheap
        except Exception as err:
            raise RequestError(f"conditioning image {image} is not a readable image ({err})") from None
        if f == 1:
            raise RequestError("image conditioning needs num_frames > 1 (with num_frames=1 the reference ignores it)")
    return Request(
        prompt=str(cfg.prompt), negative_prompt=str(cfg.negative_prompt or ""), height=h, width=w, num_frames=f,
        fps=fps, seed=int(cfg.seed), num_inference_steps=steps, guidance_scale=float(cfg.sampler.guidance_scale),
        image=image, use_system_prompt=bool(cfg.sampler.use_system_prompt),
    )


def check_output_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RequestError(f"output directory {out_dir} is not writable ({err.strerror})") from None


def scheduler_config(cfg: DictConfig) -> dict:
    raw = dict(COSMOS3_SCHEDULER_CONFIG)
    if cfg.checkpoint is not None:
        raw = read_json(Path(str(cfg.checkpoint)) / "scheduler" / "scheduler_config.json")
    schedule = _value(cfg.sampler.schedule)
    if schedule == "karras":
        raw = {**raw, "use_karras_sigmas": True}
        raw.setdefault("sigma_max", 200.0)
        raw.setdefault("sigma_min", 0.147)
    elif schedule == "shift":
        raw = {**raw, "use_karras_sigmas": False, "flow_shift": float(cfg.sampler.flow_shift)}
    return raw


def check_settings(cfg: DictConfig) -> tuple[torch.device, torch.dtype, torch.dtype]:
    device = torch.device(_value(cfg.device))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RequestError("device=cuda but no CUDA device is available; use device=cpu")
    dtype = DTYPES[_value(cfg.dtype)]
    vae_dtype = DTYPES[_value(cfg.model.vae_dtype)] if cfg.model.vae_dtype is not None else dtype
    if cfg.compile.mode not in MODES:
        raise RequestError(f"unknown compile mode {cfg.compile.mode!r}; choose one of {', '.join(MODES)}")
    if cfg.compile.mode in ("cudagraph", "reduce_overhead", "max_autotune") and device.type != "cuda":
        raise RequestError(f"compile={cfg.compile.mode} uses CUDA graphs: it needs device=cuda")
    backend = cfg.model.attention_backend
    if backend == "fa4":
        if device.type != "cuda":
            raise RequestError("model.attention_backend=fa4 needs device=cuda")
        try:
            attention_fa4.check_available(device)
        except RuntimeError as err:
            raise RequestError(str(err)) from None
        if dtype not in (torch.float16, torch.bfloat16):
            raise RequestError("model.attention_backend=fa4 runs 16-bit inputs only: use dtype=bfloat16")
    if cfg.compile.pin_text_tower and not (cfg.compile.offload_text_tower and device.type == "cuda"):
        raise RequestError("compile.pin_text_tower=true needs compile.offload_text_tower=true and device=cuda")
    if cfg.model.fused_qk_rope and not fused_qk_rope_supported(device):
        raise RequestError("model.fused_qk_rope=true needs device=cuda and Triton; use null (auto) or false")
    tiles, latent_width = cfg.model.vae_tiles, cfg.width // 16
    if not 1 <= tiles <= max(1, latent_width):
        raise RequestError(f"model.vae_tiles={tiles}: use 1 to {latent_width} (the latent width, width/16) strips")
    if tiles > 1 and cfg.parallel.vae_rows:
        raise RequestError("model.vae_tiles > 1 and parallel.vae_rows=true are two different decode splits: pick one")
    if not 0 <= cfg.output.crf <= 51:
        raise RequestError(f"output.crf={cfg.output.crf}: H.264 takes 0 (lossless) to 51")
    if cfg.checkpoint is None:
        preset(cfg.model.name)
    return device, dtype, vae_dtype


def fused_qk_rope_enabled(setting, device: torch.device) -> bool:
    """model.fused_qk_rope: true / false, or null for on wherever it can run (CUDA with Triton)."""
    if setting is not None:
        return bool(setting)
    return fused_qk_rope_supported(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def generate(cfg: DictConfig, out_dir: str | Path):
    """Run one request end to end; every input check happens before any weights are read.

    Under torchrun (`parallel=cfg|ulysses|cfg_ulysses`) every rank calls this with the same config and
    out_dir: torch.distributed is started here and torn down at the end; only global rank 0 decodes and
    writes outputs (the other ranks return a state without frames or outputs).
    """
    t_start = time.perf_counter()
    request = build_request(cfg)
    device, dtype, vae_dtype = check_settings(cfg)
    par = init_parallel(cfg.parallel, device.type)
    try:
        state = _generate(cfg, Path(out_dir), request, par.device if par else device, dtype, vae_dtype, par,
                          t_start)
    except BaseException:
        RESIDENT.drop()  # a failed job may leave them half-way (e.g. text weights mid-stream): never reuse
        teardown(par, barrier=False)  # another rank may be stuck in a collective: don't wait for it
        raise
    teardown(par)
    return state


def _generate(cfg, out_dir: Path, request, device, dtype, vae_dtype, par, t_start: float):
    from cosmos3_compiled.stages.decode import Decode
    from cosmos3_compiled.stages.denoise import Denoise
    from cosmos3_compiled.stages.latents import Latents
    from cosmos3_compiled.stages.postprocess import Postprocess
    from cosmos3_compiled.stages.save import Save, write_metrics
    from cosmos3_compiled.stages.state import Components, State
    from cosmos3_compiled.stages.text_pass import TextPass
    from cosmos3_compiled.stages.timesteps import Timesteps
    from cosmos3_compiled.stages.tokenize import Tokenize

    writer = par is None or par.is_writer
    if writer:
        check_output_dir(out_dir)
    if cfg.checkpoint is not None:
        check_checkpoint_folder(str(cfg.checkpoint)).check_vae(48)
    sched_raw = scheduler_config(cfg)
    FlowUniPCScheduler.from_config(sched_raw)  # validates before the heavy load
    set_progress_enabled(cfg.output.progress)

    metrics: dict = {"config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "seconds": {}}
    counters_at_start = compile_counters()
    if device.type == "cuda":  # what an earlier job left allocated (its resident models): steady across a sweep
        metrics["memory_gib_at_start"] = torch.cuda.memory_allocated(device) / 2**30
    t0 = time.perf_counter()
    key = resident_key(cfg, request) if cfg.keep_loaded and par is None else None
    models = RESIDENT.take(key)
    metrics["models"] = "reused" if models is not None else "loaded"
    if models is None:
        models = RESIDENT.hold(key, _load_models(cfg, request, device, dtype, vae_dtype, par))
    _sync(device)
    metrics["seconds"]["load"] = time.perf_counter() - t0
    transformer, vae = models.transformer, models.vae
    scheduler = FlowUniPCScheduler.from_config(sched_raw)
    components = Components(transformer, vae, scheduler, models.tokenizer, device, dtype, models.source, parallel=par,
                            served=models.served)
    row_decode = models.row_decode
    if par is not None:
        metrics["parallel"] = par.describe()
    # video.mp4 is encoded while the VAE decodes (Save's stream, fed by Decode, read by Postprocess)
    save = Save(components, out_dir, frames=_value(cfg.output.frames), video=cfg.output.video, crf=cfg.output.crf,
                preset=_value(cfg.output.preset), num_frames=request.num_frames)
    stream = save.stream if writer else None
    stages = [
        ("tokenize", Tokenize(components)),
        ("text_pass", TextPass(components)),  # with compile.offload_text_tower the loader already placed
        # the text weights on the host; model.text_pass streams them in layer by layer
        ("latents", Latents(components)),
        ("timesteps", Timesteps(components)),
        ("denoise", Denoise(components, mode=cfg.compile.mode, warmup_steps=cfg.compile.warmup_steps,
                            batch_cfg=cfg.model.batch_cfg)),
        ("decode", Decode(components, stream=stream)),
        ("postprocess", Postprocess(components, keep_float=_value(cfg.output.frames) == "float32",
                                    stream=stream)),
        ("save", save),
    ]
    if not writer:  # only global rank 0 writes (and decodes, unless the decode is split by rows)
        skip = ("postprocess", "save") if row_decode else ("decode", "postprocess", "save")
        stages = [(name, stage) for name, stage in stages if name not in skip]
    state = State(request=request, metrics=metrics)
    metrics["source"] = models.source
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for name, stage in stages:
            t0 = time.perf_counter()
            state = stage(state)
            _sync(device)
            metrics["seconds"][name] = time.perf_counter() - t0
    except BaseException:
        if stream is not None:  # an error between or inside stages: stop the encoder, delete its file
            stream.abort()
        raise
    metrics["seconds"]["total"] = time.perf_counter() - t_start
    counted = {k: v - counters_at_start[k] for k, v in compile_counters().items()}  # this job's share
    cache = models.cache
    metrics["compile"] = {**counted, "recompiles": metrics.get("steps", {}).get("recompiles_after_warmup", 0),
                          "mode": cfg.compile.mode, "scope": cfg.compile.scope, "warm_cache": bool(cache and cache.loaded)}
    if cache is not None and counted["unique_graphs"]:  # only when this job compiled something new
        cache.save()
    if device.type == "cuda":
        metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if writer:
        state.outputs["metrics"] = write_metrics(state, out_dir)
    components.transformer = components.vae = None
    if key is None:  # keep_loaded=false, or under torchrun
        RESIDENT.drop()
    return state


@dataclass
class Models:
    """What a job loads and prepares once, and a later job with the same settings may reuse (see `Resident`)."""

    transformer: object  # model.Cosmos3Transformer, backends set and compiled per the config
    vae: object  # vae.WanVAE
    tokenizer: object  # prompting.PromptTokenizer
    source: str
    cache: CompileCache | None
    row_decode: bool
    served: ServedBuckets  # request shapes compiled so far
    device: torch.device


def _load_models(cfg, request, device, dtype, vae_dtype, par) -> Models:
    if cfg.checkpoint is None:
        transformer, vae, _, tokenizer = build_embedded(cfg.model.name, cfg.model.init_seed, device, dtype, vae_dtype,
                                                        offload_text_tower=cfg.compile.offload_text_tower)
        source = f"embedded:{cfg.model.name}"
    else:
        transformer, vae, _, tokenizer = load_checkpoint(
            str(cfg.checkpoint), device, dtype, vae_dtype, with_encoder=request.image_to_video,
            offload_text_tower=cfg.compile.offload_text_tower,
        )
        source = str(Path(str(cfg.checkpoint)).resolve())
    transformer.set_attention_backend(cfg.model.attention_backend, gqa=_value(cfg.model.gqa))
    transformer.set_fused_qk_rope(fused_qk_rope_enabled(cfg.model.fused_qk_rope, device))
    if cfg.compile.pin_text_tower:
        t0 = time.perf_counter()
        transformer.offload_text_tower(pin=True)
        log.info("text-tower weights page-locked in %.1f s", time.perf_counter() - t0)
    if par is not None:
        apply_sequence_parallel(transformer, par.ulysses)
    cache = setup_compile_cache(cfg.compile.cache_dir)
    settings = CompileSettings(
        mode=cfg.compile.mode, scope=cfg.compile.scope, fullgraph=cfg.compile.fullgraph, dynamic=cfg.compile.dynamic,
        recompile_limit=cfg.compile.recompile_limit, inductor=dict(cfg.compile.inductor),
    )
    apply_compile(transformer, settings)
    vae.tiles = cfg.model.vae_tiles
    apply_compile_vae(vae, cfg.compile.vae)
    row_decode = par is not None and cfg.parallel.vae_rows and apply_row_parallel_decode(vae, par) is not None
    apply_compile_text(transformer, cfg.compile.text_pass)
    served = ServedBuckets(settings.recompile_limit)
    return Models(transformer, vae, tokenizer, source, cache, row_decode, served, device)


def resident_key(cfg: DictConfig, request) -> str:
    """Everything that decides what `_load_models` builds; the request itself (prompt, seed, size, steps,
    guidance) and the outputs are not part of it."""
    model = {k: v for k, v in OmegaConf.to_container(cfg.model, resolve=True, enum_to_str=True).items()
             if k not in ("height", "width", "num_frames")}  # request defaults only
    checkpoint = None if cfg.checkpoint is None else str(Path(str(cfg.checkpoint)).resolve())
    compile_cfg = OmegaConf.to_container(cfg.compile, resolve=True, enum_to_str=True)
    compile_cfg.pop("warmup_steps")  # read by the denoise stage per job
    return json.dumps({
        "checkpoint": checkpoint, "model": model, "device": _value(cfg.device), "dtype": _value(cfg.dtype),
        "compile": compile_cfg, "image_encoder": checkpoint is not None and request.image_to_video,
    }, sort_keys=True)


class ServedBuckets:
    """Request shapes whose compiled graphs the resident models hold. Each text length (per latent size) is one
    more graph of the video step and each latent size one more of the VAE units, and dynamo stops compiling
    (falls back to eager) past compile.recompile_limit graphs per function; so before a request would cross
    that, the compiled code is reset and compiles afresh (from the on-disk caches where they are warm)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.text: set = set()  # (latent shape, text length)
        self.latent: set = set()  # latent shape

    def add(self, latent_shape: tuple, text_lens: list[int]) -> bool:
        """Record one request's shapes; True when the compiled graphs had to be reset first."""
        text = {(tuple(latent_shape), n) for n in text_lens}
        reset = len(self.text | text) > self.limit or len(self.latent | {tuple(latent_shape)}) > self.limit
        if reset:
            torch.compiler.reset()
            self.text.clear()
            self.latent.clear()
        self.text |= text
        self.latent.add(tuple(latent_shape))
        return reset


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
    import gc

    models.transformer = models.vae = None
    torch.compiler.reset()
    gc.collect()
    if models.device.type == "cuda":
        torch.cuda.empty_cache()


__all__ = ["generate", "build_request", "USER_ERRORS", "RequestError"]
