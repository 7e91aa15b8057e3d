"""Scale-out on torch.distributed: process start-up under torchrun (or submitit), the rank layout, and the
collectives of CFG-parallel and Ulysses sequence-parallel generation.

Rank layout (world = replicas × cfg_size × ulysses, cfg_size = 2 with `parallel.cfg`, else 1; replicas > 1 only
with `parallel.shard=fsdp`, where every replica computes the same thing and only the weights are split):

    rank r → replica r // (cfg_size·ulysses), CFG branch (r // ulysses) % cfg_size (0 cond, 1 uncond),
             sequence shard r % ulysses
    Ulysses group of r: the `ulysses` ranks of its CFG branch;  CFG pair of r: the ranks of its shard

The layout is one `DeviceMesh` (replica × cfg × ulysses, `Parallel.mesh`): the CFG and Ulysses groups are its
dimensions' groups, and weight sharding (`sharding.py`, FSDP2) uses it flattened over every rank.

Every collective is a traceable functional collective (`torch.distributed._functional_collectives`), so
the compiled video step (fullgraph) keeps them in its graph instead of breaking around them.

Every rank keeps the full latents and runs the identical fp32 CFG combine and scheduler update, so no
rank ever needs the others' latents: per step the only traffic is 2 all-to-alls per layer (Ulysses),
one token all-gather at the end of the video step (Ulysses) and one velocity all-gather (CFG).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from einops import rearrange
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from . import ops
from .errors import RequestError

RUN_STAMP_KEY = "cosmos3/run_stamp"


ParallelError = RequestError  # the one user-error type (errors.py)


# ---- process environment ------------------------------------------------------------------------


def adopt_launcher_env() -> None:
    """Under submitit (Hydra's submitit launchers) export RANK / WORLD_SIZE / LOCAL_RANK / MASTER_* from the
    job environment, as torchrun would have set them. No-op under torchrun or a single process."""
    if "RANK" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    from submitit.helpers import TorchDistributedEnvironment

    # every task sees every GPU and picks cuda:LOCAL_RANK itself (see `select_device`)
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def world_size() -> int:
    """Processes in the job: the live process group's size, else WORLD_SIZE (torchrun), else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """Global rank: the live process group's, else RANK (torchrun), else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_writer() -> bool:
    """Only global rank 0 writes outputs (video, frames, metrics)."""
    return rank() == 0


def select_device(kind: str) -> torch.device:
    """cuda:LOCAL_RANK (made current) on GPU, the CPU otherwise."""
    if kind == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
        return device
    return torch.device(kind)


_store: dist.Store | None = None
_generation = 0  # process groups created so far in this process (sweeps run several jobs in one)


def rendezvous_store() -> dist.Store:
    """The env:// key-value store of this job (torchrun's agent store, or rank 0's), created once per process."""
    global _store
    if _store is None:
        _store, _, _ = next(dist.rendezvous("env://"))
    return _store


def agree_run_dir(argv: list[str]) -> list[str]:
    """Hydra overrides that give every rank rank 0's run directory.

    Under torchrun every rank runs the Hydra app, and Hydra's default run directory is a timestamp taken by
    each process. Rank 0 publishes its timestamp through the job's store and every rank appends
    `hydra.run.dir=outputs/<stamp>` and `hydra.sweep.dir=multirun/<stamp>` (Hydra's default layout), unless
    the command line already names them. Ranks other than 0 also skip Hydra's `.hydra/` copy of the config.
    """
    if world_size() <= 1:
        return argv
    extra = []
    named = {a.split("=", 1)[0].lstrip("+") for a in argv if "=" in a}
    if not {"hydra.run.dir", "hydra.sweep.dir"} <= named:
        store = rendezvous_store()
        if rank() == 0:
            store.set(RUN_STAMP_KEY, datetime.now().strftime("%Y-%m-%d/%H-%M-%S"))
        stamp = store.get(RUN_STAMP_KEY).decode()
        if "hydra.run.dir" not in named:
            extra.append(f"hydra.run.dir=outputs/{stamp}")
        if "hydra.sweep.dir" not in named:
            extra.append(f"hydra.sweep.dir=multirun/{stamp}")
    if rank() != 0 and "hydra.output_subdir" not in named:
        extra.append("hydra.output_subdir=null")
    return [*argv, *extra]


# ---- collectives ------------------------------------------------------------------------------


def _plain(t: torch.Tensor) -> torch.Tensor:
    """Wait for an eager functional collective and return a plain tensor. Left as an AsyncCollectiveTensor,
    its subclass type would reach einops, whose per-type backend cache grows, and compiled regions guard on
    that cache's size: the next step would recompile. Traced collectives are plain tensors already."""
    return t.wait() if isinstance(t, fc.AsyncCollectiveTensor) else t


def all_gather(x: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every rank's `x` along dim 0 (group-rank order); traceable."""
    gather = getattr(fc, "all_gather_single", None) or fc.all_gather_tensor  # the new name from torch 2.12
    return _plain(gather(x.contiguous(), 0, group))


def all_to_all(x: torch.Tensor, group) -> torch.Tensor:
    """Chunk j of dim 0 goes to group rank j; chunk i of the result came from group rank i; traceable."""
    return _plain(fc.all_to_all_single(x.contiguous(), None, None, group))


def all_reduce(x: torch.Tensor, group, op: str = "sum") -> torch.Tensor:
    return _plain(fc.all_reduce(x, op, group))


@dataclass
class Ulysses:
    """Ulysses sequence parallelism over `degree` ranks: each rank holds ⌈N/degree⌉ video tokens through the
    layers; attention sees all N tokens for 1/degree of the heads (head shards by contiguous blocks, so
    GQA query head h still reads kv head h // groups of the same rank).

    When the degree does not divide N the token axis is zero-padded to a multiple of it: padded rows run
    through the layers as queries whose outputs are dropped, but never as keys or values (the K/V buffers
    get exactly the N real tokens), so the real tokens' results do not change.

    It is the model's token hook (`Cosmos3Transformer.tokens`: shard before the layers, gather after) and,
    through `UlyssesAttention`, trades token shards for head shards around each attention call.
    """

    degree: int
    rank: int  # within the group
    group: object  # ProcessGroup of the `degree` ranks
    tokens: int = 0  # N, the real video tokens (set by `setup_tokens` before the first step)

    @property
    def padded(self) -> int:
        return -(-self.tokens // self.degree) * self.degree

    def setup_tokens(self, n: int) -> None:
        """Record the video token count N of the branches about to be set up (the same for every branch)."""
        self.tokens = n

    def check_heads(self, kv_heads: int) -> None:
        if kv_heads % self.degree:
            raise ParallelError(
                f"Ulysses degree {self.degree} must divide the model's {kv_heads} key/value heads; "
                f"use parallel.ulysses in {[d for d in range(1, kv_heads + 1) if kv_heads % d == 0]}"
            )

    def shard_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous block of the (zero-padded) token axis: [N, ...] → [⌈N/deg⌉, ...]."""
        if self.padded != x.shape[0]:
            x = torch.cat([x, x.new_zeros((self.padded - x.shape[0], *x.shape[1:]))])
        n = self.padded // self.degree
        return x[self.rank * n : (self.rank + 1) * n].contiguous()  # RoPE tables come with transposed strides

    def shard_heads(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's contiguous block of heads along `dim`."""
        h = x.shape[dim] // self.degree
        return x.narrow(dim, self.rank * h, h)

    def gather_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[⌈N/deg⌉, ...] on every rank → the N real tokens [N, ...] everywhere."""
        return all_gather(x, self.group)[: self.tokens]

    def scatter_heads(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Sequence shards → head shards for q [n, Hq, D], k/v [n, Hkv, D], in ONE all-to-all:
        → q [N_pad, Hq/deg, D] (padded queries included), k/v [N, Hkv/deg, D] (real tokens only)."""
        g = self.degree
        hq, hkv = q.shape[1] // g, k.shape[1] // g
        parts = [rearrange(t, "n (g h) d -> g n h d", g=g) for t in (q, k, v)]
        x = torch.cat(parts, dim=2)  # [g, n, hq + 2·hkv, D]: block j is rank j's heads
        y = all_to_all(x, self.group)  # [g, n, hq + 2·hkv, D]: block i is rank i's tokens
        y = y.view(-1, hq + 2 * hkv, y.shape[-1])  # [N_pad, hq + 2·hkv, D]
        n = self.tokens
        return y[:, :hq], y[:n, hq : hq + hkv], y[:n, hq + hkv :]

    def gather_heads(self, out: torch.Tensor) -> torch.Tensor:
        """Inverse of `scatter_heads` for the attention output: [N_pad, Hq/deg·D] → [n, Hq·D] (head order)."""
        g = self.degree
        x = out.reshape(g, out.shape[0] // g, out.shape[1])  # block j: rank j's tokens
        y = all_to_all(x, self.group)  # block i: rank i's heads for our tokens
        return rearrange(y, "g n e -> n (g e)")


@dataclass
class Parallel:
    """This process's place in the job and the groups it talks to."""

    rank: int
    world_size: int
    device: torch.device
    backend: str
    cfg_size: int  # 2 with CFG parallelism, else 1
    cfg_rank: int  # 0 → this rank runs the cond branch, 1 → the uncond branch
    cfg_group: object | None  # the cfg_size ranks holding the same sequence shard (None without CFG parallelism)
    ulysses: Ulysses | None
    vae_rows: bool = False  # the VAE decode is split by rows over every rank (`apply_row_parallel_decode`)
    mesh: DeviceMesh | None = None  # replica × cfg × ulysses, every rank of the job
    shard: str = "none"  # weight sharding of the video tower: "none" | "fsdp" (sharding.py, over every rank)
    replicas: int = 1  # groups of ranks that compute the same thing (> 1 only when sharding)

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def gather_cfg(self, velocity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One all-gather: this rank's branch velocity → (cond, uncond), identical on every rank."""
        both = all_gather(velocity, self.cfg_group)  # [2, C, T, h, w] from [1, C, T, h, w]
        return both[:1], both[1:]

    def describe(self) -> dict:
        out = {"world_size": self.world_size, "backend": self.backend, "cfg": self.cfg_size == 2,
               "ulysses": self.ulysses.degree if self.ulysses else 1, "vae_rows": self.vae_rows}
        if self.shard != "none":
            out.update(shard=self.shard, replicas=self.replicas)
        return out


def layout(cfg_parallel: bool, ulysses: int, world: int, shard: bool = False) -> tuple[int, int]:
    """(cfg_size, ulysses degree) for the config and world size; ulysses 0 means all remaining ranks. With
    `shard` (weight sharding) the world may be a multiple of cfg_size × degree: the replicas (`replicas`)."""
    cfg_size = 2 if cfg_parallel else 1
    degree = ulysses if ulysses > 0 else max(1, world // cfg_size)
    if ulysses < 0:
        raise ParallelError(f"parallel.ulysses must be >= 0 (0 = world size / CFG ranks), got {ulysses}")
    if shard and world % (cfg_size * degree) == 0:
        return cfg_size, degree
    if cfg_size * degree != world:
        need = cfg_size * degree
        what = " × ".join((["2 (cfg)"] if cfg_parallel else []) + [f"{degree} (ulysses)"])
        raise ParallelError(
            f"parallel layout {what} needs {need} processes but the job has {world}; launch with "
            f"`torchrun --nproc-per-node {need} -m cosmos3_compiled.cli ...` or pick parallel=cfg|ulysses|cfg_ulysses"
        )
    return cfg_size, degree


def shard_mode(parallel_cfg) -> str:
    """parallel.shard as a string ("none" | "fsdp")."""
    mode = getattr(parallel_cfg, "shard", "none")
    return str(getattr(mode, "value", mode) or "none")


def is_parallel(parallel_cfg) -> bool:
    """Whether the config asks for more than one process (or runs under a multi-process launcher)."""
    return (bool(parallel_cfg.cfg) or int(parallel_cfg.ulysses) != 1 or shard_mode(parallel_cfg) != "none"
            or world_size() > 1)


def resolve_backend(backend: str | None, device_kind: str) -> str:
    """parallel.backend, or (null) the one that follows the device: nccl on CUDA, gloo on the CPU."""
    backend = backend or ("nccl" if device_kind == "cuda" else "gloo")
    check_backend(backend, device_kind)
    return backend


def check_backend(backend: str, device_kind: str) -> None:
    if backend == "nccl" and device_kind != "cuda":
        raise ParallelError("parallel.backend=nccl needs device=cuda; use parallel.backend=gloo on the CPU")
    if backend not in ("nccl", "gloo"):
        raise ParallelError(f"parallel.backend must be nccl or gloo, got {backend!r}")


def init_parallel(parallel_cfg, device_kind: str) -> Parallel | None:
    """Start torch.distributed from the launcher's environment and build the CFG / Ulysses groups.

    Returns None for a single process with parallel=none. Raises ParallelError (before any collective)
    when the layout and the world size disagree. Pair with `teardown`.
    """
    global _generation
    adopt_launcher_env()
    world = world_size()
    if not is_parallel(parallel_cfg):
        return None
    shard = shard_mode(parallel_cfg)
    if world <= 1 and "WORLD_SIZE" not in os.environ:
        need = (2 if parallel_cfg.cfg else 1) * max(1, int(parallel_cfg.ulysses))
        what = "parallel.shard=fsdp" if shard != "none" and need == 1 else "parallel=cfg/ulysses"
        raise ParallelError(
            f"{what} needs several processes; launch with "
            f"`torchrun --nproc-per-node {max(need, 2)} -m cosmos3_compiled.cli ...`"
        )
    cfg_size, degree = layout(bool(parallel_cfg.cfg), int(parallel_cfg.ulysses), world, shard=shard != "none")
    replicas = world // (cfg_size * degree)
    backend = resolve_backend(parallel_cfg.backend, device_kind)
    device = select_device(device_kind)
    if not dist.is_initialized():
        store = dist.PrefixStore(f"cosmos3_pg{_generation}/", rendezvous_store())
        _generation += 1
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, store=store, rank=rank(), world_size=world, **kwargs)
    r = dist.get_rank()
    cfg_rank, seq_shard = divmod(r % (cfg_size * degree), degree)
    # one mesh; its dimensions' groups are the Ulysses groups (a branch's ranks) and the CFG pairs (a shard's)
    mesh = init_device_mesh(device.type, (replicas, cfg_size, degree), mesh_dim_names=("replica", "cfg", "ulysses"))
    sp_group = mesh.get_group("ulysses") if degree > 1 else None
    cfg_group = mesh.get_group("cfg") if cfg_size > 1 else None
    ulysses = Ulysses(degree, seq_shard, sp_group) if degree > 1 else None
    return Parallel(r, world, device, backend, cfg_size, cfg_rank, cfg_group, ulysses, mesh=mesh, shard=shard,
                    replicas=replicas)


def teardown(par: Parallel | None, barrier: bool = True) -> None:
    """Destroy the process groups (after a barrier, so no rank leaves while another still talks)."""
    if par is None or not dist.is_initialized():
        return
    try:
        if barrier:
            try:
                dist.barrier()
            except RuntimeError as err:  # e.g. gloo "Connection closed by peer": that rank failed and left
                raise RuntimeError(
                    f"rank {par.rank}: another rank left before the end-of-job barrier (it failed; the cause is "
                    f"in that rank's own log, not here): {err}") from err
    finally:
        dist.destroy_process_group()


class UlyssesAttention:
    """An attention path (see `attention.AttentionPath`) run Ulysses-style around `inner`: the video tower's
    queries, keys and values trade token shards for head shards in one all-to-all, `inner` attends over the
    whole sequence for this rank's heads, and one all-to-all trades the output back. The K/V buffers hold this
    rank's Hkv/deg heads for all L + N positions. The text tower runs whole on every rank (it is cheap and
    replicated), so its attention is `inner`'s, and each rank keeps its own heads of the text keys/values."""

    fuses_prologue = False  # the fused kernel writes local keys into the buffers; here they cross ranks first

    def __init__(self, inner, ulysses: Ulysses):
        self.inner, self.ulysses = inner, ulysses
        self.name = f"{inner.name} (ulysses {ulysses.degree})"
        self.head_major_queries = inner.head_major_queries

    @property
    def fp8(self) -> bool:  # the FP8-attention switch (fp8.set_step_regime) belongs to the kernel inside
        return self.inner.fp8

    @fp8.setter
    def fp8(self, on: bool) -> None:
        self.inner.fp8 = on

    def new_kv_buffer(self, tokens: int, heads: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        return self.inner.new_kv_buffer(tokens, heads // self.ulysses.degree, dim, device, dtype)

    def new_queries(self, tokens: int, heads: int, dim: int, like: torch.Tensor) -> torch.Tensor:
        return self.inner.new_queries(tokens, heads, dim, like)

    def text_kv(self, k_buf: torch.Tensor, v_buf: torch.Tensor, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every kv head's text keys/values ([L, Hkv, D] views of head-major storage), kept in `keep_text_kv`."""
        full = (k_buf.shape[0] * self.ulysses.degree, text_len, k_buf.shape[2])
        return (k_buf.new_empty(full).transpose(0, 1), v_buf.new_empty(full).transpose(0, 1))

    def keep_text_kv(self, k_buf: torch.Tensor, v_buf: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        text_len = k.shape[0]
        k_buf[:, :text_len] = self.ulysses.shard_heads(k, dim=1).transpose(0, 1)
        v_buf[:, :text_len] = self.ulysses.shard_heads(v, dim=1).transpose(0, 1)

    def video_step(
        self, qk: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_buf: torch.Tensor,
        v_buf: torch.Tensor,
    ) -> torch.Tensor:
        """qk [n, Hq+Hkv, D] (normed) and v [n, Hkv, D] of this rank's n = ⌈N/deg⌉ tokens → [n, Hq·D]."""
        hq = qk.shape[1] - k_buf.shape[0] * self.ulysses.degree
        q = ops.apply_rope(qk[:, :hq], cos, sin)  # [n, Hq, D]
        k = ops.apply_rope(qk[:, hq:], cos, sin)  # [n, Hkv, D]
        q, k, v = self.ulysses.scatter_heads(q, k, v)  # [N_pad, Hq/deg, D], [N, Hkv/deg, D] ×2
        start = k_buf.shape[1] - k.shape[0]
        k_buf[:, start:] = k.transpose(0, 1)
        v_buf[:, start:] = v.transpose(0, 1)
        return self.ulysses.gather_heads(self.inner(q.transpose(0, 1), k_buf, v_buf, False))

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
        return self.inner(q, k, v, causal)


def apply_sequence_parallel(model, ulysses: Ulysses | None) -> None:
    """Wrap the model's attention path in `UlyssesAttention` and make `ulysses` its token hook; None restores
    one device. Call it after `set_attention_backend` and before `setup_branch` (it sets the buffer heads)."""
    path = getattr(model.attention, "inner", model.attention)
    if ulysses is None:
        model.set_attention(path)
        model.tokens = model.local_tokens
        return
    ulysses.check_heads(model.cfg.num_key_value_heads)
    model.set_attention(UlyssesAttention(path, ulysses))
    model.tokens = ulysses


# ---- height-parallel VAE decode ---------------------------------------------------------------------


def apply_row_parallel_decode(vae, par: Parallel):
    """Split the VAE decode by rows over every rank of the job (see `WanVAE.setup_row_parallel`): returns its
    `RowSplit`, or None when there is one rank. Any order with `apply_compile_vae`: the split calls the units."""
    if par is None or par.world_size < 2:
        return None
    par.vae_rows = True
    return vae.setup_row_parallel(par.rank, par.world_size, lambda x: all_gather(x, dist.group.WORLD))
