"""GPU-only: the fused q/k norm + RoPE + K/V-write Triton kernel against the composable ops it replaces,
eager and inside a fullgraph compile (skipped without CUDA)."""

import pytest
import torch

from cosmos3_compiled import attention, offload, ops
from cosmos3_compiled.checkpoint import build_random
from cosmos3_compiled.compile import apply_compile
from cosmos3_compiled.config import preset
from cosmos3_compiled.errors import RequestError
from cosmos3_compiled.schema import CompileConfig
from helpers import same_text_kv, text_kv_both_ways

pytestmark = pytest.mark.gpu


def _reference(qkv, weight, cos, sin, k_buf, v_buf, start, eps, style, hq):
    hkv, _, d = k_buf.shape
    n = qkv.shape[0]
    qk = ops.apply_qk_norm(qkv[:, : (hq + hkv) * d].view(n, hq + hkv, d), weight, eps, style)
    q = ops.apply_rope(qk[:, :hq], cos, sin)
    k_buf[:, start:] = ops.apply_rope(qk[:, hq:], cos, sin).transpose(0, 1)
    v_buf[:, start:] = qkv[:, (hq + hkv) * d :].view(n, hkv, d).transpose(0, 1)
    return q


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("style", ["standard", "nemotron"])
@pytest.mark.parametrize("token_major_kv", [False, True])
@pytest.mark.parametrize("q_head_major", [False, True])
def test_qk_norm_rope_kv_matches_ops(dtype, style, token_major_kv, q_head_major):
    from cosmos3_compiled import triton_kernels

    torch.manual_seed(0)
    dev, hq, hkv, d, n, text = "cuda", 6, 2, 32, 37, 5
    qkv = torch.randn(n, (hq + 2 * hkv) * d, device=dev, dtype=dtype) * 3
    weight = (1 + 0.3 * torch.randn(hq + hkv, d, device=dev)).to(dtype)
    ang = (torch.rand(d // 2, n, device=dev) * 6).t()  # [N, D/2] with transposed strides, as mrope_tables makes
    cos, sin = ang.cos().to(dtype), ang.sin().to(dtype)

    def bufs():
        shape = (text + n, hkv, d) if token_major_kv else (hkv, text + n, d)
        k = torch.randn(shape, device=dev, dtype=dtype)
        v = torch.randn(shape, device=dev, dtype=dtype)
        return (k.transpose(0, 1), v.transpose(0, 1)) if token_major_kv else (k, v)

    k_ref, v_ref = bufs()
    k_got, v_got = k_ref.clone(), v_ref.clone()  # same contents; clone keeps the layout
    q_ref = _reference(qkv, weight, cos, sin, k_ref, v_ref, text, 1e-6, style, hq)
    q_got = triton_kernels.qk_norm_rope_kv(qkv, weight, cos, sin, k_got, v_got, text, 1e-6, style == "nemotron",
                                           q_head_major)
    assert q_got.shape == (n, hq, d)
    assert q_got.transpose(0, 1).is_contiguous() == q_head_major
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: one rounding here vs one per op in eager
    torch.testing.assert_close(q_got, q_ref, atol=tol * 4, rtol=tol)
    torch.testing.assert_close(k_got, k_ref, atol=tol * 4, rtol=tol)
    assert torch.equal(v_got, v_ref)  # values are copied, not computed
    assert torch.equal(k_got[:, :text], k_ref[:, :text])  # text rows untouched


@pytest.mark.parametrize("backend", ["auto", "fa4"])
def test_fused_step_compiles_fullgraph_and_matches(backend):
    if backend == "fa4":
        try:
            attention.check_backend("fa4", torch.device("cuda"), torch.bfloat16)
        except RequestError as err:
            pytest.skip(str(err))
    latent_shape = (2, 6, 8)
    dtype = torch.bfloat16 if backend == "fa4" else torch.float32  # the FA4 kernels take 16-bit inputs only
    tol = 2e-2 if backend == "fa4" else 1e-4
    ref = build_random(preset("debug"), seed=3, dtype=dtype, device=torch.device("cuda"))
    fused = build_random(preset("debug"), seed=3, dtype=dtype, device=torch.device("cuda"))
    for m in (ref, fused):
        m.setup_buffers()
        m.set_attention_backend(backend)
    fused.set_fused_qk_rope(True)
    apply_compile(fused, CompileConfig(mode="default", scope="blocks", fullgraph=True))
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, ref.cfg.vocab_size, (11,), generator=gen)
    latents = torch.randn(1, 48, *latent_shape, generator=gen).cuda()
    branches = []
    for m in (ref, fused):
        b = m.setup_branch(11, latent_shape, fps=16.0)
        m.text_pass(ids, b)
        branches.append(b)
    with torch.no_grad():
        fused(latents, torch.tensor(999.0, device="cuda"), branches[1])
        with torch.compiler.set_stance("fail_on_recompile"):
            for t in (700.0, 30.0):
                want = ref(latents, torch.tensor(t, device="cuda"), branches[0])
                got = fused(latents, torch.tensor(t, device="cuda"), branches[1])
                assert (got - want).abs().max().item() <= tol * want.abs().max().item()
                for kr, kf in zip(branches[0].k_bufs, branches[1].k_bufs):
                    torch.testing.assert_close(kf.float(), kr.float(), atol=tol * 4, rtol=tol)


def test_offloaded_text_pass_streams_the_same_keys_and_values():
    """Text tower packed into registered host memory and streamed in once for both CFG prompts, with the next
    layer's copies overlapping this layer's compute: the K/V buffers come out bit for bit as with the weights
    resident and one prompt at a time, and the weights stay on the host, page-locked."""
    dev = torch.device("cuda")
    resident = build_random(preset("debug"), seed=4, dtype=torch.bfloat16, device=dev)
    offloaded = build_random(preset("debug"), seed=4, dtype=torch.bfloat16, device=dev, offload_text_tower=True)
    offload.offload_text_tower(offloaded, pin=True)  # compile.pin_text_tower: the copies can then overlap compute
    assert offload.text_offloaded(offloaded)
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, resident.cfg.vocab_size, (n,), generator=gen) for n in (19, 11)]
    want, got = text_kv_both_ways(resident, offloaded, prompts)
    torch.cuda.synchronize()
    assert same_text_kv(want, got)
    text_params = offload.text_params(offloaded)
    assert text_params and all(p.device.type == "cpu" and p.is_pinned() for p in text_params)


def test_random_text_tower_drawn_into_page_locked_memory_is_the_same_model():
    """compile.pin_text_tower with seeded random weights: the text tower is page-locked before it is drawn (no
    packing copy afterwards); every parameter equals the model built resident and the weights stay pinned."""
    dev = torch.device("cuda")
    resident = build_random(preset("debug"), seed=4, dtype=torch.bfloat16, device=dev)
    pinned = build_random(preset("debug"), seed=4, dtype=torch.bfloat16, device=dev, offload_text_tower=True,
                          pin_text_tower=True)
    want = dict(resident.named_parameters())
    for name, p in pinned.named_parameters():
        assert torch.equal(p.detach().cpu(), want[name].detach().cpu()), name
    text_params = offload.text_params(pinned)
    assert text_params and all(p.device.type == "cpu" and p.is_pinned() for p in text_params)


def test_fp8_rowwise_fused_linear_matches_the_separate_linears_on_cuda():
    """The W8A8 q|k|v-style fusion with one input scale runs one row-wise `_scaled_mm` on the GPU; its outputs
    are the separate per-tensor GEMMs' to one bf16 rounding step, inside a fullgraph compile too."""
    from cosmos3_compiled import fp8

    torch.manual_seed(0)
    x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16)
    xs = (x.float().abs().max() / 448).cpu()
    parts = []
    for rows in (128, 64, 64):
        p = fp8.Fp8Linear(256, rows, False, device="cuda")
        w8, ws = fp8.quantize_weight(torch.randn(rows, 256, device="cuda") * rows)
        p.weight.data, p.weight_scale.data, p.input_scale.data = w8, ws, xs.cuda()
        p.setup_buffers()
        parts.append(p)
    fused = fp8.Fp8Linear.concat(parts)
    assert fused.shared_input and not fused.uniform
    want = torch.cat([p(x) for p in parts], dim=-1).float()
    for got in (fused(x), torch.compile(fused, fullgraph=True)(x)):
        assert ((got.float() - want).abs() <= 2 ** -7 * want.abs() + 1e-6).all()


@pytest.mark.parametrize("same_weight_scale", [True, False], ids=["uniform", "per_slice_with_bias"])
def test_fp8_fused_linear_compiles_with_its_scales_taken_from_the_slice_vectors(same_weight_scale):
    """Inductor's `_scaled_mm` lowering on CUDA once failed on a per-tensor scale given as a 0-dim view into a fused
    linear's per-slice scale vector (the gate|up fusion of a Nano FP8 checkpoint, in the compiled W8A8 step):
    both the one-GEMM path (equal slice scales) and the per-slice path compile fullgraph and equal eager."""
    from cosmos3_compiled import fp8

    torch.manual_seed(0)
    x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16)
    parts = []
    for i, rows in enumerate((128, 128)):
        p = fp8.Fp8Linear(256, rows, not same_weight_scale, device="cuda")
        w8, ws = fp8.quantize_weight(torch.randn(rows, 256, device="cuda"))
        scale = torch.full((), 0.01, device="cuda") if same_weight_scale else ws
        p.weight.data, p.weight_scale.data = w8, scale
        p.input_scale.data = (x.float().abs().max() / 448 * (1 + i * (not same_weight_scale))).reshape(())
        if p.bias is not None:
            p.bias.data = torch.randn(rows, device="cuda", dtype=torch.bfloat16)
        p.setup_buffers()
        parts.append(p)
    fused = fp8.Fp8Linear.concat(parts)
    assert fused.uniform is same_weight_scale
    eager = fused(x).float()
    compiled = torch.compile(fused, fullgraph=True)(x).float()
    assert ((compiled - eager).abs() <= 2 ** -7 * eager.abs() + 1e-6).all()


@pytest.mark.parametrize("shape", [(8, 2, 1000, 1300, 128), (4, 4, 256, 256, 64)], ids=["gqa_tail", "mha_even"])
def test_fp8_attention_kernel_matches_its_emulation(shape):
    """The Triton FP8 attention kernel against `fp8_attention.emulate` (same quantized inputs), eager and in a
    fullgraph compile; the key length not a multiple of the block exercises the masked tail."""
    from cosmos3_compiled import fp8_attention

    hq, hkv, n, m, d = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(hq, n, d, device="cuda", dtype=torch.bfloat16, generator=gen)
    k, v = (torch.randn(hkv, m, d, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(2))
    want = fp8_attention.emulate(*fp8_attention.quantize_qkv(q, k, v), torch.float32)
    for fn in (fp8_attention.attention, torch.compile(fp8_attention.attention, fullgraph=True)):
        got = fn(q, k, v).float()
        assert got.shape == (n, hq * d)
        assert (got - want).norm() / want.norm() < 2e-2 and (got - want).abs().max() < 0.1
