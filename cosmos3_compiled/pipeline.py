"""Run one request end to end: request → (resident) models → stages → outputs.

The one place where stages are assembled. What a rank runs follows from what it does: every rank denoises;
a rank that decodes (global rank 0, or every rank when the decode is split by rows) decodes; the rank that
writes postprocesses and saves.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from .compile import DecodeWarmup
from .distributed import Parallel, init_parallel, is_writer, teardown
from .errors import RequestError
from .frame_sink import FrameSink, write_metrics
from .progress import set_progress_enabled
from .request import Job, prepare, value
from .resident import RESIDENT, Models, add_audio, add_encoder, load_models, resident_key
from .stages.decode import Decode
from .stages.decode_sound import DecodeSound
from .stages.denoise import Denoise
from .stages.latents import Latents
from .stages.postprocess import Postprocess
from .stages.save import Save
from .stages.state import State
from .stages.text_pass import TextPass
from .stages.timesteps import Timesteps
from .stages.tokenize import Tokenize

log = logging.getLogger(__name__)


def generate(cfg: DictConfig, out_dir: str | Path) -> State:
    """Run one request; every input check happens before any weights are read (`request.prepare`).

    Under torchrun (`parallel=cfg|ulysses|cfg_ulysses`) every rank calls this with the same config and
    out_dir: torch.distributed is started here and torn down at the end; only global rank 0 writes outputs
    (the other ranks return a state without frames or outputs).
    """
    t_start = time.perf_counter()
    job = prepare(cfg, out_dir, writes=is_writer())
    par = init_parallel(job.cfg.parallel, job.settings.device.type)
    try:
        state = _generate(job.cfg, job, par, t_start)
    except BaseException:
        RESIDENT.drop()  # a failed job may leave them half-way (e.g. text weights mid-stream): never reuse
        teardown(par, barrier=False)  # another rank may be stuck in a collective: don't wait for it
        raise
    teardown(par)
    return state


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_stages(cfg: DictConfig, job: Job, models: Models, par: Parallel | None, sink: FrameSink | None):
    """(name, stage) in order for this rank."""
    request, device = job.request, models.device
    transformer, vae = models.transformer, models.vae
    split_cfg = par is not None and par.cfg_size == 2
    whole_sequence = par is None or par.ulysses is None
    writes = par is None or par.is_writer
    text_pass = TextPass(transformer, only_branch=par.cfg_rank if split_cfg else None, precision=job.precision)
    t, h, w = request.latent_shape  # compile.vae_warmup: request.prepare allows it on one process only
    warmup = DecodeWarmup(vae, (1, vae.cfg.z_dim, t, h, w)) if cfg.compile.vae_warmup else None
    stages = [
        ("tokenize", Tokenize(models.tokenizer)),
        ("text_pass", text_pass),
        ("latents", Latents(vae, transformer.cfg.latent_channel, device, sound_channels=transformer.cfg.sound_dim)),
        ("timesteps", Timesteps(job.scheduler, device)),
        ("denoise", Denoise(transformer, models.plan, warmup_steps=cfg.compile.warmup_steps,
                            cfg_gather=par.gather_cfg if split_cfg else None,
                            batch_cfg=cfg.model.batch_cfg and not split_cfg and whole_sequence,
                            precision=job.precision, refill_text=text_pass.fill, decode_warmup=warmup)),
    ]
    if writes and request.sound_len:  # before the VAE: the frame sink muxes the waveform into video.mp4
        stages.append(("decode_sound", DecodeSound(models.audio)))
    if writes or models.row_decode:
        stages.append(("decode", Decode(vae, sink)))
    if writes:
        frames = value(cfg.output.frames)
        stages += [
            ("postprocess", Postprocess(keep_float=frames == "float32", sink=sink)),
            ("save", Save(job.out_dir, frames=frames, image=cfg.output.video and request.num_frames == 1, sink=sink)),
        ]
    return stages


def _generate(cfg: DictConfig, job: Job, par: Parallel | None, t_start: float) -> State:
    """`cfg`: the job's resolved config (`job.cfg`)."""
    device = par.device if par is not None else job.settings.device
    writes = par is None or par.is_writer
    set_progress_enabled(cfg.output.progress)
    metrics: dict = {"config": OmegaConf.to_container(cfg, resolve=True, enum_to_str=True), "auto": job.auto,
                     "seconds": {}}
    if device.type == "cuda":  # what an earlier job left allocated (its resident models): steady across a sweep
        metrics["memory_gib_at_start"] = torch.cuda.memory_allocated(device) / 2**30
    t0 = time.perf_counter()
    key = resident_key(cfg, job) if cfg.keep_loaded and par is None else None
    models = RESIDENT.take(key)
    metrics["models"] = "reused" if models is not None else "loaded"
    if models is not None:
        add_encoder(models, job)
        add_audio(models, job)
    if models is None:
        models = RESIDENT.hold(key, load_models(cfg, job, device, par))
    _sync(device)
    metrics["seconds"]["load"] = time.perf_counter() - t0
    metrics["source"] = models.source
    if models.load_stats and metrics["models"] == "loaded":
        metrics["transformer_read"] = models.load_stats
    if par is not None:
        metrics["parallel"] = par.describe()
    models.plan.start_job()
    # video.mp4 is encoded while the VAE decodes: the sink is fed by Decode, read by Postprocess, closed by Save
    sink = None
    if writes and cfg.output.video and job.request.num_frames > 1:
        sink = FrameSink(job.out_dir, crf=cfg.output.crf, preset=value(cfg.output.preset))
    state = State(request=job.request, metrics=metrics)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        for name, stage in build_stages(cfg, job, models, par, sink):
            t0 = time.perf_counter()
            state = stage(state)
            _sync(device)
            metrics["seconds"][name] = time.perf_counter() - t0
    except BaseException:
        if sink is not None:  # an error between or inside stages: stop the encoder, delete its file
            sink.abort()
        raise
    metrics["seconds"]["total"] = time.perf_counter() - t_start
    recompiles = metrics.get("steps", {}).get("recompiles_after_warmup", 0)
    metrics["compile"] = models.plan.finish_job(recompiles, save_cache=writes)
    if device.type == "cuda":
        metrics["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if writes:
        state.outputs["metrics"] = write_metrics(metrics, job.out_dir)
    del models
    if key is None:  # keep_loaded=false, or under torchrun
        RESIDENT.drop()
    return state


__all__ = ["generate", "build_stages", "RequestError"]
