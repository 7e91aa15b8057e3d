"""ModelOpt FP8 checkpoints on the CPU: a tiny FP8 checkpoint (diffusers' tiny model, its linears quantised per
tensor, input scales calibrated on a forward pass) loads as it is; our step equals diffusers' FP8 handling
(`pipelines/cosmos/mixed_precision.py` on the same model) in a W8A16 and a W8A8 step; the W8A8 arithmetic
equals an independent computation; the policy's step classification and the path classification equal the
reference's; switching regimes is a guard hit of two compiled graphs, never a recompile."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from diffusers.pipelines.cosmos import mixed_precision as mp
from dit_reference import build_reference_transformer, reference_velocity
from fp8_reference import ModelOptLinearStandIn, make_fp8_tool, reference_fp8
from safetensors.torch import save_file
from torch import nn

from cosmos3_compiled import fp8
from cosmos3_compiled.checkpoint import load_transformer
from cosmos3_compiled.errors import RequestError

TINY = dict(hidden_size=96, num_hidden_layers=2, head_dim=16, intermediate_size=160, vocab_size=300,
            rope_axes_dim=[4, 2, 2], num_attention_heads=4, num_key_value_heads=2)
LATENT, FPS, STEPS = (2, 4, 6), 16.0, 35


def _inputs():
    gen = torch.Generator().manual_seed(11)
    return torch.randint(0, TINY["vocab_size"], (9,), generator=gen), torch.randn(1, 48, *LATENT, generator=gen)


def _calibrate(ref) -> dict[str, float]:
    """amax|x| of every linear's input over one forward (what ModelOpt's calibration records)."""
    amax, hooks = {}, []
    for name, m in ref.named_modules():
        if isinstance(m, nn.Linear):
            def hook(_m, args, _out, name=name):
                amax[name] = max(amax.get(name, 0.0), args[0].detach().abs().max().item())
            hooks.append(m.register_forward_hook(hook))
    ids, latents = _inputs()
    with torch.no_grad():
        reference_velocity(ref, ids.tolist(), latents, 700, FPS)
    for h in hooks:
        h.remove()
    return amax


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    ref = build_reference_transformer(seed=4, **TINY)
    state = fp8.quantize_state_dict(ref.state_dict(), _calibrate(ref))
    folder = tmp_path_factory.mktemp("fp8") / "transformer"
    ref.save_pretrained(folder, safe_serialization=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = fp8.default_quantization_config()
    (folder / "config.json").write_text(json.dumps(config))
    return folder, reference_fp8(ref, state), config["quantization_config"]


def test_fp8_checkpoint_loads_as_it_is(fp8_checkpoint):
    folder, _, _ = fp8_checkpoint
    model = load_transformer(folder, dtype=torch.bfloat16)
    linears = dict((n, m) for n, m in model.named_modules() if isinstance(m, fp8.Fp8Linear))
    # per layer: text q, k, v, out + text MLP gate, up, down; video q|k|v fused, add_out, gate|up fused, down
    assert len(linears) == TINY["num_hidden_layers"] * 11
    for m in linears.values():
        assert m.weight.dtype == torch.float8_e4m3fn and m.weight_scale.dtype == torch.float32
        assert m.input_scale.dtype == torch.float32
    assert isinstance(model.proj_in, nn.Linear) and model.proj_in.weight.dtype == torch.bfloat16  # excluded
    assert model.time_embedder.linear_1.weight.dtype == torch.float32
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    # the fused video projections keep one scale per slice
    qkv = linears["layers.0.self_attn.gen_qkv"]
    assert qkv.slices == (64, 32, 32) and qkv.weight_scale.shape == (3,) and not qkv.uniform
    assert linears["layers.0.mlp_moe_gen.gate_up"].slices == (160, 160)


def test_unsupported_quantization_is_one_line(fp8_checkpoint, tmp_path):
    folder, _, _ = fp8_checkpoint
    other = tmp_path / "transformer"
    other.mkdir()
    (other / "diffusion_pytorch_model.safetensors").symlink_to(folder / "diffusion_pytorch_model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4"}
    (other / "config.json").write_text(json.dumps(config))
    with pytest.raises(RequestError, match="only ModelOpt FP8"):
        load_transformer(other, dtype=torch.float32)


def test_path_classification_matches_reference(fp8_checkpoint):
    _, ref8, _ = fp8_checkpoint
    names = [n for n, m in ref8.named_modules() if isinstance(m, (nn.Linear, ModelOptLinearStandIn))]
    assert names and all(fp8.linear_group(n) == mp._classify_cosmos3_linear(n) for n in names)
    # the quirk, spelled out: the text tower's attention projections follow the step, the video tower's do not
    assert fp8.linear_group("layers.0.self_attn.to_k") == "generation"
    assert fp8.linear_group("layers.0.self_attn.add_k_proj") == "reasoner"
    assert fp8.linear_group("layers.0.mlp_moe_gen.up_proj") == "generation"
    assert fp8.linear_group("layers.0.mlp.up_proj") == "reasoner"


@pytest.mark.parametrize("step,regime", [(0, "W8A16"), (10, "W8A8")])
def test_step_matches_reference_mixed_precision(step, regime, fp8_checkpoint):
    """The whole forward of one denoising step (text tower included: the reference runs it every step) at the
    shipped policy, against diffusers' runtime switching the stand-in ModelOpt linears."""
    folder, ref8, qc = fp8_checkpoint
    ours = load_transformer(folder, dtype=torch.float32)
    policy = fp8.Fp8Policy.resolve(fp8.read_quantization_config(folder))
    config = mp.Cosmos3MixedPrecisionConfig.resolve(quantization_config=qc)
    ids, latents = _inputs()
    assert mp.apply_cosmos3_mixed_precision_step(ref8, config, step, STEPS) == regime
    assert fp8.set_step_regime(ours, policy, step, STEPS) == regime
    try:
        with torch.no_grad():
            expected = reference_velocity(ref8, ids.tolist(), latents, 600, FPS)
            branch = ours.setup_branch(len(ids), LATENT, fps=FPS)
            ours.text_pass(ids, branch)
            got = ours.video_step(latents, torch.tensor(600.0), branch)
            # the other regime differs by far more than the tolerance (the comparison is not vacuous)
            fp8.set_step_regime(ours, policy, 10 if step == 0 else 0, STEPS)
            ours.text_pass(ids, branch)
            other = ours.video_step(latents, torch.tensor(600.0), branch)
    finally:
        mp.reset_cosmos3_mixed_precision(ref8, config)
    scale = expected.abs().max().item()
    err = (got - expected).abs().max().item()
    # W8A16: the same fp32 ops as the reference (seen: 4e-7 relative). W8A8: the stand-in accumulates in float64,
    # and an input differing in its last fp32 bits could round to the next fp8 value (seen: 3e-7 relative)
    assert err <= (1e-5 if regime == "W8A16" else 1e-4) * scale, f"{regime}: {err:.3g} vs scale {scale:.3g}"
    assert (other - expected).abs().max().item() > 10 * max(err, 1e-6 * scale)


def test_w8a8_arithmetic_equals_independent_computation():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=gen) / 8
    x = torch.randn(5, 7, 64, generator=gen) * 3
    w8, ws = fp8.quantize_weight(w)
    xs = torch.tensor(x.abs().max().item() * 0.6 / 448)  # calibrated below this input's amax: some clamping
    lin = fp8.Fp8Linear(64, 48, True)
    lin.weight.data, lin.weight_scale.data, lin.input_scale.data = w8, ws, xs
    lin.bias = nn.Parameter(torch.randn(48, generator=gen), requires_grad=False)
    lin.setup_buffers()
    got = lin(x)
    x8 = torch.clamp(x.double() / xs.double(), -448, 448).to(torch.float8_e4m3fn)
    assert (x8.double().abs() == 448).any()  # clamping was exercised
    want = ((x8.double() * xs.double()) @ (w8.double() * ws.double()).t() + lin.bias.double()).float()
    assert torch.allclose(got, want, rtol=1e-6, atol=1e-6 * want.abs().max().item())
    # and torch's own scaled GEMM (it has a CPU kernel) on the same fp8 operands
    ref = torch._scaled_mm(x8.float().reshape(-1, 64).to(torch.float8_e4m3fn), w8.t(), scale_a=xs, scale_b=ws,
                           bias=lin.bias, out_dtype=torch.float32).view(5, 7, 48)
    assert torch.allclose(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # fused with different slice scales: the same as the separate linears, in both regimes
    parts = []
    for rows in (16, 32):
        p = fp8.Fp8Linear(64, rows, False)
        w8p, wsp = fp8.quantize_weight(torch.randn(rows, 64, generator=gen))
        p.weight.data, p.weight_scale.data, p.input_scale.data = w8p, wsp, xs * rows / 16
        p.setup_buffers()
        parts.append(p)
    fused = fp8.Fp8Linear.concat(parts)
    for mode in fp8.REGIMES:
        for m in (*parts, fused):
            m.mode = mode
        assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))


def test_fused_w8a8_with_one_input_scale_is_one_rowwise_gemm(monkeypatch):
    """q|k|v (gate|up) read the same input, so their calibrated input scales agree while their weight scales do
    not: the fused linear quantises the input once and runs one row-wise-scaled GEMM, equal to the separate
    linears and to torch's own row-wise `_scaled_mm` (it has a CPU kernel) on the same operands."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 64, generator=gen, dtype=torch.bfloat16)
    xs = torch.tensor(x.float().abs().max().item() / 448)
    parts = []
    for rows in (16, 8, 8):
        p = fp8.Fp8Linear(64, rows, False)
        p.weight.data, p.weight_scale.data = fp8.quantize_weight(torch.randn(rows, 64, generator=gen) * rows)
        p.input_scale.data = xs.clone()
        p.setup_buffers()
        parts.append(p)
    fused = fp8.Fp8Linear.concat(parts)
    assert fused.shared_input and not fused.uniform
    calls = []
    real = fp8.scaled_mm
    monkeypatch.setattr(fp8, "scaled_mm", lambda *a: calls.append(a[3].shape) or real(*a))
    got = fused(x)
    assert calls == [(32,)]  # one GEMM, one weight scale per output row
    monkeypatch.setattr(fp8, "scaled_mm", real)
    assert torch.equal(got, torch.cat([p(x) for p in parts], dim=-1))
    x8 = fp8.quantize_input(x.reshape(-1, 64), xs)
    ref = torch._scaled_mm(x8, fused.weight.t(), scale_a=xs.reshape(1, 1).expand(15, 1).contiguous(),
                           scale_b=fused.row_scale.reshape(1, -1), out_dtype=torch.bfloat16)
    # the same products and scales; an element may round one bf16 step the other way (its fp32 epilogue order)
    assert ((got.reshape(-1, 32).float() - ref.float()).abs() <= 2 ** -7 * ref.float().abs()).all()


POLICY_CASES = {
    "shipped": (fp8.default_quantization_config(), {}),
    "distilled (no policy)": (fp8.default_quantization_config(step_policy=False), {}),
    "first 5, last 0": (fp8.default_quantization_config(), dict(first_steps=5, last_steps=0)),
    "native windows, base reasoner": (None, {}),
}


def _custom_policy():
    qc = fp8.default_quantization_config()
    spec = qc["runtime"]["diffusion_step_policy"]
    spec.update(first_steps={"count": 2, "mode": "native"}, overlap="native", reasoner="native")
    return qc


POLICY_CASES["native windows, base reasoner"] = (_custom_policy(), {})


@pytest.mark.parametrize("case", list(POLICY_CASES))
@pytest.mark.parametrize("num_steps", [35, 1, 4, 6])
def test_policy_classifies_steps_as_reference(case, num_steps):
    qc, overrides = POLICY_CASES[case]
    ours = fp8.Fp8Policy.resolve(qc, **overrides)
    theirs = mp.Cosmos3MixedPrecisionConfig.resolve(
        quantization_config=qc, **{f"mixed_precision_{k}": v for k, v in overrides.items()})
    expected = [theirs.precision_name(i, num_steps) for i in range(num_steps)]
    if not theirs.enabled:  # the reference leaves every linear on the native W8A8
        assert expected == ["base"] * num_steps
        expected = ["W8A8"] * num_steps
        reasoner = "a8"
    else:
        reasoner = "a16" if theirs.reasoner_policy == "high_precision" else "a8"
    assert ours.schedule(num_steps) == expected
    assert all(ours.group_regime("reasoner", i, num_steps) == reasoner for i in range(num_steps))
    if case == "shipped" and num_steps == 35:
        assert expected == ["W8A16"] * 3 + ["W8A8"] * 29 + ["W8A16"] * 3
        assert ours.regime_changes(35) == [0, 3, 32]


def test_policy_overrides():
    qc = fp8.default_quantization_config()
    assert fp8.Fp8Policy.resolve(qc, "a16").schedule(4) == ["W8A16"] * 4
    a8 = fp8.Fp8Policy.resolve(qc, "a8")
    assert a8.schedule(35) == ["W8A8"] * 35 and a8.group_regime("reasoner", 0, 35) == "a8"
    with pytest.raises(RequestError, match="precision.policy"):
        fp8.Fp8Policy.resolve(qc, "fp4")
    with pytest.raises(RequestError, match="first_steps"):
        fp8.Fp8Policy.resolve(qc, first_steps=-1)


def test_regimes_are_two_graphs_without_recompiles(fp8_checkpoint):
    """Regional compile of the FP8 step: one warm-up per regime, then switching is a guard hit."""
    from cosmos3_compiled.compile import apply_compile
    from cosmos3_compiled.schema import CompileConfig

    folder, _, qc = fp8_checkpoint
    eager, compiled = (load_transformer(folder, dtype=torch.float32) for _ in range(2))
    apply_compile(compiled, CompileConfig(mode="default", scope="blocks", fullgraph=True), backend="aot_eager")
    policy = fp8.Fp8Policy.resolve(qc)
    ids, latents = _inputs()
    branches = []
    for m in (eager, compiled):
        b = m.setup_branch(len(ids), LATENT, fps=FPS)
        m.text_pass(ids, b)
        branches.append(b)
    with torch.no_grad():
        for step in (0, 10):  # warm-up: both regimes
            fp8.set_step_regime(compiled, policy, step, STEPS)
            compiled(latents, torch.tensor(900.0), branches[1])
        with torch.compiler.set_stance("fail_on_recompile"):
            for step in (0, 10, 3, 33, 20):
                for m, b in ((eager, branches[0]), (compiled, branches[1])):
                    fp8.set_step_regime(m, policy, step, STEPS)
                want = eager(latents, torch.tensor(500.0), branches[0])
                got = compiled(latents, torch.tensor(500.0), branches[1])
                assert (got - want).abs().max().item() <= 1e-4 * want.abs().max().item()


def test_tool_checkpoint_a16_equals_the_dequantized_checkpoint(tmp_path):
    """tools/make_fp8_checkpoint.py on the embedded debug checkpoint; with every step W8A16 the step equals the
    unquantized model loaded from the dequantized weights (fp8 weight × scale, float32)."""
    from safetensors.torch import load_file

    from cosmos3_compiled.components import write_checkpoint

    src = write_checkpoint(tmp_path / "bf16")
    dst = make_fp8_tool().make_fp8_checkpoint(src, tmp_path / "fp8")
    assert json.loads((dst / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "FP8"
    state = load_file(str(dst / "transformer" / "diffusion_pytorch_model.safetensors"))
    deq = {k: v for k, v in state.items() if not k.endswith(fp8.SCALE_KEYS)}
    for name in fp8.quantized_modules(state):
        deq[f"{name}.weight"] = state[f"{name}.weight"].float() * state[f"{name}.weight_scale"]
    plain = tmp_path / "deq" / "transformer"
    plain.mkdir(parents=True)
    save_file(deq, str(plain / "diffusion_pytorch_model.safetensors"))
    (plain / "config.json").write_text((src / "transformer" / "config.json").read_text())

    quant, ref = load_transformer(dst / "transformer", dtype=torch.float32), load_transformer(plain, dtype=torch.float32)
    assert fp8.is_fp8_model(quant) and not fp8.is_fp8_model(ref)
    policy = fp8.Fp8Policy.resolve(fp8.read_quantization_config(dst / "transformer"), "a16")
    fp8.set_step_regime(quant, policy, 5, 35)
    ids = torch.arange(10) * 3
    latents = torch.randn(1, 48, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    outs = []
    with torch.no_grad():
        for m in (quant, ref):
            b = m.setup_branch(10, (2, 4, 4), fps=16.0)
            m.text_pass(ids, b)
            outs.append(m.video_step(latents, torch.tensor(400.0), b))
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-4 * outs[1].abs().max().item()


def test_fp8_attention_runs_at_the_w8a8_steps_only_and_stays_close_to_bf16(fp8_checkpoint):
    """precision.fp8_attention: the W8A16 steps unchanged, the W8A8 steps' attention in FP8 (the CPU path is the
    kernel's emulation) close to the bf16-attention step; under compile the flag is its own graph, no recompile."""
    from cosmos3_compiled.compile import apply_compile
    from cosmos3_compiled.schema import CompileConfig

    folder, _, qc = fp8_checkpoint
    model = load_transformer(folder, dtype=torch.float32)
    plain = fp8.Fp8Policy.resolve(qc)
    with_fp8 = dataclasses.replace(plain, fp8_attention=True)
    ids, latents = _inputs()
    b = model.setup_branch(len(ids), LATENT, fps=FPS)

    def step(policy, i):
        fp8.set_step_regime(model, policy, i, STEPS)
        model.text_pass(ids, b)
        with torch.no_grad():
            return model(latents, torch.tensor(500.0), b)

    assert torch.equal(step(with_fp8, 0), step(plain, 0))  # a W8A16 step: bf16 attention either way
    base, quant = step(plain, 10), step(with_fp8, 10)
    assert model.attention.fp8 and not torch.equal(base, quant)
    err = (quant - base).norm() / base.norm()
    assert 0 < err.item() < 0.1

    apply_compile(model, CompileConfig(mode="default", scope="blocks", fullgraph=True), backend="aot_eager")
    with torch.no_grad():
        for i in (0, 10):
            step(with_fp8, i)
        with torch.compiler.set_stance("fail_on_recompile"):
            assert torch.allclose(step(with_fp8, 10), quant, atol=1e-5) and torch.equal(step(with_fp8, 0), step(plain, 0))


def test_fp8_attention_quantization_fills_the_fp8_range_per_head():
    """quantize_qkv: each head's amax lands on fp8's 448 (per query head / per KV head scales), V key-minor, and
    the emulated attention is within fp8 rounding of float32 SDPA (GQA included)."""
    from cosmos3_compiled import fp8_attention

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(4, 40, 16, generator=gen) * torch.tensor([0.3, 1.0, 1.0, 2.0])[:, None, None]
    k, v = (torch.randn(2, 70, 16, generator=gen) for _ in range(2))
    q8, k8, v8t, s_qk, sv = fp8_attention.quantize_qkv(q, k, v)
    for t in (q8, k8, v8t):
        assert torch.equal(t.float().abs().amax(dim=(1, 2)), torch.full((t.shape[0],), 448.0))
    assert v8t.shape == (2, 16, 70) and v8t.is_contiguous()
    out = fp8_attention.emulate(q8, k8, v8t, s_qk, sv, torch.float32, block=32)
    ref = torch.nn.functional.scaled_dot_product_attention(q[None], k[None], v[None], enable_gqa=True)[0]
    ref = ref.transpose(0, 1).reshape(40, 64)
    err = (out - ref).norm() / ref.norm()  # e4m3 keeps 3 mantissa bits: a few percent on Q, K, V and P each
    assert err.item() < 0.08
    whole = fp8_attention.emulate(q8, k8, v8t, s_qk, sv, torch.float32)  # default block: all 70 keys at once
    assert torch.equal(fp8_attention.attention(q, k, v), whole)  # the CPU path is the emulation
