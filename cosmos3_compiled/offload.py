"""The text tower's weights in host memory, streamed to the GPU one layer at a time for the text pass.

The text tower runs once per prompt, the video tower every step, so only the video tower has to stay on the
GPU: `offload_text_tower(model)` moves the text-only parameters to the host and installs a streamer as the
model's text-weight hook (`Cosmos3Transformer.text_weights`); `text_passes` calls its `enter(i)` / `leave(i)`
around layer i. With `pin`, the host copies are page-locked so the streamed copies overlap compute; why it is
done with `cudaHostRegister` on packed buffers rather than `Tensor.pin_memory`: docs/benchmarks/.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

_TEXT_ATTENTION = ("to_q", "to_k", "to_v", "to_out", "norm_q", "norm_k", "k_norm_und_for_gen")


def is_text_param(name: str) -> bool:
    """Parameters only the text tower reads (official key names); they may live in host memory."""
    if name.startswith("embed_tokens."):
        return True
    parts = name.split(".")
    if parts[0] != "layers":
        return False
    if parts[2] in ("mlp", "input_layernorm", "post_attention_layernorm"):
        return True
    return parts[2] == "self_attn" and parts[3] in _TEXT_ATTENTION


def text_params(model: nn.Module, prefix: str = "") -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if n.startswith(prefix) and is_text_param(n)]


def text_offloaded(model) -> bool:
    return model.embed_tokens.weight.device != model.device


def offload_text_tower(model, pin: bool = False, keep_values: bool = True,
                       buffers: "PinnedHostBuffers | None" = None) -> None:
    """Keep the text tower's weights in host memory; the text pass then holds at most two text layers on the
    GPU. pin: page-lock them (CUDA only), packed into one host buffer per dtype registered in place (those
    already page-locked stay where they are). keep_values=False: the parameters are about to be overwritten
    (seeded random weights drawn on the GPU), so the packed buffers are not filled from them; the draws' copies
    then land in page-locked memory directly. `buffers`: the page-locked buffers the weights were read into
    (`checkpoint_io.load_strict(pin_host=True)`), kept with the model as long as it lives."""
    pin = pin and model.device.type == "cuda"
    with torch.no_grad():
        for p in text_params(model):
            if p.device.type != "cpu":
                p.data = p.data.cpu()
    unpinned = {n: p for n, p in model.named_parameters() if is_text_param(n) and not p.data.is_pinned()} if pin else {}
    pinned = PinnedHostBuffers.holding(unpinned, keep_values) if unpinned else None
    if model.device.type != "cpu":
        previous = model.text_weights
        # the buffers must outlive every parameter that views them: the hook keeps them with the model
        keep = [b for b in (pinned, buffers) if b is not None]
        keep += getattr(previous, "pinned", [])
        model.text_weights = _TextWeightStreamer(model, model.device, keep)


class _TextWeightStreamer:
    """Brings an offloaded text tower's weights to the GPU one layer at a time for the text pass: while layer i
    computes, layer i + 1's host-to-device copies run on a side stream (pinned memory, so they overlap), and
    at most two layers' weights are resident."""

    def __init__(self, model, dev: torch.device, pinned: list["PinnedHostBuffers"]):
        self.params = [text_params(model, f"layers.{i}.") for i in range(len(model.layers))]
        self.dev = dev
        self.pinned = pinned
        self.stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        self.pending: dict[int, tuple[list[torch.Tensor], torch.cuda.Event | None]] = {}
        self.host: list[torch.Tensor] = []

    def _fetch(self, i: int) -> None:
        if i >= len(self.params) or i in self.pending:
            return
        if self.stream is None:
            self.pending[i] = ([p.data.to(self.dev) for p in self.params[i]], None)
            return
        with torch.cuda.stream(self.stream):
            data = [p.data.to(self.dev, non_blocking=True) for p in self.params[i]]
            done = torch.cuda.Event()
            done.record(self.stream)
        self.pending[i] = (data, done)

    def enter(self, i: int) -> None:
        """Layer i's weights on the device (waiting for their copies), and layer i + 1's copies started."""
        self._fetch(i)
        data, done = self.pending.pop(i)
        if done is not None:
            compute = torch.cuda.current_stream(self.dev)
            compute.wait_event(done)
            for t in data:
                t.record_stream(compute)  # allocated on the side stream, used on this one
        self.host = [p.data for p in self.params[i]]
        for p, t in zip(self.params[i], data):
            p.data = t
        self._fetch(i + 1)

    def leave(self, i: int) -> None:
        """Layer i's parameters point at host memory again (the device copies are freed once used)."""
        for p, h in zip(self.params[i], self.host):
            p.data = h
        self.host = []


class PinnedHostBuffers:
    """Host tensors packed into one buffer per dtype, page-locked in place with `cudaHostRegister` (one call, no
    pinned-allocator rounding), and unregistered before the buffers can be freed: the owner keeps this object
    exactly as long as the tensors that view the buffers. `specs`: name → (shape, dtype); `views[name]` is that
    tensor's place, uninitialized (a checkpoint's text tower is read straight into it: no second copy)."""

    ALIGN = 256  # bytes: each tensor starts on a DMA-friendly boundary

    def __init__(self, specs: Mapping[str, tuple[tuple[int, ...], torch.dtype]]):
        self.buffers: list[torch.Tensor] = []
        self.views: dict[str, torch.Tensor] = {}
        by_dtype: dict[torch.dtype, list[tuple[str, tuple[int, ...]]]] = {}
        for name, (shape, dtype) in specs.items():
            by_dtype.setdefault(dtype, []).append((name, tuple(shape)))
        cudart = torch.cuda.cudart()
        for dtype, group in by_dtype.items():
            step = max(1, self.ALIGN // dtype.itemsize)
            offsets, total = [], 0
            for _, shape in group:
                offsets.append(total)
                total += -(-math.prod(shape) // step) * step
            flat = torch.empty(total, dtype=dtype)
            err = cudart.cudaHostRegister(flat.data_ptr(), flat.numel() * flat.element_size(), 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of {flat.numel() * flat.element_size() / 2**30:.1f} GiB "
                                   f"of text-tower weights failed ({err})")
            self.buffers.append(flat)
            for (name, shape), off in zip(group, offsets):
                self.views[name] = flat[off : off + math.prod(shape)].view(shape)

    @classmethod
    def holding(cls, params: Mapping[str, nn.Parameter], keep_values: bool = True) -> "PinnedHostBuffers":
        """Move `params` (name → host parameter) into new page-locked buffers; keep_values=False leaves the
        values behind (the parameters are about to be overwritten)."""
        pinned = cls({n: (tuple(p.shape), p.dtype) for n, p in params.items()})
        with torch.no_grad():
            for n, p in params.items():
                if keep_values:
                    pinned.views[n].copy_(p.data)
                p.data = pinned.views[n]
        return pinned

    def __del__(self):
        if torch.cuda.is_initialized():
            cudart = torch.cuda.cudart()
            for flat in self.buffers:
                cudart.cudaHostUnregister(flat.data_ptr())
