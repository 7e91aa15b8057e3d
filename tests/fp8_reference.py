"""Test helper (not a test file): what ModelOpt restores for a quantized linear, as far as diffusers 0.42.1
`pipelines/cosmos/mixed_precision.py` reads it, so the reference's own mixed W8A8/W8A16 runtime can switch a
diffusers transformer loaded with an FP8 checkpoint's tensors, and loaders for the dequantized checkpoint."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from cosmos3_compiled import fp8


class _Quantizer:
    def __init__(self, scale=None):
        self._scale = scale
        self.is_enabled = True


class ModelOptLinearStandIn(nn.Module):
    """fp8 `weight`, `weight_quantizer._scale`, enabled quantizers, `_should_run_real_quant_gemm`: what the
    reference checks before wrapping a linear. Its own forward is the native W8A8 path written independently of
    the package: quantise the input with its static scale, then the exact product of the dequantised operands in
    float64."""

    _should_run_real_quant_gemm = True

    def __init__(self, w8, w_scale, x_scale, bias):
        super().__init__()
        self.register_buffer("weight", w8)  # a buffer: the reference reads its activation dtype from parameters()
        self.bias = bias
        self.weight_quantizer, self.input_quantizer = _Quantizer(w_scale), _Quantizer(x_scale)

    def forward(self, x):
        s_in, s_w = self.input_quantizer._scale.double(), self.weight_quantizer._scale.double()
        x8 = torch.clamp(x.double() / s_in, -448.0, 448.0).to(torch.float8_e4m3fn)
        y = (x8.double() * s_in) @ (self.weight.double() * s_w).t()
        if self.bias is not None:
            y = y + self.bias.double()
        return y.to(x.dtype)


def reference_fp8(ref: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of the diffusers transformer `ref` whose quantized linears (those of `state` with a weight_scale)
    are ModelOpt stand-ins holding `state`'s fp8 weights and scales."""
    model = copy.deepcopy(ref)
    for name in fp8.quantized_modules(state):
        parent, _, leaf = name.rpartition(".")
        old = getattr(model.get_submodule(parent), leaf)
        setattr(model.get_submodule(parent), leaf, ModelOptLinearStandIn(
            state[f"{name}.weight"], state[f"{name}.weight_scale"], state[f"{name}.input_scale"], old.bias))
    return model


def transformer_state(folder: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted((Path(folder) / "transformer").glob("*.safetensors")):
        state.update(load_file(str(file)))
    return state


def write_dequantized(fp8_folder: Path, out: Path) -> Path:
    """A copy of an FP8 checkpoint folder with every quantized weight replaced by fp8 weight × weight_scale in
    float32, the scales dropped and no quantization_config: what the reference runs unquantized."""
    fp8_folder, out = Path(fp8_folder), Path(out)
    shutil.copytree(fp8_folder, out, ignore=shutil.ignore_patterns("hf_quant_config.json"))
    state = transformer_state(fp8_folder)
    deq = {k: v for k, v in state.items() if not k.endswith(fp8.SCALE_KEYS)}
    for name in fp8.quantized_modules(state):
        deq[f"{name}.weight"] = state[f"{name}.weight"].float() * state[f"{name}.weight_scale"].float()
    for file in (out / "transformer").glob("*.safetensors*"):
        file.unlink()
    save_file(deq, str(out / "transformer" / "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "transformer" / "config.json").read_text())
    config.pop("quantization_config")
    (out / "transformer" / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def make_fp8_tool():
    """tools/make_fp8_checkpoint.py as a module."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "tools" / "make_fp8_checkpoint.py"
    spec = importlib.util.spec_from_file_location("make_fp8_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
