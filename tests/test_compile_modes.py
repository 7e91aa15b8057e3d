"""Every compile mode that runs on the CPU passes the compile contract end to end (debug model): no graph
breaks, steady state under fail_on_recompile with no recompiles, frames close to eager. The CUDA-graph modes
are refused up front without a GPU."""

from __future__ import annotations

import functools

import pytest
import torch
from helpers import compose_generate
from safetensors.torch import load_file
from torch._dynamo.testing import CompileCounter

from cosmos3_compiled import compile as compile_mod
from cosmos3_compiled.pipeline import RequestError, generate

SMALL = ["height=32", "width=48", "num_frames=5", "sampler.num_inference_steps=4", "output.frames=float32",
         "output.progress=false", "output.video=false"]


@pytest.fixture(scope="module")
def eager_frames(tmp_path_factory):
    out = tmp_path_factory.mktemp("eager")
    generate(compose_generate(SMALL + ["compile=eager"]), out)
    return load_file(str(out / "frames.safetensors"))["frames"]


@pytest.mark.inductor
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["default", "max_autotune_no_cudagraphs"])
def test_cpu_mode_compile_contract(mode, eager_frames, tmp_path):
    state = generate(compose_generate(SMALL + [f"compile={mode}", "compile.warmup_steps=1"]), tmp_path)
    m = state.metrics
    assert m["compile"]["graph_breaks"] == 0
    assert m["compile"]["recompiles"] == 0
    # the first step compiled one graph per CFG branch text length; steps 2..4 ran under fail_on_recompile
    assert m["compile"]["unique_graphs"] >= 1 and len(m["steps"]["all_s"]) == 4
    frames = load_file(str(tmp_path / "frames.safetensors"))["frames"]
    assert (frames - eager_frames).abs().max().item() < 1e-3


@pytest.mark.inductor
@pytest.mark.slow
def test_compiled_vae_matches_eager_decode(eager_frames, tmp_path):
    """compile.vae=default: channels_last_3d decoder, inductor chunk bodies with eager-like rounding."""
    state = generate(compose_generate(SMALL + ["compile=eager", "compile.vae=default"]), tmp_path)
    frames = load_file(str(tmp_path / "frames.safetensors"))["frames"]
    assert state.metrics["compile"]["unique_graphs"] >= 1  # the decode units really were compiled
    assert (frames - eager_frames).abs().max().item() < 1e-4


def test_decode_warmup_compiles_the_decode_during_the_denoise_loop(eager_frames, tmp_path, monkeypatch):
    """compile.vae_warmup=true: the decode units compile on a background thread after the first step, so the
    decode itself compiles nothing, the step is not charged with the warm-up's graphs, and the frames are
    the eager ones. (The units compile with dynamo's eager backend here, so it stays quick on the CPU.)"""
    counter = CompileCounter()
    monkeypatch.setattr(compile_mod, "apply_compile_vae",
                        functools.partial(compile_mod.apply_compile_vae, backend=counter))
    started = []  # the VAE graphs compiled when the warm-up starts: none, the decode has not run yet
    start = compile_mod.DecodeWarmup.start

    def counted_start(self, after_step):
        started.append(counter.frame_count)
        start(self, after_step)

    monkeypatch.setattr(compile_mod.DecodeWarmup, "start", counted_start)
    state = generate(compose_generate(SMALL + ["compile=eager", "compile.vae=default", "compile.vae_warmup=true"]),
                     tmp_path)
    m = state.metrics
    warm = m["decode_warmup"]
    assert warm["started_after_step"] == 0 and "error" not in warm and started == [0]
    assert warm["graphs"] >= 3 and counter.frame_count == warm["graphs"]  # the decode compiled nothing more
    assert m["steps"]["recompiles_after_warmup"] == 0
    frames = load_file(str(tmp_path / "frames.safetensors"))["frames"]
    assert torch.equal(frames, eager_frames)


@pytest.mark.gpu
def test_cuda_decode_warmup_beside_the_cuda_graph_loop(tmp_path):
    """The product path on a GPU: the warm-up's kernels run while the whole-step CUDA graph replays; the decode
    then compiles nothing and the frames are those of the same compiled decode run without a warm-up."""
    base = SMALL + ["device=cuda", "dtype=bfloat16", "compile=cudagraph", "compile.vae=default", "keep_loaded=false"]
    frames = {}
    for on in (False, True):
        out = tmp_path / str(on)
        state = generate(compose_generate(base + [f"compile.vae_warmup={on}"]), out)
        frames[on] = load_file(str(out / "frames.safetensors"))["frames"]
        torch.compiler.reset()  # the second run compiles its decode again, on the warm-up's thread
    warm = state.metrics["decode_warmup"]
    assert "error" not in warm and warm["graphs"] >= 3 and warm["started_after_step"] == 0
    assert 0 <= warm["after_steps_s"] <= warm["waited_s"]
    assert state.metrics["steps"]["recompiles_after_warmup"] == 0
    assert (frames[True] - frames[False]).abs().max().item() <= 1e-6


@pytest.mark.parametrize("overrides,match", [
    (["compile.vae=eager"], "needs compile.vae=default"),
    (["compile=default", "compile.vae=default"], "needs compile=cudagraph or compile=eager"),
    (["compile.vae=default", "parallel=cfg"], "runs on one process"),
])
def test_decode_warmup_is_refused_where_it_cannot_help_or_run(overrides, match, tmp_path):
    with pytest.raises(RequestError, match=match):
        generate(compose_generate(SMALL + ["compile.vae_warmup=true", *overrides]), tmp_path)


@pytest.mark.parametrize("mode", ["cudagraph", "reduce_overhead", "max_autotune"])
def test_cuda_graph_modes_need_cuda(mode, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    with pytest.raises(RequestError, match="needs device=cuda"):
        generate(compose_generate(SMALL + [f"compile={mode}"]), tmp_path)


@pytest.mark.inductor
@pytest.mark.slow
def test_recompile_in_steady_state_is_an_error(tmp_path, monkeypatch):
    """The steady-state stance really is on: a shape change after warm-up raises instead of recompiling."""
    from cosmos3_compiled.model import Cosmos3Transformer

    calls = {"n": 0}
    original = Cosmos3Transformer.forward

    def shape_shift(self, latents, timestep, branch):
        calls["n"] += 1
        if calls["n"] > 2:  # after the warm-up step (2 branches), feed the compiled layers a new shape
            branch.cos, branch.sin = branch.cos[:-1], branch.sin[:-1]
        return original(self, latents, timestep, branch)

    monkeypatch.setattr(Cosmos3Transformer, "forward", shape_shift)
    with pytest.raises(Exception, match="(?i)recompil"):
        generate(compose_generate(SMALL + ["compile=default"]), tmp_path)


def test_only_the_writing_rank_saves_the_compile_cache(tmp_path, monkeypatch):
    """Ranks sharing compile.cache_dir once raced on one temporary file (one rank's rename found it gone and the
    rank died; its peer then failed in the teardown barrier): now only the writer saves, under a per-process name."""
    from cosmos3_compiled import compile as compile_mod
    from cosmos3_compiled.compile import CompilePlan
    from cosmos3_compiled.schema import CompileConfig

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # restored after the test
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"artifacts", None))
    plan = CompilePlan.from_config(CompileConfig(mode="default", cache_dir=str(tmp_path / "cache")))
    monkeypatch.setattr(compile_mod, "compile_counters", lambda: {"graph_breaks": 0, "unique_graphs": 0})
    plan.start_job()  # counters as a fresh process has them (earlier tests in this one compiled graphs)
    monkeypatch.setattr(compile_mod, "compile_counters", lambda: {"graph_breaks": 0, "unique_graphs": 3})
    assert plan.finish_job(0, save_cache=False)["unique_graphs"] == 3
    assert not list((tmp_path / "cache").glob("cache_artifacts*"))
    plan.finish_job(0, save_cache=True)
    assert (tmp_path / "cache" / "cache_artifacts.bin").read_bytes() == b"artifacts"
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.is_file()] == ["cache_artifacts.bin"]
