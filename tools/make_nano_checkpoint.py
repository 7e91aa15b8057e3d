#!/usr/bin/env python3
"""Write a Nano-size official-layout (diffusers) checkpoint folder with seeded random weights: what a hub
download looks like, for load-time and end-to-end benchmarks without the real weights.

transformer/: config.json, diffusion_pytorch_model-0000K-of-0000N.safetensors shards of at most --shard-gb each
(a single tensor larger than that gets a shard of its own) and diffusion_pytorch_model.safetensors.index.json.
vae/: the full-size Wan2.2 VAE (the tiny one for debug presets), fp32. scheduler/, text_tokenizer/ and
model_index.json as components.write_checkpoint writes them.

The weights are those of the embedded default drawn on --device (`checkpoint.build_random`, VAE seed + 1) in
--dtype, the time embedder in fp32 as the model holds it. The transformer is never held whole: it is built
on the meta device and one shard's parameters at a time are drawn, written and freed. Shards are written
under a temporary name and renamed once complete; the index is written last.

With --fp8 the transformer is written in NVIDIA's ModelOpt FP8 format instead (the `revision=fp8` layout): the
same random weights are drawn whole on --device, every decoder-layer linear quantised per tensor (fp8 `weight`,
`weight_scale` = amax|W| / 448) with an `input_scale` calibrated on one small text pass and three video steps of
random inputs, `quantization_config` with the shipped first/last-3 step policy in config.json and a root
hf_quant_config.json. It needs the whole bf16 model and its quantized copy in memory (a GPU: --device cuda).

With --action the transformer also gets the released config's action head (action_gen, action_dim 64, 32 embodiment
domains); with --sound its audio head (sound_gen, sound_dim 64, 25 latent frames per second) and a sound_tokenizer/ at
the released tokenizer's size saved by diffusers' own class (diffusers must be installed for --sound).

Example: python tools/make_nano_checkpoint.py /data/cosmos3-nano-random --device cuda
         python tools/make_nano_checkpoint.py /tmp/cosmos3-nano-fp8 --device cuda --fp8
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

STEM = "diffusion_pytorch_model"
PRESETS = ("nano", "debug", "debug_edge")  # config.PRESETS (not imported here: --help stays fast)
RELEASED_ACTION_DIM = 64  # the released Nano config's action_dim


def shard_plan(named_shapes: list[tuple[str, tuple[int, ...], int]], shard_bytes: int) -> list[list[int]]:
    """Consecutive groups (indices into `named_shapes`, (name, shape, bytes) in parameter order) of at most
    `shard_bytes` each; a tensor larger than that is a group of its own."""
    groups: list[list[int]] = []
    size = 0
    for i, (_, _, nbytes) in enumerate(named_shapes):
        if not groups or (size + nbytes > shard_bytes and groups[-1]):
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += nbytes
    return groups


def write_transformer(tdir: Path, cfg, dtype, dev, seed: int, shard_bytes: int) -> tuple[int, int]:
    """The unquantized transformer under `tdir`, one shard at a time; returns (bytes written, shard count)."""
    import json
    import os

    import torch
    from safetensors.torch import save_file

    from cosmos3_compiled.checkpoint import official_config_dict, random_param
    from cosmos3_compiled.model import Cosmos3Transformer

    # meta model → shard plan → draw, write and free one shard at a time
    with torch.device("meta"):
        model = Cosmos3Transformer(cfg)
    params = []  # (name, shape, file dtype) in named_parameters order: the order the generator draws in
    for name, p in model.named_parameters():
        params.append((name, tuple(p.shape), torch.float32 if name.startswith(Cosmos3Transformer.keep_fp32) else dtype))
    sizes = [(n, s, torch.Size(s).numel() * torch.empty((), dtype=d).element_size()) for n, s, d in params]
    groups = shard_plan(sizes, shard_bytes)
    names = [f"{STEM}-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    gen = torch.Generator(device=dev).manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    with torch.no_grad():
        for fname, group in zip(names, groups):
            shard = {}
            for i in group:
                name, shape, file_dtype = params[i]
                shard[name] = random_param(name, shape, gen, dev).to(file_dtype).cpu()
            tmp = tdir / f".{fname}.tmp"
            save_file(shard, str(tmp), metadata={"format": "pt"})
            os.chmod(tmp, 0o644)  # save_file creates 0600 files; a hub download is readable by all
            tmp.rename(tdir / fname)
            total += sum(t.numel() * t.element_size() for t in shard.values())
            weight_map.update(dict.fromkeys(shard, fname))
            del shard
    del model
    (tdir / "config.json").write_text(json.dumps(official_config_dict(cfg), indent=2) + "\n")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    tmp = tdir / f".{STEM}.safetensors.index.json.tmp"
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    tmp.rename(tdir / f"{STEM}.safetensors.index.json")

    return total, len(names)


def write_fp8_transformer(tdir: Path, cfg, dtype, dev, seed: int, shard_bytes: int) -> tuple[int, int]:
    """The --fp8 transformer under `tdir` (shards, index, config.json); returns (bytes written, shard count)."""
    import json
    import os

    import torch
    from safetensors.torch import save_file

    from cosmos3_compiled import fp8
    from cosmos3_compiled.checkpoint import build_random, official_config_dict

    model = build_random(cfg, seed=seed, dtype=dtype, device=dev, fuse=False)
    state = dict(model.state_dict())  # official (unfused) names; the fusion below copies, these stay
    model.setup_buffers()
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (64,), generator=gen)
    latents = torch.randn(1, cfg.latent_channel, 3, 16, 24, generator=gen).to(dev)
    amax = fp8.calibrate_input_amax(model, ids, latents, (999, 500, 20), fps=24.0)
    del model
    quantized = fp8.quantize_state_dict(state, amax)
    del state
    sizes = [(k, tuple(v.shape), v.numel() * v.element_size()) for k, v in quantized.items()]
    groups = shard_plan(sizes, shard_bytes)
    names = [f"{STEM}-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map, total = {}, 0
    for fname, group in zip(names, groups):
        shard = {sizes[i][0]: quantized.pop(sizes[i][0]).contiguous().cpu() for i in group}
        tmp = tdir / f".{fname}.tmp"
        save_file(shard, str(tmp), metadata={"format": "pt"})
        os.chmod(tmp, 0o644)
        tmp.rename(tdir / fname)
        total += sum(t.numel() * t.element_size() for t in shard.values())
        weight_map.update(dict.fromkeys(shard, fname))
    qc = fp8.default_quantization_config()
    (tdir / "config.json").write_text(json.dumps({**official_config_dict(cfg), "quantization_config": qc},
                                                 indent=2) + "\n")
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    tmp = tdir / f".{STEM}.safetensors.index.json.tmp"
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    tmp.rename(tdir / f"{STEM}.safetensors.index.json")
    hf = {"producer": {"name": "modelopt"}, "quantization": {"quant_algo": "FP8", "exclude_modules": qc["ignore"]}}
    (tdir.parent / "hf_quant_config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return total, len(names)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", type=Path, help="checkpoint folder to write (created; must be empty or absent)")
    ap.add_argument("--preset", choices=PRESETS, default="nano", help="model size (default: nano)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights = model.init_seed (default: 0)")
    ap.add_argument("--shard-gb", type=float, default=5.0, help="largest transformer shard in GB, 1e9 bytes (default: 5)")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                    help="dtype of the transformer weights in the files (default: bfloat16)")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="where the random numbers are drawn; the weights depend on it (default: cpu)")
    ap.add_argument("--fp8", action="store_true",
                    help="write the transformer as ModelOpt FP8 (static per-tensor scales; see above)")
    ap.add_argument("--action", action="store_true", help="add the action head of the released config")
    ap.add_argument("--sound", action="store_true",
                    help="add the audio head of the released config and a released-size sound_tokenizer/ (needs diffusers)")
    args = ap.parse_args(argv)
    out: Path = args.output
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise SystemExit(f"make_nano_checkpoint: {out} exists and is not an empty folder; pick a new path")
    if args.shard_gb <= 0:
        raise SystemExit(f"make_nano_checkpoint: --shard-gb must be positive, got {args.shard_gb}")

    # after argparse: --help stays fast
    import json  # noqa: E402
    import os  # noqa: E402
    import shutil  # noqa: E402
    import time  # noqa: E402

    import torch  # noqa: E402
    from safetensors.torch import save_file  # noqa: E402

    from cosmos3_compiled.components import DTYPES, embedded_vae_config, init_vae_random_  # noqa: E402
    from cosmos3_compiled.audio import RELEASED  # noqa: E402
    from cosmos3_compiled.config import preset, replace  # noqa: E402
    from cosmos3_compiled.model import Cosmos3Transformer  # noqa: E402
    from cosmos3_compiled.prompting import BUILTIN_TOKENIZER_DIR  # noqa: E402
    from cosmos3_compiled.scheduler import COSMOS3_SCHEDULER_CONFIG  # noqa: E402
    from cosmos3_compiled.vae import VAEConfig, build_vae  # noqa: E402

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("make_nano_checkpoint: --device cuda but torch sees no CUDA device")
    cfg = preset(args.preset)
    if args.action:
        cfg = replace(cfg, action_gen=True, action_dim=RELEASED_ACTION_DIM, num_embodiment_domains=32)
    if args.sound:
        cfg = replace(cfg, sound_gen=True, sound_dim=RELEASED.latent_dim,
                      sound_latent_fps=RELEASED.sampling_rate / RELEASED.hop)
    dtype = DTYPES[args.dtype]
    dev = torch.device(args.device)
    t0 = time.perf_counter()

    # ---- transformer: meta model → shard plan → draw, write and free one shard at a time
    tdir = out / "transformer"
    tdir.mkdir(parents=True, exist_ok=True)
    if args.fp8:
        total, shards = write_fp8_transformer(tdir, cfg, dtype, dev, args.seed, int(args.shard_gb * 1e9))
    else:
        total, shards = write_transformer(tdir, cfg, dtype, dev, args.seed, int(args.shard_gb * 1e9))

    # ---- VAE (full size except for debug presets, drawn where build_embedded draws it), scheduler, tokenizer
    full = not args.preset.startswith("debug")
    vae_cfg = embedded_vae_config(cfg.latent_channel, full_size=full)
    vae = init_vae_random_(build_vae(VAEConfig.from_dict(vae_cfg), device=dev if full else "cpu"), args.seed + 1)
    vdir = out / "vae"
    vdir.mkdir()
    vae_state = {k: v.detach().contiguous().cpu() for k, v in vae.state_dict().items()}
    del vae
    tmp = vdir / f".{STEM}.safetensors.tmp"
    save_file(vae_state, str(tmp), metadata={"format": "pt"})
    os.chmod(tmp, 0o644)
    tmp.rename(vdir / f"{STEM}.safetensors")
    vae_bytes = sum(t.numel() * t.element_size() for t in vae_state.values())
    del vae_state
    (vdir / "config.json").write_text(json.dumps(vae_cfg, indent=2) + "\n")
    (out / "scheduler").mkdir()
    sched = {"_class_name": "UniPCMultistepScheduler", "_diffusers_version": "0.42.1", **COSMOS3_SCHEDULER_CONFIG}
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2) + "\n")
    shutil.copytree(BUILTIN_TOKENIZER_DIR, out / "text_tokenizer")
    model_index = {
        "_class_name": "Cosmos3OmniPipeline", "_diffusers_version": "0.42.1",
        "transformer": ["diffusers", "Cosmos3OmniTransformer"], "vae": ["diffusers", "AutoencoderKLWan"],
        "scheduler": ["diffusers", "UniPCMultistepScheduler"], "text_tokenizer": ["transformers", "Qwen2Tokenizer"],
    }
    if args.sound:
        sys.path.insert(0, str(ROOT / "tools"))
        from make_tiny_checkpoint import write_sound_tokenizer  # noqa: E402

        write_sound_tokenizer(out / "sound_tokenizer", RELEASED, seed=args.seed + 2)
        model_index["sound_tokenizer"] = ["diffusers", "Cosmos3AVAEAudioTokenizer"]
    (out / "model_index.json").write_text(json.dumps(model_index, indent=2) + "\n")
    seconds = time.perf_counter() - t0
    print(f"wrote {args.preset} (seed {args.seed}, {args.dtype}, drawn on {args.device}) to {out}: "
          f"transformer {total} bytes in {shards} shard(s){' (FP8)' if args.fp8 else ''}, VAE {vae_bytes} bytes; {seconds:.1f} s")
    return out


if __name__ == "__main__":
    main()
