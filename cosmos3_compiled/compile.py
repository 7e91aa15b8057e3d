"""The one place that calls `torch.compile` (and, for the `cudagraph` mode, captures CUDA graphs)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# torch.compile modes by config name; "eager" compiles nothing.
MODES = {
    "eager": None,
    "default": "default",
    "max_autotune_no_cudagraphs": "max-autotune-no-cudagraphs",
    "max_autotune": "max-autotune",
    "reduce_overhead": "reduce-overhead",
    "cudagraph": "default",  # inductor kernels, then our own whole-step CUDA graph (see stages/denoise.py)
}


@dataclass
class CompileSettings:
    mode: str = "eager"
    scope: str = "blocks"  # "blocks": each repeated layer (regional); "full": the whole video step
    fullgraph: bool = True
    dynamic: bool = False
    recompile_limit: int = 8
    inductor: dict = field(default_factory=dict)


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


def apply_compile(model: torch.nn.Module, settings: CompileSettings) -> torch.nn.Module:
    """Compile the model's video step per `settings` (in place); returns the model."""
    if settings.mode not in MODES:
        raise ValueError(f"unknown compile mode {settings.mode!r}; choose one of {', '.join(MODES)}")
    mode = MODES[settings.mode]
    if mode is None:
        return model
    torch._dynamo.config.cache_size_limit = settings.recompile_limit
    torch._dynamo.config.recompile_limit = settings.recompile_limit
    apply_inductor_flags(settings.inductor)
    kwargs = dict(fullgraph=settings.fullgraph, dynamic=settings.dynamic, mode=mode)
    trees = mode in ("reduce-overhead", "max-autotune")  # inductor's cudagraph trees skip input-mutating graphs
    for m in model.modules():
        if hasattr(m, "accumulate_into_input"):
            m.accumulate_into_input = not trees
    if settings.scope == "blocks":
        repeated = set(getattr(model, "_repeated_blocks", ()))
        blocks = [m for m in model.modules() if type(m).__name__ in repeated]
        if not blocks:
            raise ValueError(f"{type(model).__name__} declares no repeated blocks to compile")
        for block in blocks:
            block.compile(**kwargs)
    elif settings.scope == "full":
        model.compile(**kwargs)
    else:
        raise ValueError(f"unknown compile scope {settings.scope!r}; choose 'blocks' or 'full'")
    return model


def compile_counters() -> dict:
    """Graph breaks and graphs compiled so far in this process (dynamo's counters). Recompiles in steady
    state are the graphs compiled after warm-up: `stages/denoise.py` snapshots this around its loop."""
    from torch._dynamo.utils import counters

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
    """One side stream per device for every capture of the process. cuBLAS keeps a workspace (32 MiB) for each
    stream that ever ran a GEMM, for the life of the process, so a fresh stream per request (the resident models
    of a sweep capture once per job) grew memory by 32 MiB per request (H100, 2026-11-26)."""
    dev = torch.cuda.current_device()
    if dev not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[dev] = torch.cuda.Stream(dev)
    return _CAPTURE_STREAMS[dev]


def capture_cuda_graph(fn):
    """Run `fn` once for real on a side stream (it compiles, autotunes and allocates outside the capture),
    then capture it; returns (graph, the captured call's output). Capturing executes nothing."""
    side = _capture_stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


class CudaGraphRunner:
    """Our own capture of the whole denoising step (every branch's video step, CFG combine, scheduler
    update) in one CUDA graph over static buffers, replayed every step.

    Each of the first `warmup_calls` calls is one real step run normally (the last of them through
    `capture_cuda_graph`, which captures right after it — so no step is wasted and no state has to be
    saved); every later call is one `replay()`.
    """

    def __init__(self, step, warmup_calls: int = 1):
        self.step, self.warmup_calls, self.calls = step, warmup_calls, 0
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self):
        self.calls += 1
        if self.graph is not None:
            self.graph.replay()
        elif self.calls < self.warmup_calls:
            self.step()
        else:
            self.graph, _ = capture_cuda_graph(self.step)


def apply_compile_text(model, mode: str) -> None:
    """Compile the text tower's per-layer forward. It runs once per prompt and branch, so eager is the
    default: compiling it costs seconds to save milliseconds."""
    if mode == "eager":
        return
    if mode not in MODES or MODES[mode] is None:
        raise ValueError(f"unknown text-pass compile mode {mode!r}; choose eager or one of {', '.join(MODES)}")
    for layer in model.layers:
        layer.text_forward = torch.compile(layer.text_forward, fullgraph=True, dynamic=False, mode=MODES[mode])


def apply_compile_vae(vae, mode: str, channels_last: bool = True, emulate_casts: bool = True) -> None:
    """Compile the VAE's per-chunk decoder bodies (fullgraph); "eager" leaves them alone.

    channels_last: lay the decoder out channels_last_3d first (pays only compiled: H100 720p bf16 decode
    2.68 s compiled, 5.47 s eager channels_last; docs/benchmarks/wan22_vae_h100_20261126.md, fifth pass).
    emulate_casts: inductor rounds every intermediate to the tensor dtype where eager would
    (`emulate_precision_casts`) instead of keeping fused elementwise chains in fp32, so a bf16 compiled
    decode tracks the eager one: 50.8 dB vs 49.7 dB without (H100, 720p; the VAE's own epilogues are
    already fp32 with one rounding, see vae._finish; docs/benchmarks/wan22_vae_h100_20261126.md).
    The tile-major decode (`vae.tiles`) compiles its units once per column strip.
    """
    if mode == "eager":
        return
    if mode not in MODES or MODES[mode] is None:
        raise ValueError(f"unknown VAE compile mode {mode!r}; choose eager or one of {', '.join(MODES)}")
    import torch._inductor.inductor_prims  # noqa: F401  (the units pin strides with its inductor_force_stride_order)

    if channels_last:
        vae.apply_channels_last_3d()
    # torch.compile takes a mode or options, not both: spell the mode out as the options it stands for
    options = dict(torch._inductor.list_mode_options(MODES[mode]))
    if emulate_casts:
        options["emulate_precision_casts"] = True
    for name in ("decoder_first_chunk", "decoder_chunk", "decoder_head", "decoder_tail", "decoder_stem",
                 "decoder_first_tile"):
        if hasattr(vae, name):
            setattr(vae, name, torch.compile(getattr(vae, name), fullgraph=True, dynamic=False, options=options))


def make_step_runner(mode: str, step, state: list[torch.Tensor], warmup: int):
    if mode == "cudagraph":
        if not all(t.is_cuda for t in state):
            raise ValueError("compile=cudagraph captures a CUDA graph: it needs device=cuda")
        return CudaGraphRunner(step, max(1, warmup))
    if MODES.get(mode) is None:
        return step
    return SteadyStateRunner(step, warmup)


def setup_compile_cache(cache_dir: str | None) -> "CompileCache | None":
    return CompileCache(cache_dir) if cache_dir else None


class CompileCache:
    """Warm starts across processes: inductor's on-disk caches under `cache_dir`, plus dynamo/inductor's
    portable cache artifacts (`torch.compiler.save_cache_artifacts` / `load_cache_artifacts`)."""

    def __init__(self, cache_dir: str):
        import os
        from pathlib import Path

        self.dir = Path(cache_dir).expanduser()
        self.dir.mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(self.dir / "inductor")
        os.environ.setdefault("TRITON_CACHE_DIR", str(self.dir / "triton"))
        self.artifacts = self.dir / "cache_artifacts.bin"
        self.loaded = False
        if self.artifacts.is_file():
            torch.compiler.load_cache_artifacts(self.artifacts.read_bytes())
            self.loaded = True

    def save(self) -> None:
        saved = torch.compiler.save_cache_artifacts()
        if saved is not None:
            tmp = self.artifacts.with_suffix(".partial")
            tmp.write_bytes(saved[0])
            tmp.replace(self.artifacts)
