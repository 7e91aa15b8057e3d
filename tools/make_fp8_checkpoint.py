"""Write a ModelOpt-FP8-format copy of an unquantized checkpoint folder (tests and benchmarks; no ModelOpt needed).

    python tools/make_fp8_checkpoint.py SRC DST [--no-step-policy] [--no-input-scales] [--seed 0]

Every decoder-layer linear gets an fp8 `weight` with a per-tensor `weight_scale` (amax|W| / 448) and an
`input_scale` (amax|x| / 448) calibrated on one text pass and three video steps of random inputs;
`transformer/config.json` gets the official `quantization_config` (with the shipped first/last-3 step policy
unless --no-step-policy: the distilled checkpoints' format), and a root `hf_quant_config.json` names the same.
Everything else (VAE, scheduler, tokenizer, excluded modules) is copied unchanged.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from cosmos3_compiled import fp8
from cosmos3_compiled.checkpoint import WEIGHTS_STEM, load_transformer
from cosmos3_compiled.checkpoint_io import load_tensors, weight_files


def _skip_transformer_weights(src: Path):
    """copytree's `ignore`: the transformer's weight files (written quantized below), nothing else; the VAE's
    weights carry the same file name stem."""
    tdir = (src / "transformer").resolve()

    def ignore(folder, names):
        return [n for n in names if n.startswith(WEIGHTS_STEM)] if Path(folder).resolve() == tdir else []

    return ignore


def make_fp8_checkpoint(src: Path, dst: Path, step_policy: bool = True, seed: int = 0,
                        input_scales: bool = True) -> Path:
    """`input_scales=False`: a weight-only export (no `input_scale`), which runs W8A16 only (tests)."""
    src, dst = Path(src), Path(dst)
    shutil.copytree(src, dst, dirs_exist_ok=True, ignore=_skip_transformer_weights(src))
    model = load_transformer(src / "transformer", dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.cfg.vocab_size, (16,), generator=gen)
    latents = torch.randn(1, model.cfg.latent_channel, 2, 4, 6, generator=gen)
    amax = fp8.calibrate_input_amax(model, ids, latents, (999, 500, 20), fps=16.0)
    state = load_tensors(weight_files(src / "transformer", WEIGHTS_STEM))
    quantized = fp8.quantize_state_dict(state, amax)
    if not input_scales:
        quantized = {k: v for k, v in quantized.items() if not k.endswith(".input_scale")}
    save_file({k: v.contiguous() for k, v in quantized.items()},
              str(dst / "transformer" / f"{WEIGHTS_STEM}.safetensors"), metadata={"format": "pt"})
    qc = fp8.default_quantization_config(step_policy)
    config = json.loads((src / "transformer" / "config.json").read_text())
    config["quantization_config"] = qc
    (dst / "transformer" / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    hf = {"producer": {"name": "modelopt"},
          "quantization": {"quant_algo": "FP8", "exclude_modules": qc["ignore"]}}
    (dst / "hf_quant_config.json").write_text(json.dumps(hf, indent=2) + "\n")
    return dst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", type=Path)
    parser.add_argument("dst", type=Path)
    parser.add_argument("--no-step-policy", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-input-scales", action="store_true", help="a weight-only export: W8A16 only")
    args = parser.parse_args()
    print(make_fp8_checkpoint(args.src, args.dst, not args.no_step_policy, args.seed, not args.no_input_scales))


if __name__ == "__main__":
    main()
