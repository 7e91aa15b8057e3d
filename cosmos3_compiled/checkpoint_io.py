"""Safetensors-only reading of official (diffusers-layout) component folders, and strict assignment."""

from __future__ import annotations

from .errors import RequestError

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


CheckpointError = RequestError  # the one user-error type (errors.py)


def read_json(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing {path}: expected a diffusers-layout component folder")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err})") from None


def _check_header(path: Path) -> None:
    """Validate the safetensors header cheaply (8-byte length + JSON) so corruption fails before any load."""
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{path} is not a safetensors file (only {size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n <= 1 or 8 + n > size:
            raise CheckpointError(f"{path} has a corrupt safetensors header (header length {n}, file {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise CheckpointError(f"{path} has a corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path} has a corrupt safetensors header")


def weight_files(folder: Path, stem: str = "diffusion_pytorch_model") -> list[Path]:
    """The safetensors files of one component: a single file, or the shards named by `<stem>.safetensors.index.json`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"missing checkpoint subfolder {folder}")
    single = folder / f"{stem}.safetensors"
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no weight_map")
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [str(p.name) for p in files if not p.is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shard(s) named in {index.name} are missing: {', '.join(missing)}")
    elif single.is_file():
        files = [single]
    else:
        pickles = [p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES]
        if pickles:
            raise CheckpointError(
                f"{folder} holds only pickle weights ({', '.join(pickles)}); refusing to unpickle. "
                "Convert them to safetensors first."
            )
        raise CheckpointError(f"{folder} has no {single.name} or {index.name}")
    for f in files:
        _check_header(f)
    return files


def load_tensors(files: list[Path], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read every tensor of `files` (safetensors only) onto `device`."""
    out: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for key in f.keys():
                    if key in out:
                        raise CheckpointError(f"tensor {key!r} appears in more than one shard ({path.name})")
                    out[key] = f.get_tensor(key)
        except CheckpointError:
            raise
        except Exception as err:  # safetensors raises its own error types for truncated data
            raise CheckpointError(f"cannot read {path}: {err}") from None
    return out


def assign_strict(
    module: torch.nn.Module,
    state: dict[str, torch.Tensor],
    dtype: torch.dtype | None,
    ignore: frozenset[str] = frozenset(),
    keep_fp32: tuple[str, ...] = (),
    where: str = "checkpoint",
) -> None:
    """Assign `state` into `module` (built on the meta device) without copying twice.

    Every parameter and persistent buffer must be present with the right shape; keys in `ignore`
    may be present and are dropped; anything else is an error. All problems are reported at once.
    Tensors are cast to `dtype` (None keeps the file's dtype) except names starting with `keep_fp32`.
    """
    expected = {k: v for k, v in module.state_dict(keep_vars=True).items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected) - set(ignore))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or mismatched:
        lines = [f"{where} does not match the model config:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}")
        if unexpected:
            lines.append(
                f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}{' ...' if len(unexpected) > 20 else ''}"
            )
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): " + "; ".join(mismatched[:20]))
        raise CheckpointError("\n".join(lines))
    cast = {}
    for k in expected:
        t = state[k]
        if t.is_floating_point():
            target = torch.float32 if k.startswith(keep_fp32) else (dtype or t.dtype)
            t = t.to(target)
        cast[k] = t
    module.load_state_dict(cast, strict=True, assign=True)
