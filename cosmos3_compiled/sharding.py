"""Weight sharding of the video tower on PyTorch's own FSDP2 (`torch.distributed.fsdp.fully_shard`), inference only.

Every `Cosmos3Layer` is one FSDP unit and the root (proj_in / proj_out / norm_moe_gen / time_embedder) another:
each rank keeps 1/world of every video-tower weight (dim-0 shards, `DTensor`s) and a layer's full weights exist
only while that layer runs (`reshard_after_forward=True`, no gradients). The all-gather of layer i + 1 is
issued from layer i's pre-forward (`set_modules_to_forward_prefetch`), so it runs under layer i's compute on
GPUs (FSDP2's all-gather stream); the default implicit prefetch would only issue it when the CPU reaches
layer i + 1.

What is sharded, over which ranks:
- the video tower only (the parameters the video step reads). The text tower is left as today: replicated on
  every rank, or in host memory and streamed per layer with `compile.offload_text_tower` (its parameters are
  FSDP `ignored_params`; the text pass, `Cosmos3Layer.text_forward`, is not an FSDP forward method, so it never
  all-gathers video weights).
- over every rank of the job: the job's one `DeviceMesh` (replica × cfg × ulysses, `Parallel.mesh`) flattened
  into one "shard" dimension. The CFG branches and Ulysses shards of a step run the same layer at the same
  time, so one all-gather over all ranks serves them all, and Super's 32 B video tower costs 64 GB / world in
  bf16 per rank. (HSDP, replicate over "cfg" and shard over "ulysses", would be `mesh["cfg", "ulysses"]`
  handed to fully_shard as a 2-D mesh; with parallel=cfg alone it would not shard at all, so it is not offered.)

Shard after fusion: `setup_buffers` (q|k|v and gate|up fused, per-head q/k norm weights as a plain buffer)
runs at load, before this; the fused linears are what FSDP shards, and the static buffer stays a replicated
plain tensor (it is rebuilt only from unsharded weights). Compile: regional, per layer (FSDP2's documented
scheme: the layer compiles fullgraph, FSDP's hooks run eagerly around it); CUDA-graph capture of FSDP's
collectives is not supported (`compile=cudagraph` is refused with `parallel.shard=fsdp`).
"""

from __future__ import annotations

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard, register_fsdp_forward_method

from . import offload
from .errors import RequestError

SHARD_MODES = ("none", "fsdp")


def check_compile(shard: str, mode: str, scope: str) -> None:
    """One-line `RequestError` for compile settings that cannot run over FSDP2-sharded layers."""
    if shard != "fsdp":
        return
    if mode == "cudagraph":
        raise RequestError("compile=cudagraph captures the whole step in one CUDA graph, which FSDP's all-gathers "
                           "cannot be part of: use compile=default (per-layer graphs) with parallel.shard=fsdp")
    if scope == "full" and mode != "eager":
        raise RequestError("compile.scope=full would trace FSDP's hooks (dynamo runs them eagerly, a graph break): "
                           "use compile.scope=blocks with parallel.shard=fsdp")


def shard_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The job's mesh flattened into one dimension over every rank ("shard")."""
    return mesh if mesh.ndim == 1 else mesh._flatten("shard")


def apply_fsdp(model, mesh: DeviceMesh, prefetch: bool = True) -> None:
    """Shard the video tower of `model` (fused, buffers set up) over every rank of `mesh` with FSDP2."""
    names = {id(p): n for n, p in model.named_parameters()}
    text = {p for p in model.parameters() if offload.is_text_param(names[id(p)])}
    flat = shard_mesh(mesh)
    for layer in model.layers:
        fully_shard(layer, mesh=flat, reshard_after_forward=True,
                    ignored_params={p for p in layer.parameters() if p in text})
    fully_shard(model, mesh=flat, reshard_after_forward=True, ignored_params=text)
    register_fsdp_forward_method(model, "forward_batched")  # model.batch_cfg's step: the root's weights too
    if prefetch:
        for layer, nxt in zip(model.layers, model.layers[1:]):
            layer.set_modules_to_forward_prefetch([nxt])


def is_sharded(model) -> bool:
    return isinstance(model, FSDPModule)


def local_bytes(model) -> int:
    """Bytes of parameters this rank holds (sharded ones: its shard only)."""
    total = 0
    for p in model.parameters():
        t = p.to_local() if hasattr(p, "to_local") else p
        total += t.numel() * t.element_size()
    return total


__all__ = ["SHARD_MODES", "check_compile", "apply_fsdp", "shard_mesh", "is_sharded", "local_bytes"]
