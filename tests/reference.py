"""Tiny Cosmos3 checkpoints in the official diffusers layout, built with diffusers' own classes.

Test helper (not a test file). Parity tests build a checkpoint here, run the diffusers reference
pipeline on it, and compare our engine against it:

    from reference import make_reference_checkpoint, load_reference_pipeline
    folder = make_reference_checkpoint(tmp_path / "ckpt")
    pipe = load_reference_pipeline(folder)

Weights are random but not trivial (`helpers.randomize_`: norm gains away from 1, weights of std
1/sqrt(fan_in), non-zero biases); latents_mean/std are non-zero and different per channel. The scheduler
is the published Cosmos3 one (`scheduler.COSMOS3_SCHEDULER_CONFIG`) or its shifted-sigma variant.

`load_reference_distilled_pipeline` runs diffusers' distilled modular blocks on a `components.write_checkpoint`
folder written with the distilled checkpoints' scheduler (`scheduler.COSMOS3_DISTILLED_SCHEDULER_CONFIG`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from helpers import randomize_

from cosmos3_compiled.audio import TINY as TINY_AUDIO
from cosmos3_compiled.prompting import BUILTIN_TOKENIZER_DIR, PromptTokenizer
from cosmos3_compiled.scheduler import COSMOS3_SCHEDULER_CONFIG
from cosmos3_compiled.vae import wan22_config

LATENT_CHANNELS = 48  # Wan2.2 VAE z_dim; the transformer's patch features are 48·2·2 = 192


def builtin_vocab_size(multiple: int = 64) -> int:
    """The built-in tokenizer's id count rounded up (embedding tables are padded like the real 151936)."""
    n = PromptTokenizer.builtin().vocab_size
    return -(-n // multiple) * multiple


def scheduler_config(sigma_schedule: str = "karras") -> dict:
    """UniPC flow-matching settings: published Cosmos3 ("karras") or sglang's shifted flow sigmas ("shift")."""
    # Karras flow sigmas ignore flow_shift; a non-trivial value makes a scheduler that applies it anyway fail.
    published = {k: v for k, v in COSMOS3_SCHEDULER_CONFIG.items() if not k.startswith("_")}
    if sigma_schedule == "karras":
        return {**published, "flow_shift": 10.0}
    if sigma_schedule == "shift":  # no Karras range left in the file
        shifted = {k: v for k, v in published.items() if k not in ("sigma_min", "sigma_max")}
        return {**shifted, "use_karras_sigmas": False, "flow_shift": 10.0}
    raise ValueError(f"sigma_schedule must be 'karras' or 'shift', got {sigma_schedule!r}")


def make_reference_checkpoint(
    root: str | Path,
    *,
    num_kv_heads: int = 2,
    num_heads: int = 4,
    head_dim: int = 16,
    hidden: int = 64,
    layers: int = 2,
    ffn: int = 128,
    rope_axes_dim: tuple[int, int, int] = (4, 2, 2),
    vocab_size: int | None = None,
    vae_base_dim: int = 8,
    vae_decoder_base_dim: int = 16,
    vae_num_res_blocks: int = 1,
    seed: int = 0,
    sigma_schedule: str = "karras",
    hidden_act: str = "silu",
    qk_norm_for_text: bool = True,
    use_und_k_norm_for_gen: bool = False,
    sound: bool = False,
    action_dim: int = 0,
) -> Path:
    """Write model_index.json, transformer/, vae/, scheduler/, text_tokenizer/ under `root`; return `root`.

    `vocab_size` defaults to the built-in tokenizer size rounded up to a multiple of 64. `sound`: a sound-capable
    checkpoint (the transformer's audio head, `sound_gen: true`, and a tiny `sound_tokenizer/`, `make_sound_tokenizer`).
    `action_dim`: an action-capable one (`action_gen: true`, that many action channels, 32 embodiment domains; the
    domain-aware projections rescaled to std 1/sqrt(fan_in) of one domain's matrix).
    """
    from diffusers import AutoencoderKLWan, Cosmos3OmniPipeline, Cosmos3OmniTransformer, UniPCMultistepScheduler
    from transformers import AutoTokenizer

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if vocab_size is None:
        vocab_size = builtin_vocab_size()
    gen = torch.Generator("cpu").manual_seed(seed)  # latent statistics; the weights: randomize_

    transformer = Cosmos3OmniTransformer(
        head_dim=head_dim,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_attention_heads=num_heads,
        num_hidden_layers=layers,
        num_key_value_heads=num_kv_heads,
        rope_axes_dim=list(rope_axes_dim),
        vocab_size=vocab_size,
        hidden_act=hidden_act,
        qk_norm_for_text=qk_norm_for_text,
        use_und_k_norm_for_gen=use_und_k_norm_for_gen,
        latent_channel=LATENT_CHANNELS,
        patch_latent_dim=LATENT_CHANNELS * 4,
        **(dict(sound_gen=True, sound_dim=TINY_AUDIO.latent_dim, sound_latent_fps=25.0) if sound else {}),
        **(dict(action_gen=True, action_dim=action_dim, num_embodiment_domains=32) if action_dim else {}),
    ).float()
    randomize_(transformer, seed)
    if action_dim:
        with torch.no_grad():  # randomize_ reads a table row (in·out numbers) as the fan-in
            transformer.action_proj_in.fc.weight.mul_(hidden ** 0.5)
            transformer.action_proj_out.fc.weight.mul_(action_dim ** 0.5)

    latents_mean = (0.5 * torch.randn(LATENT_CHANNELS, generator=gen)).tolist()
    latents_std = (0.5 + torch.rand(LATENT_CHANNELS, generator=gen)).tolist()
    vae = AutoencoderKLWan(
        **wan22_config(base_dim=vae_base_dim, decoder_base_dim=vae_decoder_base_dim, z_dim=LATENT_CHANNELS,
                       num_res_blocks=vae_num_res_blocks),
        latents_mean=latents_mean,
        latents_std=latents_std,
    ).float()
    randomize_(vae, seed + 1)

    scheduler = UniPCMultistepScheduler(**scheduler_config(sigma_schedule))
    text_tokenizer = AutoTokenizer.from_pretrained(BUILTIN_TOKENIZER_DIR)

    pipe = Cosmos3OmniPipeline(
        transformer=transformer,
        text_tokenizer=text_tokenizer,
        vae=vae,
        scheduler=scheduler,
        sound_tokenizer=make_sound_tokenizer(seed + 2) if sound else None,
        enable_safety_checker=False,
    )
    pipe.save_pretrained(root, safe_serialization=True)
    # Ship the tokenizer files exactly as committed (transformers would rewrite its config on save).
    shutil.rmtree(root / "text_tokenizer")
    shutil.copytree(BUILTIN_TOKENIZER_DIR, root / "text_tokenizer")
    _check_layout(root)
    return root


def make_sound_tokenizer(seed: int, cfg=None):
    """diffusers' Cosmos3AVAEAudioTokenizer at the tiny decoder size (`audio.TINY`) with a tiny encoder too (its
    weights are in the file and must be skipped), fp32, random weights (`helpers.randomize_`, every convolution but
    the last one scaled down: at full `randomize_` gains the Snake stack is so sensitive that fp32 rounding in the
    latents grows a thousandfold in the waveform; at these it stays within a few times, the waveform well inside
    the [-1, 1] clamp)."""
    from diffusers import Cosmos3AVAEAudioTokenizer

    cfg = cfg or TINY_AUDIO
    tok = Cosmos3AVAEAudioTokenizer(
        **cfg.to_dict(), enc_dim=4, enc_c_mults=(1, 2), enc_strides=(4, 80), enc_num_blocks=1, enc_n_fft=8,
        enc_hop_length=4, enc_latent_dim=2 * cfg.latent_dim,
    ).float()
    randomize_(tok, seed)
    with torch.no_grad():
        for name, module in tok.decoder.named_modules():
            if hasattr(module, "weight_g") and name != "conv2":
                module.weight_g.mul_(0.6)
    return tok.eval()


def _check_layout(root: Path) -> None:
    index = json.loads((root / "model_index.json").read_text())
    for component in ("transformer", "vae", "scheduler", "text_tokenizer"):
        if component not in index or not (root / component).is_dir():
            raise RuntimeError(f"reference checkpoint {root} lacks component {component!r}")
    if not list((root / "transformer").glob("*.safetensors")):
        raise RuntimeError(f"reference checkpoint {root}/transformer has no safetensors weights")


# The text tower's language-model head: `components.write_checkpoint` does not write it (video generation never
# reads it), so a reference loaded from such a folder keeps its initial values there.
TEXT_HEAD = ("norm.weight", "lm_head.weight")


def load_reference_transformer(folder: str | Path, allow_missing: tuple[str, ...] = ()):
    """diffusers' Cosmos3OmniTransformer from `<folder>/transformer`, fp32, every weight checked.

    Built from config.json and loaded strictly from the safetensors files: diffusers' own from_pretrained
    refuses this model without `accelerate` (its fp32-kept time embedder needs low_cpu_mem_usage).
    `allow_missing`: parameters the folder may lack (`TEXT_HEAD` for a `write_checkpoint` folder); no other.
    """
    from diffusers import Cosmos3OmniTransformer
    from safetensors.torch import load_file

    component = Path(folder) / "transformer"
    model = Cosmos3OmniTransformer.from_config(Cosmos3OmniTransformer.load_config(component))
    state: dict[str, torch.Tensor] = {}
    for file in sorted(component.glob("*.safetensors")):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=not allow_missing)
    if unexpected or set(missing) - set(allow_missing):
        raise RuntimeError(f"{component}: missing {sorted(set(missing) - set(allow_missing))}, unexpected {unexpected}")
    return model.float().eval()


def load_reference_pipeline(folder: str | Path):
    """diffusers' Cosmos3OmniPipeline on the CPU in fp32, safety checker off."""
    from diffusers import Cosmos3OmniPipeline

    pipe = Cosmos3OmniPipeline.from_pretrained(
        folder,
        transformer=load_reference_transformer(folder),
        dtype=torch.float32,
        enable_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def load_reference_distilled_pipeline(folder: str | Path):
    """diffusers' distilled modular pipeline (`Cosmos3DistilledModularPipeline`, `Cosmos3DistilledBlocks`) on the CPU
    in fp32, safety checker off, from a `components.write_checkpoint(..., distilled=True)` folder.

    diffusers reads the fixed schedule from the pipeline config `distilled_sigmas` (a modular_model_index.json
    entry); the folder has no such file, so the schedule goes in from where the shipped checkpoints carry it:
    scheduler_config.json's `fixed_step_sampler_config.t_list`."""
    from diffusers import (
        AutoencoderKLWan,
        Cosmos3DistilledBlocks,
        Cosmos3DistilledModularPipeline,
        FlowMatchEulerDiscreteScheduler,
    )
    from transformers import AutoTokenizer

    folder = Path(folder)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    pipe = Cosmos3DistilledModularPipeline(blocks=Cosmos3DistilledBlocks())
    pipe.update_components(
        transformer=load_reference_transformer(folder, allow_missing=TEXT_HEAD),
        vae=AutoencoderKLWan.from_pretrained(folder / "vae", torch_dtype=torch.float32).eval(),
        text_tokenizer=AutoTokenizer.from_pretrained(folder / "text_tokenizer"),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler"),
        distilled_sigmas=config["fixed_step_sampler_config"]["t_list"],
    )
    pipe.disable_safety_checker()
    blocks = [pipe._blocks]  # the blocks it runs (`pipe.blocks` is a copy); its denoise loop sits two levels down,
    while blocks:  # out of reach of pipe.set_progress_bar_config
        block = blocks.pop()
        if hasattr(block, "progress_bar"):
            block.set_progress_bar_config(disable=True)
        blocks += list(getattr(block, "sub_blocks", {}).values())
    return pipe
