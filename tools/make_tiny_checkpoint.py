#!/usr/bin/env python3
"""Write the embedded default model as an official-layout (diffusers) checkpoint folder, fp32 safetensors.

Running `cosmos3-generate checkpoint=<folder>` on the result gives the same frames (same sha256) as the
embedded default with `model=<preset> model.init_seed=<seed>` and no checkpoint.

`--distilled` writes the few-step distilled checkpoints' scheduler instead (Cosmos3-Super-*-4Step: a
FlowMatchEulerDiscreteScheduler on a fixed 4-step schedule, scheduler_config.json as shipped); the same weights then
run 4 steps with guidance 1.

`--sound` writes a sound-capable checkpoint (for `sound=true`): the transformer gets its audio head (`sound_gen: true`,
`sound_dim` 16; every other weight the same draw as without it, so runs without sound=true are unchanged) and a tiny
`sound_tokenizer/` (`audio.TINY`: 8 kHz stereo, 25 latent frames per second) saved by diffusers' own
`Cosmos3AVAEAudioTokenizer` class with seeded weights, weight-normalised convolutions as shipped. Needs diffusers.

`--action` writes an action-capable checkpoint (for `action.mode=...`): the transformer gets its action head
(`action_gen: true`, `action_dim` 16, 32 embodiment domains; every other weight the same draw as without it).

Example: python tools/make_tiny_checkpoint.py /tmp/cosmos3-debug --preset debug --seed 0
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]

PRESETS = ("debug", "debug_edge")
TINY_ACTION_DIM = 16  # wider than the tiny domains used in tests (bridge: 10), narrower than hand_pose (57)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("output", type=Path, help="checkpoint folder to write (created; must be empty or absent)")
    ap.add_argument("--preset", choices=PRESETS, default="debug", help="tiny model size (default: debug)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the random weights = model.init_seed (default: 0)")
    ap.add_argument("--distilled", action="store_true",
                    help="the distilled 4-step checkpoints' scheduler (FlowMatchEuler, fixed schedule) instead of UniPC")
    ap.add_argument("--sound", action="store_true",
                    help="a sound-capable checkpoint: audio head (sound_gen: true) and a tiny sound_tokenizer/ (diffusers)")
    ap.add_argument("--action", action="store_true",
                    help="an action-capable checkpoint: the action head (action_gen: true, action_dim 16)")
    args = ap.parse_args(argv)
    if args.output.exists() and (not args.output.is_dir() or any(args.output.iterdir())):
        ap.error(f"{args.output} exists and is not an empty folder; pick a new path")

    from cosmos3_compiled.components import write_checkpoint  # noqa: E402  (after argparse: --help stays fast)

    from cosmos3_compiled.audio import TINY  # noqa: E402

    folder = write_checkpoint(args.output, name=args.preset, seed=args.seed, distilled=args.distilled,
                              sound_dim=TINY.latent_dim if args.sound else 0,
                              action_dim=TINY_ACTION_DIM if args.action else 0)
    if args.sound:
        write_sound_tokenizer(folder / "sound_tokenizer", TINY, seed=args.seed + 2)
    kind = (", distilled 4-step scheduler" if args.distilled else "") + (", with sound" if args.sound else "")
    kind += ", with the action head" if args.action else ""
    print(f"wrote {args.preset} (seed {args.seed}{kind}) to {folder}")
    return folder


def write_sound_tokenizer(folder: Path, cfg, seed: int) -> Path:
    """diffusers' Cosmos3AVAEAudioTokenizer (decoder only) at `cfg`'s size, saved with its own save_pretrained: torch's
    default initialisation under `seed`, Snake parameters log-scale N(0, 0.1²), and every convolution's weight norm
    but the last one's scaled by 0.6 (a random Snake stack at full gain saturates the [-1, 1] clamp)."""
    import torch
    from diffusers import Cosmos3AVAEAudioTokenizer

    torch.manual_seed(seed)
    tok = Cosmos3AVAEAudioTokenizer(**cfg.to_dict(), encoder_enabled=False).float()
    with torch.no_grad():
        for name, module in tok.decoder.named_modules():
            if hasattr(module, "weight_g") and name != "conv2":
                module.weight_g.mul_(0.6)
        for name, p in tok.decoder.named_parameters():
            if name.endswith(("alpha", "beta")):
                p.normal_(0.0, 0.1)
    tok.save_pretrained(folder, safe_serialization=True)
    return folder


if __name__ == "__main__":
    main()
