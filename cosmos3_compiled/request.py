"""The request and every check on it and on the settings, each written once, all before any weights are read.

`prepare(cfg, out_dir)` turns a composed config into a `Job`: the typed request, the resolved settings, the
checkpoint's component configs (each parsed once and handed on to the loaders) and the one scheduler. Anything
wrong raises `RequestError` with one line.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import action as action_mod
from . import attention, fp8_attention, sharding
from .audio import AAC_SAMPLE_RATES
from .components import DTYPES, CheckpointSpec, read_checkpoint
from .compile import BACKGROUND_SAFE_MODES
from .config import TransformerConfig, preset
from .defaults import REFERENCE_SIZE, machine_defaults, request_defaults, sampler_defaults
from .distributed import is_parallel
from .errors import RequestError
from .checkpoint import WEIGHTS_STEM
from .checkpoint_io import read_header, weight_files
from .fp8 import Fp8Policy, linear_group, missing_input_scales, read_quantization_config
from .hub import resolve_checkpoint
from .media import probe_clip, read_clip
from .schema import unknown_keys
from .scheduler import (COSMOS3_DISTILLED_SCHEDULER_CONFIG, COSMOS3_SCHEDULER_CONFIG, FlowMatchEulerScheduler,
                        FlowUniPCScheduler, merge_schedule_overrides)
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
    num_inference_steps: int | None  # None (unset) only until `prepare` knows the checkpoint's scheduler
    guidance_scale: float | None  # likewise (`defaults.sampler_defaults`)
    image: Path | None = None
    use_system_prompt: bool = True
    video: Path | None = None  # video-to-video: the conditioning clip (a video file or a folder of frames)
    condition_frames: tuple[int, ...] = (0, 1)  # video-to-video: latent frames kept clean
    condition_keep: str = "first"  # video-to-video: the clip's first or last frames
    add_resolution_template: bool = True
    add_duration_template: bool = True
    sound_len: int = 0  # sound=true: the sound segment's latent frames (`check_sound`); 0: no sound
    action: action_mod.ActionSpec | None = None  # an action task (`check_action`); its clip is image / video
    action_source: Path | None = None  # the action task's conditioning image or clip

    @property
    def action_len(self) -> int:
        """The action segment's tokens (0: no action task)."""
        return 0 if self.action is None else self.action.chunk_size

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.num_frames - 1) // 4 + 1, self.height // 16, self.width // 16

    @property
    def video_to_video(self) -> bool:
        return self.video is not None

    @property
    def clip_frames(self) -> int:
        """Video-to-video: the pixel frames the clean latent frames are encoded from, 4·max(condition_frames)+1
        (the causal encoder's latent frame k reads pixel frames 0..4k and no later one)."""
        return 4 * max(self.condition_frames) + 1

    @property
    def encodes(self) -> bool:
        """The VAE encoder runs: image- or video-to-video, or an action task."""
        return self.image_to_video or self.video_to_video or self.action is not None

    @property
    def use_cfg(self) -> bool:
        return self.guidance_scale != 1.0

    @property
    def image_to_video(self) -> bool:
        return self.image is not None and self.num_frames > 1

    @property
    def clean_frames(self) -> tuple[int, ...]:
        """Latent frames kept clean (not denoised): frame 0 in image-to-video, `condition_frames` in
        video-to-video (in order, once each)."""
        if self.action is not None:
            return self.action.clean_frames
        if self.video_to_video:
            return tuple(sorted(set(self.condition_frames)))
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
    scheduler: FlowUniPCScheduler | FlowMatchEulerScheduler  # chosen by the checkpoint's scheduler _class_name
    out_dir: Path
    cfg: DictConfig  # the composed config with every `auto` / unset value resolved (what the stages read)
    auto: dict  # {key: "value: why"} for each value chosen by `defaults` (metrics.json `auto`)
    precision: Fp8Policy | None = None  # an FP8 checkpoint's per-step policy (None: unquantized weights)


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


def check_video(cfg: DictConfig, num_frames: int) -> tuple[Path | None, tuple[int, ...], str]:
    """(clip, condition_frames, condition_keep) of a video-to-video request (clip None otherwise), checked as the
    reference's `check_inputs` does, plus the clip itself: readable, with at least one frame. A clip shorter than
    the frames needed is no error: its last frame repeats (the reference's padding)."""
    indexes, keep = tuple(int(i) for i in cfg.condition_frames), str(value(cfg.condition_keep))
    if cfg.video is None:
        return None, indexes, keep
    if cfg.image is not None:
        raise RequestError("video= (video-to-video) and image= (image-to-video) are two conditionings: pass one")
    if num_frames == 1:
        raise RequestError("video conditioning needs num_frames > 1 (num_frames=1 is text-to-image)")
    if not indexes:
        raise RequestError("condition_frames is empty: name at least one latent frame to keep clean, e.g. [0,1]")
    if min(indexes) < 0:
        raise RequestError(f"condition_frames={list(indexes)}: latent frame indexes must be >= 0")
    latent_t = (num_frames - 1) // 4 + 1
    if max(indexes) >= latent_t:
        raise RequestError(f"condition_frames={list(indexes)}: index {max(indexes)} is past the last latent frame "
                           f"({latent_t} latent frames for num_frames={num_frames}: indexes 0 to {latent_t - 1})")
    clip = Path(str(cfg.video)).expanduser()
    try:
        probe_clip(clip, 4 * max(indexes) + 1, keep)
    except ValueError as err:
        raise RequestError(str(err)) from None
    return clip, indexes, keep


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
    steps, guidance = cfg.sampler.num_inference_steps, cfg.sampler.guidance_scale  # None: `sampler_defaults`
    if steps is not None and steps < 1:
        raise RequestError(f"sampler.num_inference_steps must be >= 1, got {steps}")
    video, indexes, keep = check_video(cfg, f)
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
        fps=fps, seed=int(cfg.seed), num_inference_steps=None if steps is None else int(steps),
        guidance_scale=None if guidance is None else float(guidance),
        image=image, use_system_prompt=cfg.sampler.use_system_prompt is None or bool(cfg.sampler.use_system_prompt),
        video=video, condition_frames=indexes, condition_keep=keep,
        add_resolution_template=bool(cfg.add_resolution_template),
        add_duration_template=bool(cfg.add_duration_template),
    )


def check_settings(cfg: DictConfig, model: TransformerConfig) -> Settings:
    """`model`: the transformer's config (the checkpoint's, or the embedded preset's)."""
    device = torch.device(value(cfg.device))  # resolved and checked against this machine by `defaults`
    dtype = DTYPES[value(cfg.dtype)]
    vae_dtype = DTYPES[value(cfg.model.vae_dtype)] if cfg.model.vae_dtype is not None else dtype
    mode = value(cfg.compile.mode)
    if mode in ("cudagraph", "reduce_overhead", "max_autotune") and device.type != "cuda":
        raise RequestError(f"compile={mode} uses CUDA graphs: it needs device=cuda")
    sharding.check_compile(value(cfg.parallel.shard), mode, value(cfg.compile.scope))
    if cfg.compile.vae_warmup:
        _check_vae_warmup(cfg, mode)
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


def _check_vae_warmup(cfg: DictConfig, mode: str) -> None:
    if value(cfg.compile.vae) == "eager":
        raise RequestError("compile.vae_warmup=true warms the compiled decode: it needs compile.vae=default (or "
                           "another compiled mode), not eager")
    if mode not in BACKGROUND_SAFE_MODES:
        raise RequestError(f"compile.vae_warmup=true needs compile=cudagraph or compile=eager: compile={mode}'s "
                           "steady-state guard would take the warm-up's graphs for recompiles")
    if is_parallel(cfg.parallel):
        raise RequestError("compile.vae_warmup=true runs on one process: use parallel=none")


def check_output_dir(out_dir: Path) -> None:
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{uuid.uuid4().hex}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise RequestError(f"output directory {out_dir} is not writable ({err.strerror})") from None


def build_scheduler(cfg: DictConfig, checkpoint: CheckpointSpec | None) -> FlowUniPCScheduler | FlowMatchEulerScheduler:
    """The checkpoint's scheduler, chosen by its `_class_name` (the embedded default: the published UniPC one)."""
    distilled = bool(cfg.model.distilled)
    if checkpoint is not None and distilled:
        raise RequestError("model.distilled=true applies to checkpoint=null (random weights); a checkpoint's "
                           "scheduler is its scheduler/scheduler_config.json: leave model.distilled unset")
    if checkpoint is not None:
        raw = checkpoint.scheduler
    else:
        raw = dict(COSMOS3_DISTILLED_SCHEDULER_CONFIG if distilled else COSMOS3_SCHEDULER_CONFIG)
    schedule = value(cfg.sampler.schedule)
    if raw.get("_class_name") == "FlowMatchEulerDiscreteScheduler":
        if schedule != "checkpoint":
            raise RequestError(f"sampler.schedule={schedule} does not apply to this distilled checkpoint: it samples "
                               "its own fixed schedule (FlowMatchEulerDiscreteScheduler); leave sampler.schedule unset")
        return FlowMatchEulerScheduler.from_config(raw, None if checkpoint is None else checkpoint.distilled_sigmas)
    raw = merge_schedule_overrides(raw, schedule, float(cfg.sampler.flow_shift))
    return FlowUniPCScheduler.from_config(raw)


def check_sampler(request: Request, fixed_steps: int | None) -> None:
    """What a distilled checkpoint's fixed schedule does not take (`fixed_steps`: its length), refused as the
    reference's distilled blocks refuse it: another step count, guidance other than 1 (it is in the weights); and a
    negative prompt, which nothing would read."""
    if fixed_steps is None:
        return
    if request.num_inference_steps != fixed_steps:
        raise RequestError(f"sampler.num_inference_steps={request.num_inference_steps}: this distilled checkpoint runs "
                           f"its fixed {fixed_steps}-step schedule; leave it unset or pass {fixed_steps}")
    if request.guidance_scale != 1.0:
        raise RequestError(f"sampler.guidance_scale={request.guidance_scale}: this distilled checkpoint has the "
                           "guidance in its weights; leave it unset or pass 1.0")
    if request.negative_prompt:
        raise RequestError("negative_prompt does not apply to a distilled checkpoint (no unconditional pass: the "
                           "guidance is in its weights); leave it empty")


def check_precision(cfg: DictConfig, checkpoint: CheckpointSpec | None, num_steps: int) -> Fp8Policy | None:
    """The job's FP8 policy (`precision.*` over the checkpoint's `quantization_config`), None for unquantized
    weights. Refused in one line: a precision override for unquantized weights (it would change nothing), W8A16
    windows with an every-step policy, and a policy with W8A8 steps for linears exported without an input_scale."""
    node = cfg.precision
    policy, first, last = str(value(node.policy)), node.first_steps, node.last_steps
    fp8_attention = node.fp8_attention
    qc = None if checkpoint is None else read_quantization_config(checkpoint.folder / "transformer")
    if qc is None:
        asked = [f"precision.{k}={v}" for k, v in (("policy", policy), ("first_steps", first), ("last_steps", last),
                                                   ("fp8_attention", "true" if fp8_attention else None))
                 if v not in (None, "checkpoint")]
        if asked:
            where = "the embedded default model" if checkpoint is None else f"checkpoint {checkpoint.folder}"
            raise RequestError(f"{asked[0]} applies to FP8 (ModelOpt) checkpoints only; {where} is not quantized: "
                               "leave precision unset")
        return None
    if policy != "checkpoint" and (first is not None or last is not None):
        key = "first_steps" if first is not None else "last_steps"
        raise RequestError(f"precision.{key} sets a W8A16 window of precision.policy=checkpoint; precision.policy="
                           f"{policy} runs every step the same: drop precision.{key}")
    resolved = dataclasses.replace(Fp8Policy.resolve(qc, policy, first, last), fp8_attention=fp8_attention)
    if fp8_attention and not resolved.uses_a8(num_steps, ("generation",)):
        raise RequestError(f"precision.fp8_attention=true runs at the W8A8 steps, and precision.policy={policy} has "
                           "none in this request: drop it or use a policy with W8A8 steps")
    missing = missing_input_scales(read_header(weight_files(checkpoint.folder / "transformer", WEIGHTS_STEM)))
    if missing and resolved.uses_a8(num_steps, {linear_group(n) for n in missing}):
        raise RequestError(f"precision.policy={policy} runs W8A8 steps, but {len(missing)} FP8 linear(s) of "
                           f"{checkpoint.folder} have no input_scale (e.g. {missing[0]}): use precision.policy=a16")
    return resolved


def check_sound(cfg: DictConfig, request: Request, checkpoint: CheckpointSpec | None,
                scheduler: FlowUniPCScheduler | FlowMatchEulerScheduler) -> int:
    """The sound segment's latent frames of a `sound=true` request (0 without sound): the checkpoint must be
    sound-capable (a sound_tokenizer/ folder and a transformer with sound_gen), the request a video on one process
    sampled by UniPC, and the waveform fit for an AAC track when video.mp4 is written."""
    if not cfg.sound:
        return 0
    if checkpoint is None:
        raise RequestError(f"sound=true needs a sound-capable checkpoint (sound_tokenizer/ and sound_gen: true); the "
                           f"embedded model={cfg.model.name} has no sound: pass checkpoint=<folder or Hub id>")
    where = checkpoint.folder
    if checkpoint.sound is None:
        raise RequestError(f"sound=true: checkpoint {where} has no sound_tokenizer/ folder (not a sound-capable "
                           "checkpoint); drop sound=true")
    model, audio = checkpoint.transformer, checkpoint.sound
    if not model.sound_gen:
        raise RequestError(f"sound=true: {where}/transformer/config.json has sound_gen false (no audio head); "
                           "drop sound=true")
    if model.sound_dim != audio.latent_dim:
        raise RequestError(f"sound=true: the transformer's sound_dim ({model.sound_dim}) does not match the sound "
                           f"tokenizer's vocoder_input_dim ({audio.latent_dim}) in {where}")
    if request.num_frames == 1:
        raise RequestError("sound=true needs a video (num_frames > 1); num_frames=1 is text-to-image")
    if isinstance(scheduler, FlowMatchEulerScheduler):
        raise RequestError("sound=true is not supported with a distilled checkpoint's fixed-step sampler")
    if cfg.output.video and (audio.audio_channels not in (1, 2) or audio.sampling_rate not in AAC_SAMPLE_RATES):
        raise RequestError(f"sound=true: a {audio.audio_channels}-channel waveform at {audio.sampling_rate} Hz "
                           "cannot be muxed into video.mp4 as AAC (1 or 2 channels at a standard AAC rate); "
                           "output.video=false writes sound.wav alone")
    return audio.latent_len(request.num_frames, request.fps)


def _with_size(cfg: DictConfig, request: Request, auto: dict) -> DictConfig:
    """`cfg` with the action task's output size and frame count (what the stages and metrics.json read)."""
    out = copy.deepcopy(cfg)
    OmegaConf.set_readonly(out, False)
    why = f"action.mode={request.action.mode}: the tier's canvas cropped to the content / chunk_size + 1"
    for key in ("height", "width", "num_frames"):
        out[key] = getattr(request, key)
        auto[key] = f"{out[key]}: {why}"
    return out


def check_action_request(cfg: DictConfig) -> None:
    """What an action task refuses before anything else is read: the size keys (it sizes itself from the tier and
    chunk_size), an unknown mode value's companions, an unknown domain or one without an action width."""
    node = cfg.action
    mode = value(node.mode)
    if mode is None:
        given = [k for k in ("domain", "chunk_size", "actions", "raw_dim") if node[k] is not None]
        if given:
            raise RequestError(f"action.{given[0]} is set but action.mode is null: pass action.mode="
                               f"{'|'.join(action_mod.MODES)}, or drop action.{given[0]}")
        return
    sizes = [k for k in ("height", "width", "num_frames") if cfg[k] is not None]
    if sizes:
        raise RequestError(f"{sizes[0]}= does not apply to action.mode={mode}: the size comes from "
                           "action.resolution_tier and the frames from action.chunk_size + 1; drop it")
    domain = node.domain
    if domain is None:
        raise RequestError(f"action.mode={mode} needs action.domain (one of {sorted(action_mod.RAW_DIMS)})")
    if domain not in action_mod.DOMAIN_IDS:
        near = difflib.get_close_matches(str(domain), list(action_mod.DOMAIN_IDS), n=1)
        hint = f"; did you mean {near[0]}?" if near else f"; known: {sorted(action_mod.DOMAIN_IDS)}"
        raise RequestError(f"action.domain={domain!r} is not a Cosmos3 embodiment domain{hint}")
    if domain not in action_mod.RAW_DIMS:
        raise RequestError(f"action.domain={domain} has no fixed action width, so no action task can run on it; "
                           f"use one of {sorted(action_mod.RAW_DIMS)}")
    raw = action_mod.RAW_DIMS[domain]
    if node.raw_dim is not None and int(node.raw_dim) != raw:
        raise RequestError(f"action.raw_dim={node.raw_dim} is not the width of domain {domain} ({raw}); drop "
                           "action.raw_dim or pass that width")
    chunk = node.chunk_size
    if chunk is None or chunk < 1 or chunk % 4:
        raise RequestError(f"action.chunk_size={chunk}: pass a positive multiple of 4 (the clip has chunk_size + 1 "
                           "frames, 4k+1 for the VAE)")
    if int(node.resolution_tier) not in action_mod.TIERS:
        raise RequestError(f"action.resolution_tier={node.resolution_tier}: use one of {sorted(action_mod.TIERS)}")
    if cfg.image is not None and cfg.video is not None:
        raise RequestError(f"action.mode={mode} takes one conditioning: image= or video=, not both")
    if cfg.image is None and cfg.video is None:
        raise RequestError(f"action.mode={mode} needs the first frame: pass image=<file> or video=<clip>")
    if mode == "inverse_dynamics" and cfg.video is None:
        raise RequestError("action.mode=inverse_dynamics infers the actions of a clip: pass video=<clip>, not image=")
    if mode == "forward_dynamics" and node.actions is None:
        raise RequestError("action.mode=forward_dynamics needs the actions: pass action.actions=<file.safetensors> "
                           "(key `actions`, [n, raw_dim])")
    if mode != "forward_dynamics" and node.actions is not None:
        raise RequestError(f"action.actions is read by forward_dynamics only; action.mode={mode} generates the "
                           "actions: drop action.actions")
    if node.view_point not in action_mod.VIEW_POINTS:
        raise RequestError(f"action.view_point={node.view_point!r}: use one of {sorted(action_mod.VIEW_POINTS)}")


def read_actions(path: Path, raw_dim: int, domain: str) -> torch.Tensor:
    """Forward dynamics' actions: a safetensors file with key `actions`, [n, raw_dim], n >= 1, float."""
    if not path.is_file():
        raise RequestError(f"action.actions={path} does not exist")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise RequestError(f"action.actions={path} is not a readable safetensors file ({err})") from None
    if "actions" not in tensors:
        raise RequestError(f"action.actions={path} has no tensor named `actions` (found {sorted(tensors)})")
    a = tensors["actions"]
    if a.ndim != 2 or a.shape[0] < 1 or not a.is_floating_point():
        raise RequestError(f"action.actions={path}: `actions` must be a float [n, {raw_dim}] tensor with n >= 1, "
                           f"got {a.dtype} {list(a.shape)}")
    if a.shape[1] != raw_dim:
        raise RequestError(f"action.actions={path}: width {a.shape[1]} is not the action width of domain {domain} "
                           f"({raw_dim})")
    return a.float()


def first_frame_size(path: Path, is_video: bool) -> tuple[int, int]:
    """(height, width) of the conditioning source's first frame."""
    try:
        if is_video:
            frames = read_clip(path, 1, "first")
            if not frames:
                raise ValueError(f"video {path} has no frames")
            return frames[0].height, frames[0].width
        with Image.open(path) as im:
            return im.height, im.width
    except (OSError, ValueError) as err:
        raise RequestError(f"action conditioning {path} cannot be read ({err})") from None


def check_action(cfg: DictConfig, request: Request, checkpoint: CheckpointSpec | None,
                 scheduler: FlowUniPCScheduler | FlowMatchEulerScheduler) -> Request:
    """The request of an action task (unchanged without one): the checkpoint must carry the action head, the
    source's size gives the canvas and content, the prompt becomes the JSON caption (no metadata sentences; the
    negative prompt as given), frames chunk_size + 1 at the content's size."""
    node = cfg.action
    mode = value(node.mode)
    if mode is None:
        return request
    if checkpoint is None:
        raise RequestError(f"action.mode={mode} needs a checkpoint with the action head (action_gen: true); the "
                           f"embedded model={cfg.model.name} has none: pass checkpoint=<folder or Hub id>")
    model = checkpoint.transformer
    if not model.action_gen or model.action_dim < 1:
        raise RequestError(f"action.mode={mode}: {checkpoint.folder}/transformer/config.json has action_gen false "
                           "(no action head); use an action-capable checkpoint")
    domain = str(node.domain)
    raw = action_mod.RAW_DIMS[domain]
    if raw > model.action_dim:
        raise RequestError(f"action.domain={domain} has {raw} action channels, more than the checkpoint's "
                           f"action_dim={model.action_dim}")
    if action_mod.DOMAIN_IDS[domain] >= model.num_embodiment_domains:
        raise RequestError(f"action.domain={domain} is row {action_mod.DOMAIN_IDS[domain]} of the domain "
                           f"projections, but the checkpoint has {model.num_embodiment_domains}")
    if isinstance(scheduler, FlowMatchEulerScheduler):
        raise RequestError(f"action.mode={mode} is not supported with a distilled checkpoint's fixed-step sampler")
    actions = None
    if mode == "forward_dynamics":
        actions = read_actions(Path(str(node.actions)).expanduser(), raw, domain)
    is_video = cfg.video is not None
    source = Path(str(cfg.video if is_video else cfg.image)).expanduser()
    frame = action_mod.source_size(*first_frame_size(source, is_video))
    if min(frame) < 1:
        raise RequestError(f"action conditioning {source} is smaller than 16 x 16 pixels")
    tier = int(node.resolution_tier)
    canvas = action_mod.canvas_size(*frame, tier)
    spec = action_mod.ActionSpec(mode=mode, domain=domain, chunk_size=int(node.chunk_size), raw_dim=raw,
                                 action_dim=model.action_dim, canvas=canvas,
                                 content=action_mod.content_size(frame, canvas), view_point=str(node.view_point),
                                 actions=actions)
    h, w = spec.latent_hw
    prompt = action_mod.json_prompt(request.prompt, view_point=spec.view_point, num_frames=spec.num_frames,
                                    fps=request.fps, height=canvas[0], width=canvas[1])
    return dataclasses.replace(request, prompt=prompt, height=h * 16, width=w * 16, num_frames=spec.num_frames,
                               image=None, video=None, add_resolution_template=False, add_duration_template=False,
                               action=spec, action_source=source)


def prepare(cfg: DictConfig, out_dir: str | Path, writes: bool = True) -> Job:
    """Every check, cheapest first (the request before a Hub download); `writes`: this process writes the
    outputs (global rank 0). `auto` and unset values are resolved here (`defaults`), explicit ones kept."""
    check_keys(cfg)
    check_action_request(cfg)
    cfg, auto = request_defaults(cfg)
    request = build_request(cfg)
    checkpoint = None
    if cfg.checkpoint is not None:
        checkpoint = read_checkpoint(resolve_checkpoint(str(cfg.checkpoint), cfg.checkpoint_revision))
    elif cfg.checkpoint_revision is not None:
        raise RequestError("checkpoint_revision= needs checkpoint=<a Hub id>")
    scheduler = build_scheduler(cfg, checkpoint)
    cfg, chosen = sampler_defaults(cfg, scheduler.fixed_steps)
    auto.update(chosen)
    request = dataclasses.replace(request, num_inference_steps=int(cfg.sampler.num_inference_steps),
                                  guidance_scale=float(cfg.sampler.guidance_scale))
    check_sampler(request, scheduler.fixed_steps)
    precision = check_precision(cfg, checkpoint, request.num_inference_steps)
    request = check_action(cfg, request, checkpoint, scheduler)  # first: an action task sets the clip length
    request = dataclasses.replace(request, sound_len=check_sound(cfg, request, checkpoint, scheduler))
    if request.action is not None:  # the size the action task chose, in place of request_defaults' guesses
        cfg = _with_size(cfg, request, auto)
    model = preset(cfg.model.name) if checkpoint is None else checkpoint.transformer
    cfg, chosen = machine_defaults(cfg, checkpoint, request, model)
    auto.update(chosen)
    if precision is not None and precision.fp8_attention:
        fp8_attention.check_supported(torch.device(str(value(cfg.device))))
    request = dataclasses.replace(request, use_system_prompt=bool(cfg.sampler.use_system_prompt))
    settings = check_settings(cfg, model)
    out_dir = Path(out_dir)
    if writes:
        check_output_dir(out_dir)
    return Job(request, settings, checkpoint, scheduler, out_dir, cfg, auto, precision)
