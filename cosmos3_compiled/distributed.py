"""Scale-out on torch.distributed: process start-up under torchrun (or submitit), the rank layout, and the
collectives of CFG-parallel and Ulysses sequence-parallel generation.

Rank layout (world = cfg_size × ulysses, cfg_size = 2 with `parallel.cfg`, else 1):

    rank r → CFG branch r // ulysses (0 cond, 1 uncond), sequence shard r % ulysses
    Ulysses group of r: the `ulysses` ranks of its CFG branch;  CFG pair of r: the ranks of its shard

Every collective is a traceable functional collective (`torch.distributed._functional_collectives`), so
the compiled video step (fullgraph) keeps them in its graph instead of breaking around them.

Every rank keeps the full latents and runs the identical fp32 CFG combine and scheduler update, so no
rank ever needs the others' latents: per step the only traffic is 2 all-to-alls per layer (Ulysses),
one token all-gather at the end of the video step (Ulysses) and one velocity all-gather (CFG).
"""

from __future__ import annotations

from .errors import RequestError

import os
from dataclasses import dataclass
from datetime import datetime

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc
from einops import rearrange

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

    The model calls these between its own ops (model.Cosmos3Layer.forward / Cosmos3Transformer.forward).
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
        return x[self.rank * n : (self.rank + 1) * n]

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

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def gather_cfg(self, velocity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One all-gather: this rank's branch velocity → (cond, uncond), identical on every rank."""
        both = all_gather(velocity, self.cfg_group)  # [2, C, T, h, w] from [1, C, T, h, w]
        return both[:1], both[1:]

    vae_rows: bool = False  # the VAE decode is split by rows over every rank (RowParallelDecode)

    def describe(self) -> dict:
        return {"world_size": self.world_size, "backend": self.backend, "cfg": self.cfg_size == 2,
                "ulysses": self.ulysses.degree if self.ulysses else 1, "vae_rows": self.vae_rows}


def layout(cfg_parallel: bool, ulysses: int, world: int) -> tuple[int, int]:
    """(cfg_size, ulysses degree) for the config and world size; ulysses 0 means all remaining ranks."""
    cfg_size = 2 if cfg_parallel else 1
    degree = ulysses if ulysses > 0 else max(1, world // cfg_size)
    if ulysses < 0:
        raise ParallelError(f"parallel.ulysses must be >= 0 (0 = world size / CFG ranks), got {ulysses}")
    if cfg_size * degree != world:
        need = cfg_size * degree
        what = " × ".join((["2 (cfg)"] if cfg_parallel else []) + [f"{degree} (ulysses)"])
        raise ParallelError(
            f"parallel layout {what} needs {need} processes but the job has {world}; launch with "
            f"`torchrun --nproc-per-node {need} -m cosmos3_compiled.cli ...` or pick parallel=cfg|ulysses|cfg_ulysses"
        )
    return cfg_size, degree


def is_parallel(parallel_cfg) -> bool:
    """Whether the config asks for more than one process (or runs under a multi-process launcher)."""
    return bool(parallel_cfg.cfg) or int(parallel_cfg.ulysses) != 1 or world_size() > 1


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
    if world <= 1 and "WORLD_SIZE" not in os.environ:
        need = (2 if parallel_cfg.cfg else 1) * max(1, int(parallel_cfg.ulysses))
        raise ParallelError(
            f"parallel=cfg/ulysses needs several processes; launch with "
            f"`torchrun --nproc-per-node {max(need, 2)} -m cosmos3_compiled.cli ...`"
        )
    cfg_size, degree = layout(bool(parallel_cfg.cfg), int(parallel_cfg.ulysses), world)
    backend = str(parallel_cfg.backend)
    check_backend(backend, device_kind)
    device = select_device(device_kind)
    if not dist.is_initialized():
        store = dist.PrefixStore(f"cosmos3_pg{_generation}/", rendezvous_store())
        _generation += 1
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, store=store, rank=rank(), world_size=world, **kwargs)
    r = dist.get_rank()
    cfg_rank, shard = divmod(r, degree)
    ulysses_groups = [[c * degree + i for i in range(degree)] for c in range(cfg_size)]
    cfg_groups = [[c * degree + i for c in range(cfg_size)] for i in range(degree)]
    # every rank creates every group, in the same order (a torch.distributed requirement)
    sp_group = cfg_group = None
    for ranks in ulysses_groups:
        g = dist.new_group(ranks) if degree > 1 else None
        if r in ranks:
            sp_group = g
    for ranks in cfg_groups:
        g = dist.new_group(ranks) if cfg_size > 1 else None
        if r in ranks:
            cfg_group = g
    ulysses = Ulysses(degree, shard, sp_group) if degree > 1 else None
    return Parallel(r, world, device, backend, cfg_size, cfg_rank, cfg_group, ulysses)


def teardown(par: Parallel | None, barrier: bool = True) -> None:
    """Destroy the process groups (after a barrier, so no rank leaves while another still talks)."""
    if par is None or not dist.is_initialized():
        return
    if barrier:
        dist.barrier()
    dist.destroy_process_group()


def apply_sequence_parallel(model, ulysses: Ulysses | None) -> None:
    """Give the transformer (and each layer's attention path) the Ulysses object; None restores one device."""
    if ulysses is not None:
        ulysses.check_heads(model.cfg.num_key_value_heads)
    model.sequence_parallel = ulysses
    for layer in model.layers:
        layer.sequence_parallel = ulysses


# ---- height-parallel VAE decode ---------------------------------------------------------------------


def tail_halo(decoder) -> int:
    """Rows of halo (at the decoder tail's input resolution) that make a row block's tail output exact.

    A zero-padded conv at a block edge corrupts `pad` more rows inward per layer, an upsample doubles the
    corrupted depth; the causal histories carry the same per-layer depth from frame to frame (a layer's
    history is its input, which is no deeper), so the bound holds over every frame.
    """
    depth, scale = 0, 1
    # The tail opens with the split block's spatial upsampling (its resnets ran in the head, see Decoder.head)
    first = decoder.tail_start if decoder.split is None else decoder.split
    for i in range(first, len(decoder.up_blocks)):
        block = decoder.up_blocks[i]
        for resnet in block.resnets if i >= decoder.tail_start else ():
            depth += resnet.conv1.spatial_pad[1] + resnet.conv2.spatial_pad[1]
        if block.upsampler is not None:
            depth, scale = 2 * (depth + 1), 2 * scale  # nearest ×2, then its 3×3 conv (or the 2×2 sub-pixel conv)
    depth += decoder.conv_out.spatial_pad[1]
    return -(-depth // scale)


class RowParallelDecode:
    """Height-parallel VAE decode over `world` ranks, wrapped around WanVAE's compilable units (vae.py is
    left as it is): every rank runs latent frame 0 and the decoder *head* of each later frame in full (low
    resolution; it holds the mid block's frame-global attention), then only its block of rows, plus a halo
    of `tail_halo` rows, through the full-resolution *tail*, one output frame at a time; one all-gather per
    output frame reassembles the rows on every rank. The tail's causal histories start from the full first
    chunk's, sliced to the block, so the result is the single-device decode (same ops on the same values).

    Needs `vae.frame_tail` (the default); without it the decode runs unsplit.
    """

    def __init__(self, vae, rank: int, world: int, group) -> None:
        self.vae, self.rank, self.world, self.group = vae, rank, world, group
        self.halo = tail_halo(vae.decoder)
        self.first_unit, self.tail_unit = vae.decoder_first_chunk, vae.decoder_tail  # compiled or not
        self.hist: list[torch.Tensor] = []
        self.rows0 = 0  # tail-input rows of a full frame
        vae.decoder_first_chunk = self.first_chunk
        vae.decoder_tail = self.tail

    def block(self) -> tuple[int, int, int, int, int]:
        """(rows per rank, core start, core end, halo'd start, halo'd end) at the tail's input resolution."""
        per = -(-self.rows0 // self.world)
        a = min(self.rows0, self.rank * per)
        b = min(self.rows0, a + per)
        return per, a, b, max(0, a - self.halo), min(self.rows0, b + self.halo)

    def first_chunk(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        y, hist = self.first_unit(x)
        if not self.vae.frame_tail:
            return y, hist
        k = self.vae.decoder.head_histories
        self.rows0 = x.shape[3] * self.vae.decoder.tail_input_scale()  # rows of a full frame at the tail's input
        _, _, _, lo, hi = self.block()
        fmt = self.vae.memory_format
        self.hist = []
        for h in hist[k:]:
            s = h.shape[3] // self.rows0
            self.hist.append(h[:, :, :, lo * s : hi * s].clone(memory_format=fmt))
        # the full-frame tail histories are not read again (`tail` keeps its own): free them
        return y, [*hist[:k], *(h.new_empty(0) for h in hist[k:])]

    def tail(
        self, x: torch.Tensor, src: torch.Tensor | None, sub: int, hist: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One frame of head features [B, C, 1, H0, W0] (and the shortcut input `src` at the same rows) →
        the full frame's patches, computed 1/world here."""
        per, a, b, lo, hi = self.block()
        fmt = self.vae.memory_format
        xs = x[:, :, :, lo:hi].contiguous(memory_format=fmt)
        if src is not None:
            src = src[:, :, :, lo:hi].contiguous(memory_format=fmt)
        y, _ = self.tail_unit(xs, src, sub, self.hist)  # [B, 12, 1, (hi - lo)·r, W]
        r = y.shape[3] // (hi - lo)
        core = y[:, :, :, (a - lo) * r : (b - lo) * r]
        if b - a < per:  # the last block may be short: pad so every rank sends the same size
            core = torch.nn.functional.pad(core, (0, 0, 0, (per - (b - a)) * r))
        rows = all_gather(core.movedim(3, 0), self.group)  # [world·per·r, B, 12, 1, W]
        return rows.movedim(0, 3)[:, :, :, : self.rows0 * r], []


def apply_row_parallel_decode(vae, par: Parallel) -> RowParallelDecode | None:
    """Split the VAE decode by rows over every rank of the job (after `apply_compile_vae`)."""
    if par is None or par.world_size < 2:
        return None
    par.vae_rows = True
    return RowParallelDecode(vae, par.rank, par.world_size, dist.group.WORLD)
