"""Compile contract on the CPU: the video step compiles with fullgraph, runs steady state with no
recompiles across timesteps and both CFG branches (different text lengths), and matches eager."""

import pytest
import torch

from cosmos3_compiled.checkpoint import build_random
from cosmos3_compiled.compile import apply_compile
from cosmos3_compiled.config import preset, replace
from cosmos3_compiled.schema import CompileConfig


def _branches(model, latent_shape):
    gen = torch.Generator().manual_seed(3)
    out = []
    for text_len in (13, 8):  # cond and uncond prompts differ in length
        ids = torch.randint(0, model.cfg.vocab_size, (text_len,), generator=gen)
        b = model.setup_branch(text_len, latent_shape, fps=16.0)
        model.text_pass(ids, b)
        out.append(b)
    return out


@pytest.mark.parametrize("scope,backend", [("full", "auto"), ("blocks", "auto"), ("blocks", "fa4")])
def test_video_step_fullgraph_no_recompiles(scope, backend, request):
    """fa4 (its CPU stand-in, `fa4_on_cpu`) reaches the compiler as one custom op with a fake impl: no break."""
    if backend == "fa4":
        request.getfixturevalue("fa4_on_cpu")
    latent_shape = (2, 5, 6)
    eager = build_random(preset("debug"), seed=5)
    compiled = build_random(preset("debug"), seed=5)
    compiled.set_attention_backend(backend)  # before the branches: it fixes their K/V buffer layout
    apply_compile(compiled, CompileConfig(mode="default", scope=scope, fullgraph=True))
    branches_e, branches_c = _branches(eager, latent_shape), _branches(compiled, latent_shape)
    latents = torch.randn(1, 48, *latent_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # warm-up: one call per branch compiles one graph per text length
        for b in branches_c:
            compiled(latents, torch.tensor(999.0), b)
        with torch.compiler.set_stance("fail_on_recompile"), torch._dynamo.config.patch(error_on_recompile=True):
            for step, t in enumerate((999.0, 870.0, 512.0, 3.0)):
                x = latents + 0.1 * step
                for be, bc in zip(branches_e, branches_c):
                    want = eager(x, torch.tensor(t), be)
                    got = compiled(x, torch.tensor(t), bc)
                    assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def test_graph_break_is_an_error():
    """fullgraph=True turns a graph break into an error, so the test above would catch one."""
    model = build_random(preset("debug"), seed=1)
    original = model.layers[0].forward

    def broken(h, *args):
        print("host side effect")  # forces a graph break
        return original(h, *args)

    model.layers[0].forward = broken
    apply_compile(model, CompileConfig(mode="default", scope="full"))
    (b,) = _branches(model, (1, 2, 2))[:1]
    with pytest.raises(torch._dynamo.exc.Unsupported):
        model(torch.randn(1, 48, 1, 2, 2), torch.tensor(5.0), b)


def test_batched_cfg_step_fullgraph_no_recompiles():
    """Both branches through the linears as one batch: compiles once, steady state without recompiles,
    and equals the per-branch step."""
    latent_shape = (2, 4, 6)
    eager = build_random(preset("debug"), seed=6)
    compiled = build_random(preset("debug"), seed=6)
    apply_compile(compiled, CompileConfig(mode="default", scope="blocks", fullgraph=True))
    be, bc = _branches(eager, latent_shape), _branches(compiled, latent_shape)
    tables = compiled.setup_batched(bc)
    latents = torch.randn(1, 48, *latent_shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        compiled.forward_batched(latents, torch.tensor(999.0), bc, *tables)
        with torch.compiler.set_stance("fail_on_recompile"), torch._dynamo.config.patch(error_on_recompile=True):
            for t in (870.0, 12.0):
                got = compiled.forward_batched(latents, torch.tensor(t), bc, *tables)
                for g, b in zip(got, be):
                    want = eager(latents, torch.tensor(t), b)
                    assert (g - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def test_residual_accumulation_modes_agree():
    """The in-place residual (no copy of h) and the plain `h + linear(x)` give the same step; compile modes
    that use inductor's cudagraph trees (which skip graphs that mutate an input) get the plain one."""
    model = build_random(preset("debug"), seed=9)
    (b,) = _branches(model, (2, 3, 4))[:1]
    latents = torch.randn(1, 48, 2, 3, 4, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        inplace = model(latents, torch.tensor(400.0), b)
        for layer in model.layers:
            layer.accumulate_into_input = False
        plain = model(latents, torch.tensor(400.0), b)
    assert (inplace - plain).abs().max().item() <= 1e-5 * plain.abs().max().item()
    for mode, expected in (("reduce_overhead", False), ("max_autotune", False), ("default", True)):
        apply_compile(model, CompileConfig(mode=mode, scope="blocks"))
        assert all(layer.accumulate_into_input is expected for layer in model.layers), mode


def test_video_step_with_sound_segment_fullgraph_no_recompiles():
    """A sound segment (audio head, S more tokens after the vision ones) is data to the compiled layers: fullgraph,
    no recompile across timesteps, equal to eager; the sound velocity too."""
    cfg = replace(preset("debug"), sound_gen=True, sound_dim=8)
    latent_shape, sound_len = (1, 2, 4), 3
    eager, compiled = build_random(cfg, seed=7), build_random(cfg, seed=7)
    apply_compile(compiled, CompileConfig(mode="default", scope="full", fullgraph=True))
    branches = []
    for model in (eager, compiled):
        b = model.setup_branch(9, latent_shape, fps=16.0, sound_len=sound_len)
        model.text_pass(torch.arange(9), b)
        branches.append(b)
    gen = torch.Generator().manual_seed(2)
    latents, sound = torch.randn(1, 48, *latent_shape, generator=gen), torch.randn(8, sound_len, generator=gen)
    with torch.no_grad():
        compiled(latents, torch.tensor(999.0), branches[1], sound)
        with torch.compiler.set_stance("fail_on_recompile"), torch._dynamo.config.patch(error_on_recompile=True):
            for t in (870.0, 12.0):
                (v_e, s_e), (v_c, s_c) = (m(latents, torch.tensor(t), b, sound) for m, b in zip((eager, compiled), branches))
                assert (v_c - v_e).abs().max().item() <= 1e-4 * v_e.abs().max().item()
                assert s_c.shape == (8, sound_len) and (s_c - s_e).abs().max().item() <= 1e-4 * s_e.abs().max().item()
