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
    """Graph breaks, recompiles and graphs compiled so far in this process (dynamo's counters)."""
    from torch._dynamo.utils import counters

    breaks = sum(counters["graph_break"].values())
    stats = counters["stats"]
    return {
        "graph_breaks": int(breaks),
        "unique_graphs": int(stats.get("unique_graphs", 0)),
        "recompiles": int(sum(v for k, v in counters["recompiles"].items())) if "recompiles" in counters else 0,
    }
