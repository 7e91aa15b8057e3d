"""The one place that calls `torch.compile` (and, for the `cudagraph` mode, captures CUDA graphs)."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch._dynamo.utils import counters

from .schema import CompileConfig

log = logging.getLogger(__name__)

# torch.compile modes by config name (schema.CompileMode); "eager" compiles nothing.
MODES = {
    "eager": None,
    "default": "default",
    "max_autotune_no_cudagraphs": "max-autotune-no-cudagraphs",
    "max_autotune": "max-autotune",
    "reduce_overhead": "reduce-overhead",
    "cudagraph": "default",  # inductor kernels, then our own whole-step CUDA graph (`CudaGraphRunner`)
}


def _mode(x) -> str:
    return x.value if hasattr(x, "value") else str(x)


def apply_inductor_flags(flags: dict) -> None:
    """Set inductor config knobs named in the config (each documented there with its reason)."""
    import torch._inductor.config as inductor_config

    for key, value in flags.items():
        obj = inductor_config
        *path, leaf = key.split(".")
        for part in path:
            obj = getattr(obj, part)
        if not hasattr(obj, leaf):
            raise ValueError(f"unknown inductor flag {key!r}")
        setattr(obj, leaf, value)


def apply_compile(model: torch.nn.Module, settings: CompileConfig, backend: str = "inductor") -> torch.nn.Module:
    """Compile the model's video step per `settings` (the schema's `compile` node, in place); returns the model.

    `backend`: dynamo's backend; tests pass "eager" or "aot_eager" to check tracing without inductor's codegen.
    """
    mode = MODES[_mode(settings.mode)]
    if mode is None:
        return model
    torch._dynamo.config.cache_size_limit = settings.recompile_limit
    torch._dynamo.config.recompile_limit = settings.recompile_limit
    apply_inductor_flags(dict(settings.inductor))
    kwargs = dict(fullgraph=settings.fullgraph, dynamic=settings.dynamic, backend=backend)
    if backend == "inductor":
        kwargs["mode"] = mode
    trees = mode in ("reduce-overhead", "max-autotune")  # inductor's cudagraph trees skip input-mutating graphs
    for m in model.modules():
        if hasattr(m, "accumulate_into_input"):
            m.accumulate_into_input = not trees
    if _mode(settings.scope) == "blocks":
        repeated = set(getattr(model, "_repeated_blocks", ()))
        # by class name, through the MRO: FSDP2 (sharding.py) makes each sharded block an `FSDP<Block>` subclass
        blocks = [m for m in model.modules() if any(c.__name__ in repeated for c in type(m).__mro__)]
        if not blocks:
            raise ValueError(f"{type(model).__name__} declares no repeated blocks to compile")
        for block in blocks:
            block.compile(**kwargs)
    else:
        model.compile(**kwargs)
    return model


def is_compiling() -> bool:
    """True while dynamo traces: a compiled unit may then take a spelling that suits inductor better."""
    return torch.compiler.is_compiling()


def drop_compiled() -> None:
    """Forget every compiled graph of this process (models about to be freed, or too many shapes served)."""
    torch.compiler.reset()


def reset_compile(model: torch.nn.Module) -> torch.nn.Module:
    """Undo `apply_compile`: drop every compiled graph of the process and restore the plain forwards."""
    torch._dynamo.reset()
    for m in model.modules():
        m._compiled_call_impl = None
    return model


def compile_counters() -> dict:
    """Graph breaks and graphs compiled so far in this process (dynamo's counters). Recompiles in steady
    state are the graphs compiled after warm-up: `stages/denoise.py` snapshots this around its loop."""
    return {
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "unique_graphs": int(counters["stats"].get("unique_graphs", 0)),
    }


class SteadyStateRunner:
    """Calls a step; after `warmup` calls every further call runs under the fail-on-recompile stance,
    so a recompile in steady state is an error rather than a silent stall."""

    def __init__(self, step, warmup: int):
        self.step, self.warmup, self.calls = step, warmup, 0

    def __call__(self):
        self.calls += 1
        if self.calls <= self.warmup:
            return self.step()
        with torch.compiler.set_stance("fail_on_recompile"):
            return self.step()


_CAPTURE_STREAMS: dict[int, torch.cuda.Stream] = {}


def _capture_stream() -> torch.cuda.Stream:
    """One side stream per device for every capture of the process. cuBLAS keeps a workspace for each stream that
    ever ran a GEMM, for the life of the process, so a fresh stream per request (the resident models of a sweep
    capture once per job) would grow memory with every request."""
    dev = torch.cuda.current_device()
    if dev not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[dev] = torch.cuda.Stream(dev)
    return _CAPTURE_STREAMS[dev]


def capture_cuda_graph(fn, pool=None):
    """Run `fn` once for real on a side stream (it compiles, autotunes and allocates outside the capture),
    then capture it; returns (graph, the captured call's output). Capturing executes nothing. `pool`: another
    graph's memory pool to capture into (`CUDAGraph.pool()`), for graphs that never run at the same time."""
    side = _capture_stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


class CudaGraphRunner:
    """Our own capture of the whole denoising step (every branch's video step, CFG combine, scheduler
    update) in one CUDA graph over static buffers, replayed every step.

    Each of the first `warmup_calls` calls is one real step run normally (the last of them through
    `capture_cuda_graph`, which captures right after it — so no step is wasted and no state has to be
    saved); every later call is one `replay()`.

    `pools`: a list shared by runners whose graphs never run at the same time (the regimes of one step): the
    first capture appends its memory pool and the others capture into it, so their activations share memory.
    They may: each replay leaves its result only in the step's static buffers, never in the pool.
    """

    def __init__(self, step, warmup_calls: int = 1, pools: list | None = None):
        self.step, self.warmup_calls, self.calls = step, warmup_calls, 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.pools = pools

    def __call__(self):
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
        elif self.calls < self.warmup_calls:
            self.step()
        else:
            pool = self.pools[0] if self.pools else None
            self.graph, _ = capture_cuda_graph(self.step, pool)
            if self.pools is not None and not self.pools:
                self.pools.append(self.graph.pool())


def apply_compile_text(model, mode) -> None:
    """Compile the text tower's per-layer forward. It runs once per prompt and branch, so eager is the
    default: compiling it costs seconds to save milliseconds."""
    mode = MODES[_mode(mode)]
    if mode is None:
        return
    for layer in model.layers:
        layer.text_forward = torch.compile(layer.text_forward, fullgraph=True, dynamic=False, mode=mode)


def apply_compile_vae(vae, mode, channels_last: bool = True, emulate_casts: bool = True, backend=None) -> None:
    """Compile the VAE's decode units (`vae.compile_units`, fullgraph); "eager" leaves them alone.

    channels_last: lay the decoder out channels_last_3d first (it pays only compiled; see the Wan2.2 VAE
    report in docs/benchmarks/). emulate_casts: inductor rounds every intermediate to the tensor dtype where
    eager would (`emulate_precision_casts`) instead of keeping fused elementwise chains in fp32, so a bf16
    compiled decode tracks the eager one (the VAE's own epilogues are already fp32 with one rounding, see
    vae.layers._finish). Every decode strategy (whole frames, `vae.tiles` column strips, row-parallel) calls
    the same units; column strips compile them once per strip. `backend`: a dynamo backend other than
    inductor (tests: "eager", a counter), with the layout left as it is.
    """
    mode = _mode(mode)
    if MODES[mode] is None:
        return
    if backend is not None:
        for name in vae.compile_units:
            setattr(vae, name, torch.compile(getattr(vae, name), fullgraph=True, dynamic=False, backend=backend))
        return
    from torch._inductor import inductor_prims  # noqa: F401  (the units pin strides with its inductor_force_stride_order)

    if channels_last:
        vae.apply_channels_last_3d()
    # torch.compile takes a mode or options, not both: spell the mode out as the options it stands for
    options = dict(torch._inductor.list_mode_options(MODES[mode]))
    if emulate_casts:
        options["emulate_precision_casts"] = True
    for name in vae.compile_units:
        setattr(vae, name, torch.compile(getattr(vae, name), fullgraph=True, dynamic=False, options=options))


def reset_compile_vae(vae) -> None:
    """Undo `apply_compile_vae`: the units are the class's methods again."""
    for name in vae.compile_units:
        vae.__dict__.pop(name, None)


# step modes whose runner never compiles past its warm-up and sets no global dynamo stance, so another thread
# may compile meanwhile (SteadyStateRunner's fail-on-recompile stance is process-wide)
BACKGROUND_SAFE_MODES = ("eager", "cudagraph")
WARMUP_LATENT_FRAMES = 3  # the first chunk and two later frames: every unit and history shape the decode meets


class DecodeWarmup:
    """Compiles the VAE's decode units on a background thread while the denoise loop runs, by decoding a few
    latent frames of zeros of the request's size: the request's decode then finds its graphs compiled (or loaded
    from the compile cache) instead of compiling them itself. The host is idle during the loop (CUDA-graph
    replays are enqueued ahead of the GPU), and the warm-up's kernels share the current stream, queued between
    the steps'. Start it only after the step's last CUDA-graph capture (another thread's kernels would break a
    capture) and only with a step mode in `BACKGROUND_SAFE_MODES`.

    `join()` waits for it and returns its record for metrics.json: its host seconds (compiling or loading, and
    enqueueing), the graphs it compiled (which are not the step's recompiles) and the wait; a failure is logged
    and recorded, never raised: the decode then compiles as it would have."""

    def __init__(self, vae, latent_shape: tuple[int, ...]):
        b, z, t, h, w = latent_shape
        self.vae, self.shape = vae, (b, z, min(t, WARMUP_LATENT_FRAMES), h, w)
        self.thread: threading.Thread | None = None
        self.record: dict = {}

    def start(self, after_step: int) -> None:
        self.record["started_after_step"] = after_step
        self.thread = threading.Thread(target=self._run, name="cosmos3-decode-warmup", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        t0, before = time.perf_counter(), compile_counters()["unique_graphs"]
        try:
            dev = self.vae.device
            with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
                z = torch.zeros(self.shape, dtype=self.vae.dtype, device=dev)
                # no sync: the decode that follows is ordered after these kernels on the same stream
                self.vae.decode_frames(z, progress_desc=None)
        except Exception as err:  # the decode compiles for itself then; say why it could not be done ahead
            self.record["error"] = f"{type(err).__name__}: {err}".splitlines()[0]
            log.warning("decode warm-up failed (the decode compiles its units itself): %s", self.record["error"])
        self.record.update(seconds=time.perf_counter() - t0,
                           graphs=compile_counters()["unique_graphs"] - before)

    @property
    def graphs(self) -> int:
        """The graphs the warm-up compiled (0 before it ran)."""
        return self.record.get("graphs", 0)

    def join(self) -> dict:
        """Wait for the warm-up (no-op if it never started); its metrics record. `waited_s`: the host's wait for
        the thread; on CUDA also `after_steps_s`, the part of it after the GPU had run everything queued before the
        join (the steps): the time the warm-up added to the denoise stage beyond the step times."""
        if self.thread is None:
            self.record["started_after_step"] = None
            return self.record
        t0 = time.perf_counter()
        dev = self.vae.device
        if dev.type == "cuda" and self.thread.is_alive():
            torch.cuda.synchronize(dev)  # the steps' replays are done; the decode syncs anyway after this
        t1 = time.perf_counter()
        self.thread.join()
        t2 = time.perf_counter()
        self.record["waited_s"] = t2 - t0
        if dev.type == "cuda":
            self.record["after_steps_s"] = t2 - t1
        return self.record


def make_step_runner(mode, step, warmup: int, pools: list | None = None):
    """The denoise loop's per-step call: our whole-step CUDA graph, the steady-state guard, or the step itself."""
    mode = _mode(mode)
    if mode == "cudagraph":
        return CudaGraphRunner(step, max(1, warmup), pools)
    if MODES[mode] is None:
        return step
    return SteadyStateRunner(step, warmup)


class RegimeRunners:
    """The per-step call of a job whose steps run in different precision regimes (an FP8 checkpoint's W8A16 and
    W8A8 steps): one step runner per regime of `schedule` (step i runs `schedule[i]`), each with its own warm-up,
    so the regimes are two compiled graphs and two CUDA-graph captures of the same step, chosen on the host. An
    unquantized job's schedule has one regime (None): one runner, as before.

    `warm_step`: the step after which every regime is past its warm-up (graphs compiled later are recompiles);
    None when some regime has fewer steps than its warm-up."""

    def __init__(self, mode, step, warmup: int, schedule: list):
        self.schedule = list(schedule)
        pools: list = []  # the regimes' CUDA graphs never run at the same time: one memory pool
        self.runners = {r: make_step_runner(mode, step, warmup, pools) for r in dict.fromkeys(self.schedule)}
        need = max(1, warmup)
        ends = []
        for regime in self.runners:
            steps = [i for i, r in enumerate(self.schedule) if r == regime]
            ends.append(steps[need - 1] if len(steps) >= need else None)
        self.warm_step = None if None in ends else max(ends)

    def __call__(self, i: int):
        return self.runners[self.schedule[i]]()


class ServedBuckets:
    """Request shapes whose compiled graphs this process holds. Each text length (per latent size) is one more graph
    of the video step and each latent size one more of the VAE units, and dynamo stops compiling (falls back to
    eager) past `compile.recompile_limit` graphs per function; so before a request would cross that, the compiled
    code is reset and compiles afresh (from the on-disk caches where they are warm)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.text: set = set()  # (latent shape, text length[, FP8 precision regime])
        self.latent: set = set()  # latent shape

    @staticmethod
    def _graphs(latent_shape: tuple, text_lens: list[int], regimes) -> set:
        """One video-step graph per (latent shape, text length) and, for an FP8 checkpoint, per precision regime."""
        latent = tuple(latent_shape)
        return {(latent, n) if r is None else (latent, n, r) for n in text_lens for r in regimes}

    def knows(self, latent_shape: tuple, text_lens: list[int], regimes=(None,)) -> bool:
        return self._graphs(latent_shape, text_lens, regimes) <= self.text

    def add(self, latent_shape: tuple, text_lens: list[int], regimes=(None,)) -> bool:
        """Record one request's shapes (and FP8 precision regimes: one more graph each); True when the compiled
        graphs had to be reset first."""
        text = self._graphs(latent_shape, text_lens, regimes)
        reset = len(self.text | text) > self.limit or len(self.latent | {tuple(latent_shape)}) > self.limit
        if reset:
            drop_compiled()
            self.text.clear()
            self.latent.clear()
        self.text |= text
        self.latent.add(tuple(latent_shape))
        return reset


class CompilePlan:
    """Everything compile-related for one set of loaded models, built from the schema's `compile` node: what gets
    compiled (video-step blocks or the whole step, text pass, the VAE's declared units), the per-step runner and
    its warm-up, the persistent cache, the shape buckets and their resets, and the counters for metrics.json."""

    def __init__(self, settings: CompileConfig):
        self.settings = settings
        self.mode = _mode(settings.mode)
        self.cache = CompileCache(settings.cache_dir) if settings.cache_dir else None
        self.buckets = ServedBuckets(settings.recompile_limit)
        self._at_start: dict = {}
        self._at_warm: int | None = None

    @classmethod
    def from_config(cls, node) -> "CompilePlan":
        """From the composed config's `compile` node (a DictConfig typed by the schema) or a `CompileConfig`."""
        return cls(node if isinstance(node, CompileConfig) else OmegaConf.to_object(node))

    @property
    def compiles(self) -> bool:
        return MODES[self.mode] is not None

    def apply(self, transformer, vae) -> None:
        apply_compile(transformer, self.settings)
        apply_compile_vae(vae, self.settings.vae)
        apply_compile_text(transformer, self.settings.text_pass)

    def step_runner(self, step, warmup: int, schedule: list) -> RegimeRunners:
        """The denoise loop's per-step call (`runner(i)` runs step i) for a job with `warmup` steps per regime
        before the steady state; `schedule`: each step's precision regime (all None for unquantized weights)."""
        return RegimeRunners(self.mode, step, warmup, schedule)

    def start_job(self) -> None:
        self._at_start = compile_counters()
        self._at_warm = None

    def admit(self, latent_shape: tuple, text_lens: list[int], regimes=(None,)) -> dict:
        """Before a job's first step: record its shape bucket (resetting the compiled code first when it would
        pass compile.recompile_limit) and say whether the first step compiles. Returns the bucket (metrics).
        `regimes`: the job's FP8 precision regimes (their linears' modes), one graph each per shape."""
        bucket = {"latent": list(latent_shape), "text": list(text_lens)}
        regimes = tuple(regimes)
        if regimes != (None,):
            bucket["regimes"] = [list(r) if isinstance(r, tuple) else r for r in regimes]
        known = self.buckets.knows(latent_shape, text_lens, regimes)
        if self.buckets.add(latent_shape, text_lens, regimes):
            log.info("compile=%s: this process served more request shapes than compile.recompile_limit allows: "
                     "compiled graphs reset", self.mode)
        elif self.compiles and known:
            log.info("compile=%s: shape bucket %s already compiled in this process", self.mode, bucket)
        if self.compiles and not known:
            log.info("compile=%s: first step compiles shape bucket %s (one graph per branch text length)",
                     self.mode, bucket)
        return bucket

    def warmed_up(self) -> None:
        """Call after the job's last warm-up step: graphs compiled from here on are recompiles."""
        self._at_warm = compile_counters()["unique_graphs"]

    def steady_recompiles(self, elsewhere: int = 0) -> int | None:
        """Graphs compiled since `warmed_up` (None when the job never got past warm-up), less `elsewhere`: those
        a `DecodeWarmup` compiled meanwhile for the decode."""
        return None if self._at_warm is None else compile_counters()["unique_graphs"] - self._at_warm - elsewhere

    def finish_job(self, recompiles: int, save_cache: bool = True) -> dict:
        """This job's compile counters (metrics.json `compile`). When it compiled something new, the process
        that writes (`save_cache`; one per job, so ranks never race on the file) saves the cache artifacts."""
        counted = {k: v - self._at_start.get(k, 0) for k, v in compile_counters().items()}
        if save_cache and self.cache is not None and counted["unique_graphs"]:
            self.cache.save()
        return {**counted, "recompiles": recompiles, "mode": self.mode, "scope": _mode(self.settings.scope),
                "warm_cache": bool(self.cache and self.cache.loaded)}


class CompileCache:
    """Warm starts across processes: inductor's on-disk caches under `cache_dir`, plus dynamo/inductor's
    portable cache artifacts (`torch.compiler.save_cache_artifacts` / `load_cache_artifacts`)."""

    def __init__(self, cache_dir: str):
        self.dir = Path(cache_dir).expanduser()
        self.dir.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.dir / "inductor")
        os.environ.setdefault("TRITON_CACHE_DIR", str(self.dir / "triton"))
        # FlashAttention-4's CuTe-DSL kernels: the DSL's own on-disk cache, and flash-attn's exported kernels
        os.environ.setdefault("CUTE_DSL_CACHE_DIR", str(self.dir / "cute_dsl"))
        os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED", "1")
        os.environ.setdefault("FLASH_ATTENTION_CUTE_DSL_CACHE_DIR", str(self.dir / "flash_attn_cute"))
        self.artifacts = self.dir / "cache_artifacts.bin"
        self.loaded = False
        if self.artifacts.is_file():
            torch.compiler.load_cache_artifacts(self.artifacts.read_bytes())
            self.loaded = True

    def save(self) -> None:
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None:
            tmp = self.artifacts.with_suffix(f".partial.{os.getpid()}")
            tmp.write_bytes(saved[0])
            tmp.replace(self.artifacts)
