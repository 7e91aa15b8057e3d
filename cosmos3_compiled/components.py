"""Build the pipeline's components: from an official checkpoint folder, or the embedded default."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import build_random, load_transformer, save_transformer
from .checkpoint_io import CheckpointError, read_json, weight_files
from .config import TransformerConfig, preset, replace
from .prompting import BUILTIN_TOKENIZER_DIR, PromptTokenizer
from .scheduler import COSMOS3_DISTILLED_SCHEDULER_CONFIG, COSMOS3_SCHEDULER_CONFIG
from .audio import AudioConfig, read_audio_config
from .vae import VAEConfig, WanVAE, build_vae, load_vae, wan22_config

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SUBFOLDERS = ("transformer", "vae", "scheduler", "text_tokenizer")


def embedded_vae_config(z_dim: int = 48, full_size: bool = False) -> dict:
    """A Wan2.2-architecture VAE config (diffusers keys): tiny for the embedded default, or the real
    widths (base 160, decoder 256, 2 res blocks) for Nano-size benchmarks with random weights."""
    gen = torch.Generator().manual_seed(1234)
    small = {} if full_size else dict(base_dim=8, decoder_base_dim=16, num_res_blocks=1)
    return {
        "_class_name": "AutoencoderKLWan",
        "_diffusers_version": "0.42.1",
        **wan22_config(z_dim=z_dim, **small),
        "dropout": 0.0,
        "clip_output": True,
        "latents_mean": [round(v, 4) for v in (0.1 * torch.randn(z_dim, generator=gen)).tolist()],
        "latents_std": [round(v, 4) for v in (1.0 + 0.5 * torch.rand(z_dim, generator=gen)).tolist()],
    }


def init_vae_random_(vae: WanVAE, seed: int) -> WanVAE:
    """Seeded weights drawn on the VAE's own device (seconds for the full-size VAE on a GPU)."""
    dev = vae.post_quant_conv.weight.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            t = torch.randn(p.shape, generator=gen, device=dev)
            if p.ndim >= 2:
                t /= math.sqrt(math.prod(p.shape[1:]))
            elif name.endswith("gamma"):
                t = 1.0 + 0.1 * t
            else:
                t *= 0.02
            p.copy_(t.reshape(p.shape))
    return vae


def build_embedded(name: str, seed: int, device: torch.device, dtype: torch.dtype, vae_dtype: torch.dtype,
                   offload_text_tower: bool = False, pin_text_tower: bool = False):
    """The embedded default: seeded random transformer and VAE, built-in tokenizer.

    `debug` sizes get a tiny VAE (drawn on the CPU, so every machine gets the same weights); other
    presets get the real Wan2.2 VAE widths, drawn on `device`.
    """
    cfg = preset(name)
    transformer = build_random(cfg, seed=seed, dtype=dtype, device=device, offload_text_tower=offload_text_tower,
                               pin_text_tower=pin_text_tower)
    full = not name.startswith("debug")
    vae = build_vae(VAEConfig.from_dict(embedded_vae_config(cfg.latent_channel, full)), device=device if full else "cpu")
    init_vae_random_(vae, seed + 1).to(device=device, dtype=vae_dtype).eval().requires_grad_(False)
    return transformer, vae, PromptTokenizer.builtin()


@dataclass(frozen=True)
class CheckpointSpec:
    """An official checkpoint folder, checked and with each component's config parsed once."""

    folder: Path
    transformer: TransformerConfig
    vae: VAEConfig
    scheduler: dict  # scheduler_config.json as read
    # a distilled checkpoint's fixed schedule where diffusers' modular pipeline reads it: `distilled_sigmas` in
    # modular_model_index.json (else model_index.json, as diffusers falls back); None when absent
    distilled_sigmas: list | None = None
    # model_index.json's `default_use_system_prompt` (the pipeline's default when sampler.use_system_prompt is
    # unset); None when absent or not a bool
    default_use_system_prompt: bool | None = None
    # sound_tokenizer/config.json (its decoder's shape and rates); None when the folder has no sound_tokenizer/
    sound: AudioConfig | None = None


def read_checkpoint(folder: str | Path) -> CheckpointSpec:
    """Cheap checks before anything heavy: subfolders, configs, shards and safetensors headers."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint folder {folder} does not exist")
    missing = [s for s in SUBFOLDERS if not (folder / s).is_dir()]
    if missing:
        raise CheckpointError(f"checkpoint {folder} lacks subfolder(s) {', '.join(missing)} (diffusers layout expected)")
    cfg = TransformerConfig.from_folder(folder / "transformer")
    weight_files(folder / "transformer")
    vae_cfg = VAEConfig.from_dict(read_json(folder / "vae" / "config.json"), where=str(folder / "vae" / "config.json"))
    weight_files(folder / "vae")
    cfg.check_vae(vae_cfg.z_dim)
    scheduler = read_json(folder / "scheduler" / "scheduler_config.json")
    pipeline = read_json(folder / "model_index.json") if (folder / "model_index.json").is_file() else {}
    modular = folder / "modular_model_index.json"
    distilled = (read_json(modular) if modular.is_file() else pipeline).get("distilled_sigmas")
    system_prompt = pipeline.get("default_use_system_prompt")
    sound = read_audio_config(folder / "sound_tokenizer") if (folder / "sound_tokenizer").is_dir() else None
    return CheckpointSpec(folder.resolve(), cfg, vae_cfg, scheduler, distilled,
                          system_prompt if isinstance(system_prompt, bool) else None, sound)


def load_checkpoint(spec: CheckpointSpec, device: torch.device, dtype: torch.dtype, vae_dtype: torch.dtype,
                    with_encoder: bool, offload_text_tower: bool = False, stats: dict | None = None,
                    pin_text_tower: bool = False):
    """Transformer, VAE and tokenizer of a checked checkpoint (the scheduler is built from `spec.scheduler`).
    `stats`: filled with the transformer read's bytes and seconds (`checkpoint.load_transformer`)."""
    transformer = load_transformer(spec.folder / "transformer", dtype=dtype, device=device,
                                   offload_text_tower=offload_text_tower, cfg=spec.transformer, stats=stats,
                                   pin_text_tower=pin_text_tower)
    vae = load_vae(spec.folder / "vae", dtype=vae_dtype, device=device, with_encoder=with_encoder, cfg=spec.vae)
    tokenizer = PromptTokenizer.from_folder(spec.folder / "text_tokenizer")
    return transformer, vae, tokenizer


def write_checkpoint(folder: str | Path, name: str = "debug", seed: int = 0, distilled: bool = False,
                     sound_dim: int = 0, action_dim: int = 0) -> Path:
    """Write the embedded default model as an official-layout checkpoint folder (fp32 safetensors).
    `distilled`: with the few-step distilled checkpoints' scheduler (FlowMatchEuler on their fixed 4-step schedule,
    scheduler_config.json as shipped) instead of the published UniPC one. `sound_dim`: with the transformer's audio
    head of that many sound channels (`sound_gen: true`; the other weights are the same draws) and a
    `sound_tokenizer` entry in model_index.json; the `sound_tokenizer/` folder itself is the caller's
    (tools/make_tiny_checkpoint.py --sound saves one with diffusers' own class). `action_dim`: with the action head
    (`action_gen: true`, that many action channels, the default 32 embodiment domains; drawn after every other
    weight, so the rest is unchanged)."""
    folder = Path(folder)
    cfg = preset(name)
    if sound_dim:
        cfg = replace(cfg, sound_gen=True, sound_dim=sound_dim)
    if action_dim:
        cfg = replace(cfg, action_gen=True, action_dim=action_dim)
    transformer = build_random(cfg, seed=seed, fuse=False)
    save_transformer(transformer, folder / "transformer")
    vae_cfg = embedded_vae_config(cfg.latent_channel)
    vae = init_vae_random_(build_vae(VAEConfig.from_dict(vae_cfg), device="cpu"), seed + 1)
    (folder / "vae").mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()},
              str(folder / "vae" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    (folder / "vae" / "config.json").write_text(json.dumps(vae_cfg, indent=2) + "\n")
    (folder / "scheduler").mkdir(exist_ok=True)
    base = COSMOS3_DISTILLED_SCHEDULER_CONFIG if distilled else COSMOS3_SCHEDULER_CONFIG
    sched = {"_class_name": base["_class_name"], "_diffusers_version": "0.42.1", **base}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
    shutil.copytree(BUILTIN_TOKENIZER_DIR, folder / "text_tokenizer", dirs_exist_ok=True)
    index = {
        "_class_name": "Cosmos3OmniPipeline", "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", "Cosmos3OmniTransformer"], "vae": ["diffusers", "AutoencoderKLWan"],
        "scheduler": ["diffusers", sched["_class_name"]], "text_tokenizer": ["transformers", "Qwen2Tokenizer"],
    }
    if sound_dim:
        index["sound_tokenizer"] = ["diffusers", "Cosmos3AVAEAudioTokenizer"]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder
