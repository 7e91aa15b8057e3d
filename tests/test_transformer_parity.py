"""Our text pass + video step reproduce diffusers' Cosmos3OmniTransformer forward (fp32, CPU)."""

import pytest
import torch
from dit_reference import build_reference_transformer, reference_velocity
from helpers import same_text_kv, text_kv_both_ways

from cosmos3_compiled.checkpoint import load_transformer
from cosmos3_compiled.errors import RequestError

TINY = dict(hidden_size=96, num_hidden_layers=2, head_dim=16, intermediate_size=160, vocab_size=300,
            rope_axes_dim=[4, 2, 2])

CASES = {
    # name: (config overrides, latent (T, h, w), fps, clean frames)
    "gqa2_odd_hw": (dict(num_attention_heads=4, num_key_value_heads=2), (3, 5, 7), 16.0, ()),
    "gqa3_fps24": (dict(num_attention_heads=6, num_key_value_heads=2), (2, 4, 6), 24.0, ()),
    "gqa3_image": (dict(num_attention_heads=6, num_key_value_heads=2), (1, 3, 5), 24.0, ()),
    "i2v_clean_frame0": (dict(num_attention_heads=4, num_key_value_heads=2), (3, 4, 5), 30.0, (0,)),
    "edge_relu2": (dict(num_attention_heads=4, num_key_value_heads=2, hidden_act="relu2", qk_norm_for_text=False,
                        use_und_k_norm_for_gen=True), (2, 3, 5), 12.0, ()),
    "no_fps_modulation": (dict(num_attention_heads=4, num_key_value_heads=1, enable_fps_modulation=False,
                               rope_scaling={"mrope_section": [4, 2, 2]}, rope_axes_dim=None), (2, 4, 4), 10.0, ()),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    made = {}
    for name, (overrides, *_rest) in CASES.items():
        ref = build_reference_transformer(seed=len(made), **{**TINY, **overrides})
        folder = tmp_path_factory.mktemp(name) / "transformer"
        ref.save_pretrained(folder, safe_serialization=True)
        made[name] = (ref, folder)
    return made


@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference_cond_and_uncond(name, checkpoints):
    ref, folder = checkpoints[name]
    _, (t, h, w), fps, clean = CASES[name]
    ours = load_transformer(folder, dtype=torch.float32)
    gen = torch.Generator().manual_seed(7)
    latents = torch.randn(1, 48, t, h, w, generator=gen)
    # two branches with different text lengths, as cond and uncond prompts have
    for text_len, timestep in ((11, 999), (6, 437)):
        ids = torch.randint(0, TINY["vocab_size"], (text_len,), generator=gen)
        with torch.no_grad():
            expected = reference_velocity(ref, ids.tolist(), latents, timestep, fps, clean)
        branch = ours.setup_branch(text_len, (t, h, w), fps=fps, clean_frames=clean)
        ours.text_pass(ids, branch)
        with torch.no_grad():
            got = ours.video_step(latents, torch.tensor(float(timestep)), branch)
        assert got.shape == expected.shape and got.dtype == torch.float32
        scale = expected.abs().max().item()
        assert scale > 0.1
        err = (got - expected).abs().max().item()
        assert err <= 1e-5 * scale, f"{name}: max abs diff {err:.3g} vs scale {scale:.3g}"
        if clean:
            assert got[:, :, list(clean)].abs().max() == 0


@pytest.mark.parametrize("backend", ["math", "auto", "fa4"])
def test_attention_options_keep_parity(backend, checkpoints, request):
    """fa4 runs its CPU stand-in (`fa4_on_cpu`): what is checked is the token-major plumbing around the op."""
    if backend == "fa4":
        request.getfixturevalue("fa4_on_cpu")
    ref, folder = checkpoints["gqa3_fps24"]
    _, (t, h, w), fps, clean = CASES["gqa3_fps24"]
    ours = load_transformer(folder, dtype=torch.float32)
    ours.set_attention_backend(backend)
    ids = torch.arange(9) * 7
    latents = torch.randn(1, 48, t, h, w, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference_velocity(ref, ids.tolist(), latents, 500, fps)
        branch = ours.setup_branch(9, (t, h, w), fps=fps)
        ours.text_pass(ids, branch)
        got = ours.video_step(latents, torch.tensor(500.0), branch)
    assert (got - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()


def test_unknown_attention_backend_is_rejected(checkpoints):
    ours = load_transformer(checkpoints["gqa3_fps24"][1], dtype=torch.float32)
    with pytest.raises(RequestError, match="unknown model.attention_backend"):
        ours.set_attention_backend("flash3")


def test_fa4_backend_needs_its_package(monkeypatch):
    """On a CUDA machine without flash-attn-4 the request fails in one line naming the package."""
    import importlib.util

    from cosmos3_compiled import attention

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("flash_attn") else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with pytest.raises(RequestError, match="needs the flash-attn-4 package"):
        attention.check_backend("fa4", torch.device("cuda"), torch.bfloat16)
    with pytest.raises(RequestError, match="needs device=cuda"):  # and on the CPU, the device first
        attention.check_backend("fa4", torch.device("cpu"), torch.bfloat16)


def test_text_passes_of_both_prompts_match_one_at_a_time():
    """The request's text pass runs every CFG prompt layer by layer (one weight stream for all): the K/V
    buffers must equal those of one prompt at a time, bit for bit, also for prompts of different lengths."""
    from cosmos3_compiled.checkpoint import build_random
    from cosmos3_compiled.config import preset

    model = build_random(preset("debug"), seed=3, dtype=torch.float32)
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,), generator=gen) for n in (13, 7)]
    one, both = text_kv_both_ways(model, model, prompts)
    assert same_text_kv(one, both)
    assert all(k.abs().sum() > 0 for branch in one for k in branch.k_bufs)  # the text rows were written
    with pytest.raises(ValueError, match="set up for 7"):
        model.text_passes([(prompts[0], both[1])])
