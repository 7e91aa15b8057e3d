"""Defaults that follow the checkpoint and the machine (`cosmos3_compiled.defaults`), through the Compose API and
`request.prepare`: what `auto` resolves to with and without a checkpoint, that explicit overrides win, and that
each choice is recorded with its reason."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from cosmos3_compiled import defaults
from cosmos3_compiled.audio import AudioConfig
from cosmos3_compiled.components import read_checkpoint, write_checkpoint
from cosmos3_compiled.config import preset
from cosmos3_compiled.errors import RequestError
from cosmos3_compiled.pipeline import generate
from cosmos3_compiled.request import build_request, prepare
from tests.helpers import compose_generate

GIB = 2**30


@pytest.fixture(scope="module")
def tiny_bf16(tmp_path_factory):
    """A tiny official-layout checkpoint whose transformer weights are stored in bf16 (as released ones are)."""
    folder = write_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", name="debug")
    weights = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in load_file(weights).items()},
              str(weights), metadata={"format": "pt"})
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "default_use_system_prompt": False}))
    return folder


def _job(tmp_path, *overrides):
    return prepare(compose_generate(list(overrides)), tmp_path / "out")


def test_embedded_default_stays_tiny_on_the_cpu(tmp_path):
    job = _job(tmp_path)
    cfg, r = job.cfg, job.request
    assert (r.height, r.width, r.num_frames, r.guidance_scale, r.num_inference_steps) == (128, 128, 9, 6.0, 35)
    assert (cfg.device.value, cfg.dtype.value, cfg.compile.mode.value, cfg.compile.vae.value) == (
        "cpu", "float32", "eager", "eager")
    assert job.settings.attention_backend == "sdpa" and job.settings.vae_tiles == 1
    assert cfg.compile.offload_text_tower is False and cfg.compile.cache_dir is None and r.use_system_prompt
    for key in ("height", "device", "dtype", "compile.mode", "compile.vae", "model.attention_backend",
                "compile.offload_text_tower", "model.vae_tiles", "compile.cache_dir", "sampler.use_system_prompt",
                "compile.vae_warmup"):
        assert key in job.auto and ": " in job.auto[key], key
    assert job.auto["device"].startswith("cpu: the embedded default")
    assert cfg.compile.vae_warmup is False and job.auto["compile.vae_warmup"] == "False: on the CPU"


def test_a_checkpoint_gets_the_reference_request(tmp_path, tiny_bf16):
    job = _job(tmp_path, f"checkpoint={tiny_bf16}")
    r = job.request
    assert (r.height, r.width, r.num_frames, r.fps, r.num_inference_steps, r.guidance_scale) == (
        720, 1280, 189, 24.0, 35, 6.0)
    assert r.use_system_prompt is False and "model_index.json" in job.auto["sampler.use_system_prompt"]
    assert job.cfg.device.value == "cpu" and job.auto["device"] == "cpu: no CUDA device"
    assert job.cfg.dtype.value == "float32"  # on the CPU, whatever the checkpoint holds


def test_explicit_overrides_win(tmp_path, tiny_bf16):
    job = _job(tmp_path, f"checkpoint={tiny_bf16}", "height=64", "width=96", "num_frames=5", "device=cpu",
               "dtype=bfloat16", "compile=default", "compile.vae=eager", "model.vae_tiles=2",
               "sampler.use_system_prompt=true", "compile.cache_dir=null")
    r, cfg = job.request, job.cfg
    assert (r.height, r.width, r.num_frames, r.use_system_prompt) == (64, 96, 5, True)
    assert (cfg.dtype.value, cfg.compile.mode.value, cfg.compile.vae.value, job.settings.vae_tiles) == (
        "bfloat16", "default", "eager", 2)
    assert cfg.compile.cache_dir is None
    assert not {"height", "device", "dtype", "compile.mode", "model.vae_tiles", "compile.cache_dir"} & set(job.auto)


def test_compiling_uses_the_persistent_cache_by_default(tmp_path, monkeypatch):
    monkeypatch.delenv(defaults.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert _job(tmp_path, "compile=default").cfg.compile.cache_dir == str(tmp_path / "xdg" / "cosmos3_compiled")
    monkeypatch.setenv(defaults.CACHE_ENV, str(tmp_path / "mine"))
    assert _job(tmp_path, "compile=default").cfg.compile.cache_dir == str(tmp_path / "mine")
    assert _job(tmp_path, "compile=eager").cfg.compile.cache_dir is None  # nothing compiles


@pytest.fixture
def fake_gpu(monkeypatch):
    """This machine seen as one with a CUDA device of `fake_gpu.free` bytes free, without touching CUDA."""
    class Gpu:
        free = 80 * GIB
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(defaults, "_free_cuda_bytes", lambda device: Gpu.free)
    monkeypatch.setattr(defaults, "fa4_usable", lambda device, dtype: "needs the flash-attn-4 package")
    return Gpu


def _resolve(cfg_overrides, checkpoint=None):
    cfg, _ = defaults.request_defaults(compose_generate(cfg_overrides))
    spec = read_checkpoint(checkpoint) if checkpoint else None
    model = spec.transformer if spec else preset(cfg.model.name)
    return defaults.machine_defaults(cfg, spec, build_request(cfg), model)


def test_on_cuda_a_checkpoint_takes_the_fast_path(fake_gpu, tiny_bf16):
    cfg, auto = _resolve([f"checkpoint={tiny_bf16}"], tiny_bf16)
    assert (cfg.device.value, cfg.dtype.value, cfg.compile.mode.value, cfg.compile.vae.value) == (
        "cuda", "bfloat16", "cudagraph", "default")
    assert cfg.model.attention_backend == "cudnn" and "flash-attn-4" in auto["model.attention_backend"]
    assert cfg.compile.offload_text_tower is False and cfg.model.vae_tiles == 1
    assert "the checkpoint's weights (bfloat16)" in auto["dtype"]
    assert cfg.compile.vae_warmup is True and "background thread" in auto["compile.vae_warmup"]


@pytest.mark.parametrize("overrides,why", [
    (["compile=default"], "compile.mode=default"), (["compile.vae=eager"], "compile.vae=eager"),
    (["parallel.cfg=true"], "several processes"), (["compile.vae_warmup=false"], None),
])
def test_the_decode_warms_up_during_the_loop_only_where_it_can(fake_gpu, tiny_bf16, overrides, why):
    cfg, auto = _resolve([f"checkpoint={tiny_bf16}", *overrides], tiny_bf16)
    assert cfg.compile.vae_warmup is False
    assert (why is None and "compile.vae_warmup" not in auto) or auto["compile.vae_warmup"] == f"False: {why}"


def test_on_cuda_the_embedded_default_stays_on_the_cpu(fake_gpu):
    cfg, auto = _resolve([])
    assert cfg.device.value == "cpu" and cfg.compile.mode.value == "eager"


def test_nano_offloads_the_text_tower_and_strips_the_decode_only_when_short_of_memory(fake_gpu):
    video_w, text_w = defaults.parameter_bytes(preset("nano"), torch.bfloat16)
    assert 10 * GIB < video_w + text_w < 40 * GIB  # Nano: about 15 B parameters
    cfg, auto = _resolve(["model=nano", "num_frames=189"])
    assert cfg.compile.offload_text_tower is False and cfg.model.vae_tiles == 1, auto
    fake_gpu.free = video_w + text_w + 6 * GIB  # weights fit, the request's buffers do not beside them
    cfg, auto = _resolve(["model=nano", "num_frames=189"])
    assert cfg.compile.offload_text_tower is True and cfg.compile.pin_text_tower is True
    assert "> 90%" in auto["compile.offload_text_tower"]
    assert cfg.model.vae_tiles > 1, auto["model.vae_tiles"]


def test_with_sound_the_budget_counts_the_audio_decoder(fake_gpu, tiny_bf16, monkeypatch):
    """Joint sound keeps the audio decoder (and its decode) on the GPU beside the model: a card with room for the
    request without it, but not with it, offloads the text tower only when sound is on."""
    monkeypatch.setattr(defaults, "check_fit", lambda *args: None)  # a tiny model: offloading frees next to nothing
    cfg, _ = defaults.request_defaults(compose_generate([f"checkpoint={tiny_bf16}"]))
    spec = dataclasses.replace(read_checkpoint(tiny_bf16), sound=AudioConfig())  # the released decoder's shape
    silent = build_request(cfg)
    loud = dataclasses.replace(silent, sound_len=AudioConfig().latent_len(silent.num_frames, silent.fps))
    weights = sum(defaults.parameter_bytes(spec.transformer, torch.bfloat16))
    need = weights + defaults.request_bytes(spec.transformer, silent, torch.bfloat16)
    audio = defaults.audio_bytes(spec.sound, loud.sound_len, torch.bfloat16)
    assert audio > 2**30  # the released decoder: about 0.5 B parameters
    fake_gpu.free = (need + audio / 2) / 0.9
    for request, offload in ((silent, False), (loud, True)):
        out, auto = defaults.machine_defaults(cfg, spec, request, spec.transformer)
        assert out.compile.offload_text_tower is offload, auto["compile.offload_text_tower"]


def test_the_memory_budget_counts_what_this_process_already_holds(monkeypatch):
    # a sweep's job 1 runs beside job 0's resident models: their memory is ours, not used by someone else
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (3 * GIB, 80 * GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: 70 * GIB)
    assert defaults._free_cuda_bytes(torch.device("cuda", 0)) == 73 * GIB


def test_metrics_record_what_auto_chose(tmp_path):
    state = generate(compose_generate(["height=32", "width=32", "num_frames=1", "sampler.num_inference_steps=1",
                                       "output.video=false", "output.progress=false"]), tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["auto"]["device"].startswith("cpu:") and metrics["config"]["device"] == "cpu"
    assert "height" not in metrics["auto"] and state.request.height == 32


def test_metrics_record_the_weights_read(tmp_path, tiny_bf16):
    generate(compose_generate([f"checkpoint={tiny_bf16}", "height=32", "width=32", "num_frames=1",
                               "sampler.num_inference_steps=1", "output.video=false", "output.progress=false"]),
             tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    read = metrics["transformer_read"]
    assert read["bytes"] > 0 and read["seconds"] > 0 and read["gb_per_s"] > 0
    assert metrics["auto"]["sampler.use_system_prompt"].startswith("False")


def test_a_job_that_cannot_fit_is_refused_before_the_load(fake_gpu):
    """Super's 58 GiB of video-tower weights and a 720p × 189 request's buffers on an 80 GB card: one line before any
    weights are read (an H100 ran out of memory in the first step, after the load and the compile), naming what to
    try; the same request at 81 frames fits and is not refused."""
    fake_gpu.free = 78.6 * GIB
    with pytest.raises(RequestError, match=r"^this job does not fit on cuda:0: video-tower weights 58\.\d GiB") as info:
        _resolve(["model=super", "num_frames=189", "sampler.guidance_scale=1.0", "compile.offload_text_tower=true"])
    assert "parallel.shard=fsdp" in str(info.value) and "offload_text_tower" not in str(info.value)
    with pytest.raises(RequestError, match=r"weights \(both towers\).*try compile.offload_text_tower=true"):
        _resolve(["model=super", "num_frames=81", "compile.offload_text_tower=false"])
    cfg, _ = _resolve(["model=super", "num_frames=81", "sampler.guidance_scale=1.0"])
    assert cfg.compile.offload_text_tower is True
