"""`auto` and unset settings, resolved once per job from the checkpoint, the embedded preset and this machine.

Three passes, all before any weights are read:

- `request_defaults(cfg)`: the request size. With `checkpoint=` it is the reference's default video
  (`Cosmos3OmniPipeline.__call__`: 1280×720, 189 frames); without one, the `model=` preset's size.
- `sampler_defaults(cfg, fixed_steps)`: steps and guidance, once the scheduler is known. A distilled checkpoint's
  fixed schedule sets them (its length, guidance 1: the guidance is in its weights, as diffusers' distilled
  modular blocks resolve them); otherwise the reference's 35 steps and 6.0.
- `machine_defaults(cfg, checkpoint, request)`: device, dtype, compile modes, attention backend, text-tower
  offload, VAE strips, the compile cache, the system prompt. The embedded default (`model=debug*`, no checkpoint)
  stays on the CPU in float32, eager; everything else follows the machine.

Both return the config with every choice written in (explicit overrides are never touched) and a `{key: reason}`
line for each choice made, which metrics.json records under `auto`.
"""

from __future__ import annotations

import copy
import math
import os
from collections import Counter
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import offload
from .attention import check_backend
from .audio import AudioConfig, AudioDecoder
from .checkpoint_io import read_header, weight_files
from .config import TransformerConfig
from .distributed import is_parallel
from .errors import RequestError
from .fp8 import read_quantization_config
from .model import Cosmos3Transformer

# The reference's request defaults when a checkpoint is given (diffusers 0.42.1 Cosmos3OmniPipeline.__call__).
REFERENCE_SIZE = {"height": 720, "width": 1280, "num_frames": 189}
# Its sampler defaults (the same call; UniPC), for every checkpoint without a fixed schedule and the embedded one.
REFERENCE_SAMPLER = {"num_inference_steps": 35, "guidance_scale": 6.0}
CACHE_ENV = "COSMOS3_COMPILED_CACHE_DIR"  # overrides the default compile-cache folder; "" disables it
_COMPUTE_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "bfloat16", torch.float32: "float32",
                   torch.float8_e4m3fn: "bfloat16"}  # a checkpoint's weight dtype → the compute dtype it runs in
_GIB = 2**30
FULL_VAE_DECODER_DIM = 256  # the released Wan2.2 VAE's decoder width (random-weight presets use it too)


def _editable(cfg: DictConfig) -> DictConfig:
    out = copy.deepcopy(cfg)
    OmegaConf.set_readonly(out, False)
    return out


def _value(x):
    return x.value if hasattr(x, "value") else x


def request_defaults(cfg: DictConfig) -> tuple[DictConfig, dict[str, str]]:
    """height / width / num_frames left unset: the reference's video with a checkpoint, else the preset's size."""
    cfg, chosen = _editable(cfg), {}
    for key in REFERENCE_SIZE:
        if cfg[key] is not None:
            continue
        if cfg.checkpoint is not None:
            cfg[key] = REFERENCE_SIZE[key]
            chosen[key] = f"{cfg[key]}: the reference's default video (a checkpoint is given)"
        else:
            cfg[key] = int(cfg.model[key])
            chosen[key] = f"{cfg[key]}: model={cfg.model.name} preset's request size (no checkpoint)"
    return cfg, chosen


def sampler_defaults(cfg: DictConfig, fixed_steps: int | None) -> tuple[DictConfig, dict[str, str]]:
    """sampler.num_inference_steps / guidance_scale left unset. `fixed_steps`: the length of the scheduler's fixed
    schedule (a distilled checkpoint), None when it takes any step count."""
    cfg, chosen = _editable(cfg), {}
    if fixed_steps is None:
        picks = {key: (value, "the reference's default") for key, value in REFERENCE_SAMPLER.items()}
    else:
        picks = {"num_inference_steps": (fixed_steps, "the length of the checkpoint's fixed (distilled) schedule"),
                 "guidance_scale": (1.0, "a distilled checkpoint: the guidance is in its weights")}
    for key, (value, why) in picks.items():
        if cfg.sampler[key] is None:
            cfg.sampler[key] = value
            chosen[f"sampler.{key}"] = f"{value}: {why}"
    return cfg, chosen


def embedded_tiny(cfg: DictConfig) -> bool:
    """The embedded default: no checkpoint and a debug preset. It stays CPU-friendly whatever the machine."""
    return cfg.checkpoint is None and str(cfg.model.name).startswith("debug")


def checkpoint_dtype(folder: Path) -> str | None:
    """The floating dtype holding most of the transformer's weights, read from the safetensors headers only
    ("bfloat16" for FP8 weights: their compute dtype)."""
    counts: Counter = Counter()
    for entry in read_header(weight_files(folder / "transformer")[:1]).values():
        counts[entry.dtype] += math.prod(entry.shape)
    for dtype, _ in counts.most_common():
        if dtype in _COMPUTE_DTYPES:
            return _COMPUTE_DTYPES[dtype]
    return None


def parameter_bytes(model_cfg: TransformerConfig, dtype: torch.dtype) -> tuple[int, int]:
    """(video-tower bytes, text-only bytes) of the transformer in `dtype`, counted on the meta device."""
    with torch.device("meta"):
        model = Cosmos3Transformer(model_cfg)
    size = torch.empty((), dtype=dtype).element_size()
    text = sum(p.numel() for n, p in model.named_parameters() if offload.is_text_param(n)) * size
    total = sum(p.numel() for p in model.parameters()) * size
    return total - text, text


def request_bytes(model_cfg: TransformerConfig, request, dtype: torch.dtype) -> int:
    """An upper estimate of what a request allocates beside the weights during the denoise loop: every layer's
    K/V buffers for each CFG branch, one layer's activations (attention and MLP), the latents and their history.
    Text tokens are counted generously (the prompt template plus a long prompt)."""
    size = torch.empty((), dtype=dtype).element_size()
    t, h, w = request.latent_shape
    p = model_cfg.latent_patch_size
    tokens = t * math.ceil(h / p) * math.ceil(w / p) + 1024
    branches = 2 if request.use_cfg else 1
    kv = branches * 2 * model_cfg.num_hidden_layers * tokens * model_cfg.num_key_value_heads * model_cfg.head_dim
    layer = tokens * (8 * model_cfg.hidden_size + 3 * model_cfg.intermediate_size)
    latents = 8 * t * h * w * model_cfg.latent_channel * 4
    return (kv + layer) * size + latents


def decode_bytes(decoder_dim: int, request, dtype: torch.dtype, tiles: int = 1) -> int:
    """An upper estimate of the VAE decode's peak: the output frames (float32) plus a few full-resolution feature
    maps of the decoder's widest stage over one causal chunk of frames, divided over `tiles` column strips."""
    size = torch.empty((), dtype=dtype).element_size()
    frames = request.num_frames * 3 * request.height * request.width * 4
    chunk = 6 * 4 * request.height * request.width * decoder_dim * size
    return frames + math.ceil(chunk / tiles)


def audio_bytes(cfg: AudioConfig, sound_len: int, dtype: torch.dtype) -> int:
    """An upper estimate of what joint sound holds on the GPU: the audio decoder's weights (counted on the meta
    device) plus, for its decode, a few feature maps of its widest stage over `sound_len` latent frames."""
    with torch.device("meta"):
        decoder = AudioDecoder(cfg)
    size = torch.empty((), dtype=dtype).element_size()
    weights = sum(p.numel() for p in decoder.parameters()) * size
    samples, widest = sound_len, 0  # the blocks upsample as they narrow: the largest map is channels × samples
    mults, ups = (1, *cfg.channel_mults), tuple(reversed(cfg.strides))
    for i, stride in enumerate(ups):
        samples *= stride
        widest = max(widest, cfg.channels * mults[len(ups) - i - 1] * samples)
    return weights + 4 * widest * size


def _quantized(checkpoint) -> bool:
    """An FP8 (ModelOpt) checkpoint: `parameter_bytes`, counted in the activation dtype, would count its weights
    twice over, so the fit check leaves it alone."""
    return checkpoint is not None and read_quantization_config(checkpoint.folder / "transformer") is not None


def check_fit(cfg: DictConfig, budget: tuple[int, int, int, int], device: torch.device) -> None:
    """Refuse in one line, before any weights are read, a job whose resident weights plus the request's buffers
    (`request_bytes`, an upper estimate) exceed what this process can have on the GPU: it would only fail with an
    out-of-memory error minutes later, after the load and the compile."""
    video_w, text_w, req, free = budget
    offloaded = bool(cfg.compile.offload_text_tower)
    held = video_w + (0 if offloaded else text_w)
    if held + req <= free:
        return
    what = "video-tower weights" if offloaded else "weights (both towers)"
    tips = ([] if offloaded else ["compile.offload_text_tower=true"]) + [
        "a smaller request (height, width, num_frames)", "a GPU with more memory",
        "the weights sharded over GPUs (torchrun --nproc-per-node N ... parallel.shard=fsdp)"]
    raise RequestError(f"this job does not fit on {device}: {what} {held / _GIB:.1f} GiB + the request's buffers "
                       f"≈{req / _GIB:.1f} GiB > {free / _GIB:.1f} GiB free; try " + ", ".join(tips))


def _free_cuda_bytes(device: torch.device) -> int:
    """Bytes this process can have on `device`: what the driver reports free plus what this process's caching
    allocator already holds (the models a sweep keeps resident, their graphs, cached blocks). The budget is the
    same for every job of a sweep: job 1 must not see job 0's resident weights as used and switch offload or
    VAE strips on (a different resident key, a reload and a much slower decode)."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device)


def default_cache_dir() -> str | None:
    """`$COSMOS3_COMPILED_CACHE_DIR` ("" disables), else `$XDG_CACHE_HOME/cosmos3_compiled`, else
    `~/.cache/cosmos3_compiled`."""
    if CACHE_ENV in os.environ:
        return os.environ[CACHE_ENV] or None
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "cosmos3_compiled")


def fa4_usable(device: torch.device, dtype: torch.dtype) -> str | None:
    """None when FlashAttention-4 can run here, else why not (one phrase)."""
    try:
        check_backend("fa4", device, dtype)
    except RequestError as err:
        return str(err).split(";")[0].replace("model.attention_backend=fa4 ", "")
    return None


def machine_defaults(cfg: DictConfig, checkpoint, request, model_cfg: TransformerConfig
                     ) -> tuple[DictConfig, dict[str, str]]:
    """Resolve every `auto` / unset machine setting; `checkpoint`: the `CheckpointSpec` or None."""
    cfg, chosen = _editable(cfg), {}
    tiny = embedded_tiny(cfg)

    if _value(cfg.device) == "auto":
        if tiny:
            cfg.device, why = "cpu", "the embedded default stays on the CPU (pass device=cuda to move it)"
        elif torch.cuda.is_available():
            cfg.device, why = "cuda", "a CUDA device is present"
        else:
            cfg.device, why = "cpu", "no CUDA device"
        chosen["device"] = f"{_value(cfg.device)}: {why}"
    cuda = _value(cfg.device) == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RequestError("device=cuda but no CUDA device is available; use device=cpu")
    # under torchrun each rank asks about its own GPU (LOCAL_RANK), never all of them about GPU 0
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")

    if _value(cfg.dtype) == "auto":
        if not cuda:
            cfg.dtype, why = "float32", "on the CPU"
        elif checkpoint is not None:
            found = checkpoint_dtype(checkpoint.folder)
            cfg.dtype, why = found or "bfloat16", f"the checkpoint's weights ({found or 'unknown: bf16 assumed'})"
        else:
            cfg.dtype, why = "bfloat16", "random weights on CUDA"
        chosen["dtype"] = f"{_value(cfg.dtype)}: {why}"
    dtype = getattr(torch, _value(cfg.dtype))

    if _value(cfg.compile.mode) == "auto":
        sharded = _value(cfg.parallel.shard) == "fsdp"  # FSDP's all-gathers cannot be inside our whole-step graph
        cfg.compile.mode = ("default" if sharded else "cudagraph") if cuda else "eager"
        chosen["compile.mode"] = (f"{_value(cfg.compile.mode)}: " + (
            ("per-layer graphs: parallel.shard=fsdp rules out the whole-step CUDA graph" if sharded
             else "the fastest measured mode on CUDA (docs/benchmarks/)") if cuda else "on the CPU"))
    if _value(cfg.compile.vae) == "auto":
        compiles = cuda and _value(cfg.compile.mode) != "eager"
        cfg.compile.vae = "default" if compiles else "eager"
        chosen["compile.vae"] = f"{_value(cfg.compile.vae)}: " + (
            "compiled decode on CUDA" if compiles else f"compile.mode={_value(cfg.compile.mode)} on {device.type}")

    if cfg.compile.vae_warmup is None:
        one_process = not is_parallel(cfg.parallel)
        mode, vae = _value(cfg.compile.mode), _value(cfg.compile.vae)
        # compile.vae=default only: an autotuning mode would time its kernels beside the denoise loop's
        cfg.compile.vae_warmup = cuda and mode == "cudagraph" and vae == "default" and one_process
        chosen["compile.vae_warmup"] = f"{cfg.compile.vae_warmup}: " + (
            "the compiled decode warms up on a background thread during the CUDA-graph denoise loop"
            if cfg.compile.vae_warmup else
            "on the CPU" if not cuda else f"compile.mode={mode}" if mode != "cudagraph" else
            f"compile.vae={vae}" if vae != "default" else "several processes")

    if cfg.model.attention_backend == "auto":
        if cuda and dtype in (torch.float16, torch.bfloat16):
            why_not = fa4_usable(device, dtype)
            cfg.model.attention_backend = "cudnn" if why_not else "fa4"
            chosen["model.attention_backend"] = (f"cudnn: FlashAttention-4 not usable ({why_not})" if why_not
                                                 else "fa4: flash-attn-4 installed and this GPU runs it")
        else:
            cfg.model.attention_backend = "sdpa"
            chosen["model.attention_backend"] = f"sdpa: PyTorch's own choice ({device.type}, {_value(cfg.dtype)})"

    budget = None  # (video-tower, text-tower, request, free) bytes: computed once, on CUDA
    if cuda:
        req = request_bytes(model_cfg, request, dtype)
        if request.sound_len and checkpoint is not None and checkpoint.sound is not None:
            req += audio_bytes(checkpoint.sound, request.sound_len, dtype)  # the audio decoder, in the model dtype
        budget = (*parameter_bytes(model_cfg, dtype), req, _free_cuda_bytes(device))

    if cfg.compile.offload_text_tower is None:
        if not cuda:
            cfg.compile.offload_text_tower, why = False, "on the CPU"
        else:
            video_w, text_w, req, free = budget
            need = video_w + text_w + req
            cfg.compile.offload_text_tower = need > 0.9 * free
            why = (f"weights {(video_w + text_w) / _GIB:.1f} GiB + request ≈{(need - video_w - text_w) / _GIB:.1f} "
                   f"GiB {'>' if cfg.compile.offload_text_tower else '<='} 90% of {free / _GIB:.1f} GiB free")
        chosen["compile.offload_text_tower"] = f"{cfg.compile.offload_text_tower}: {why}"
    if cfg.compile.pin_text_tower is None:
        cfg.compile.pin_text_tower = bool(cfg.compile.offload_text_tower and cuda)
        chosen["compile.pin_text_tower"] = (f"{cfg.compile.pin_text_tower}: "
                                            + ("follows the offload" if cuda else "on the CPU"))

    if cuda and not is_parallel(cfg.parallel) and not _quantized(checkpoint):
        check_fit(cfg, budget, device)

    if cfg.model.vae_tiles is None:
        tiles = 1
        if cuda:
            vae_dtype = getattr(torch, _value(cfg.model.vae_dtype)) if cfg.model.vae_dtype is not None else dtype
            dec_dim = checkpoint.vae.decoder_base_dim if checkpoint is not None else FULL_VAE_DECODER_DIM
            video_w, text_w, req, free = budget
            resident = video_w + (0 if cfg.compile.offload_text_tower else text_w) + req
            room = 0.9 * free - resident
            latent_width = request.width // 16
            while tiles < latent_width and decode_bytes(dec_dim, request, vae_dtype, tiles) > room:
                tiles *= 2
            tiles = min(tiles, latent_width)
            why = (f"decode ≈{decode_bytes(dec_dim, request, vae_dtype, tiles) / _GIB:.1f} GiB beside "
                   f"≈{resident / _GIB:.1f} GiB held")
        else:
            why = "on the CPU"
        cfg.model.vae_tiles = tiles
        chosen["model.vae_tiles"] = f"{tiles}: {why}"

    if cfg.compile.cache_dir == "auto":
        compiles = _value(cfg.compile.mode) != "eager" or _value(cfg.compile.vae) != "eager"
        cfg.compile.cache_dir = default_cache_dir() if compiles else None
        chosen["compile.cache_dir"] = (f"{cfg.compile.cache_dir}: " + (
            "the persistent compile cache (compile.cache_dir=null disables it)" if compiles else "nothing compiles"))

    if cfg.sampler.use_system_prompt is None:
        flag, why = True, "the reference's default"
        if checkpoint is not None and checkpoint.default_use_system_prompt is not None:
            flag = checkpoint.default_use_system_prompt
            why = "the checkpoint's model_index.json default_use_system_prompt"
        cfg.sampler.use_system_prompt = flag
        chosen["sampler.use_system_prompt"] = f"{flag}: {why}"
    return cfg, chosen


__all__ = ["request_defaults", "sampler_defaults", "machine_defaults", "embedded_tiny", "default_cache_dir",
           "REFERENCE_SIZE", "REFERENCE_SAMPLER",
           "parameter_bytes", "request_bytes", "decode_bytes", "checkpoint_dtype"]
