"""Load and save the transformer in the official (diffusers) checkpoint layout; seeded random weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from . import fp8, offload
from .checkpoint_io import load_strict, read_header, weight_files
from .config import TransformerConfig
from .model import Cosmos3Transformer

WEIGHTS_STEM = "diffusion_pytorch_model"


def load_transformer(
    folder: str | Path, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
    offload_text_tower: bool = False, cfg: TransformerConfig | None = None, stats: dict | None = None,
    pin_text_tower: bool = False,
) -> Cosmos3Transformer:
    """Build on the meta device and assign the official `transformer/` weights (one file or shards), strictly.

    The keys and shapes of every shard are checked from the safetensors headers before any tensor data is
    read; the weights then stream to where they live (`checkpoint_io.stream_tensors`), cast on their device
    only where the file's dtype differs; the unused keys of official checkpoints are not read at all.
    The time embedder stays in fp32, as in the reference. Video-tower projections are fused after loading.
    An FP8 (ModelOpt) checkpoint loads as it is: the linears carrying `weight_scale` become `fp8.Fp8Linear`s
    whose fp8 weights and float32 scales stay as stored; `dtype` is then the activation (compute) dtype.
    With `offload_text_tower`, text-tower weights are read into host memory and never held on `device`; with
    `pin_text_tower` too (CUDA), straight into page-locked buffers (no packing copy afterwards).
    `cfg`: the folder's config when the caller already parsed it (`components.read_checkpoint`).
    `stats`: filled with `bytes` (tensor data read) and `seconds` (wall time of the reads and copies).
    """
    folder = Path(folder)
    cfg = cfg or TransformerConfig.from_folder(folder)
    files = weight_files(folder, WEIGHTS_STEM)
    with torch.device("meta"):
        model = Cosmos3Transformer(cfg)
    header = read_header(files)
    if fp8.swap_in_fp8_(model, header):
        fp8.read_quantization_config(folder)  # a quantization this package does not run fails in one line
    ignore = frozenset(
        k for k in header if k in Cosmos3Transformer.unused_keys or k.startswith(model.unused_prefixes)
    )
    pinned = load_strict(model, files, dtype, device, ignore=ignore, keep_fp32=Cosmos3Transformer.keep_fp32,
                         where=str(folder), host=offload.is_text_param if offload_text_tower else None,
                         header=header, stats=stats, pin_host=offload_text_tower and pin_text_tower)
    model.eval().requires_grad_(False)
    fp8.finish_load_(model)
    if offload_text_tower:
        offload.offload_text_tower(model, buffers=pinned)
    model.setup_buffers()
    return model


def random_param(name: str, shape: tuple[int, ...], gen: torch.Generator, device: torch.device) -> torch.Tensor:
    """One parameter of the seeded recipe below, in fp32: linears ~ N(0, 1/fan_in), norms 1 ± 0.1, biases
    N(0, 0.02²), embeddings N(0, 1). Drawing every parameter in `named_parameters()` order from one generator
    gives `init_random_`'s weights (tools/make_nano_checkpoint.py draws them a shard at a time)."""
    tmp = torch.empty(shape, device=device, dtype=torch.float32)
    tmp.normal_(generator=gen)
    if "norm" in name.split(".")[-2:][0] and "." in name:  # every norm weight: *norm*.weight
        tmp.mul_(0.1).add_(1.0)
    elif name.endswith("bias"):
        tmp.mul_(0.02)
    elif len(shape) == 2 and not name.startswith("embed_tokens"):
        tmp.mul_(1.0 / math.sqrt(shape[1]))
    return tmp


def init_random_(model: Cosmos3Transformer, seed: int) -> Cosmos3Transformer:
    """Deterministic weights with O(1) activations (`random_param`'s recipe).

    Numbers are drawn on the video tower's device (seconds for Nano on a GPU) and copied to wherever
    each parameter lives, so the same seed gives the same weights with the text tower offloaded.
    """
    dev = model.device
    gen = torch.Generator(device=dev).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # cast where drawn: an offloaded parameter then crosses to the host in its own dtype (half the bytes
            # of fp32 for bf16) and the host does no conversion (the rounding is the same on either side)
            p.copy_(random_param(name, tuple(p.shape), gen, dev).to(p.dtype))
    return model


def build_random(
    cfg: TransformerConfig, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
    fuse: bool = True, offload_text_tower: bool = False, pin_text_tower: bool = False,
) -> Cosmos3Transformer:
    """A model with seeded random weights (embedded default, benchmarks): meta → allocate in place → fill.

    With `offload_text_tower`, text-tower parameters are allocated in host memory from the start; with
    `pin_text_tower` too (CUDA), in page-locked memory before they are drawn, so the draws cross to the host at
    DMA speed instead of through pageable staging, and no second copy packs them afterwards (Super's text tower
    is 64 GB). Same weights either way.
    """
    with torch.device("meta"):
        model = Cosmos3Transformer(cfg)
    for mod_name, module in model.named_modules():
        for pname, p in list(module._parameters.items()):
            if p is None:
                continue
            name = f"{mod_name}.{pname}" if mod_name else pname
            target = "cpu" if offload_text_tower and offload.is_text_param(name) else device
            keep = torch.float32 if name.startswith(Cosmos3Transformer.keep_fp32) else dtype
            module._parameters[pname] = nn.Parameter(torch.empty(p.shape, dtype=keep, device=target),
                                                     requires_grad=False)
    if offload_text_tower:  # page-locked (CUDA) before the draws fill it
        offload.offload_text_tower(model, pin=pin_text_tower, keep_values=False)
    init_random_(model, seed)
    model.eval().requires_grad_(False)
    if fuse:
        model.setup_buffers()
    return model


def official_config_dict(cfg: TransformerConfig) -> dict:
    d = {"_class_name": "Cosmos3OmniTransformer", "_diffusers_version": "0.42.1"}
    d.update(cfg.to_dict())
    return d


def save_transformer(model: Cosmos3Transformer, folder: str | Path) -> None:
    """Write `config.json` + `diffusion_pytorch_model.safetensors` under the official key names (unfused model)."""
    if any(layer.self_attn.fused for layer in model.layers):
        raise ValueError("save_transformer needs the unfused model (save before setup_buffers)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = folder / f".{WEIGHTS_STEM}.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.rename(folder / f"{WEIGHTS_STEM}.safetensors")
    (folder / "config.json").write_text(json.dumps(official_config_dict(model.cfg), indent=2) + "\n")
