"""Wan2.2 VAE: ours against diffusers' AutoencoderKLWan on a tiny random checkpoint in the official layout."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from helpers import randomize_
from safetensors.torch import load_file, save_file
from torch._dynamo.testing import CompileCounter

from cosmos3_compiled.checkpoint_io import CheckpointError
from cosmos3_compiled.compile import apply_compile_vae, reset_compile_vae
from cosmos3_compiled.postprocess import to_float_frames, to_uint8_frames, to_unit_range_
from cosmos3_compiled.progress import set_progress_enabled
from cosmos3_compiled.vae import load_vae, wan22_config

diffusers = pytest.importorskip("diffusers")

Z = 48
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _reference_vae(seed: int = 0):
    """Wan2.2 layout at tiny widths, with gains, biases and latent statistics all away from identity."""
    g = torch.Generator().manual_seed(seed)
    mean = (0.3 * torch.randn(Z, generator=g)).tolist()
    std = (0.5 + torch.rand(Z, generator=g)).tolist()
    ref = diffusers.AutoencoderKLWan(
        **wan22_config(base_dim=8, decoder_base_dim=8, z_dim=Z), latents_mean=mean, latents_std=std
    )
    return randomize_(ref, seed + 1).eval()


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    set_progress_enabled(False)
    yield
    set_progress_enabled(True)


@pytest.fixture(scope="module")
def ref():
    return _reference_vae()


@pytest.fixture(scope="module")
def folder(ref, tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_vae")
    ref.save_pretrained(root / "vae")
    return root


@pytest.fixture(scope="module")
def ours(folder):
    return load_vae(folder)


def _stats(ref, dtype=torch.float32):
    mean = torch.tensor(ref.config.latents_mean, dtype=dtype).view(1, -1, 1, 1, 1)
    inv_std = (1.0 / torch.tensor(ref.config.latents_std, dtype=dtype)).view(1, -1, 1, 1, 1)
    return mean, inv_std


def _reference_decode(ref, latent: torch.Tensor) -> torch.Tensor:
    """The Cosmos3 pipeline's decode path: z / (1/std) + mean in the VAE dtype, then vae.decode."""
    dtype = ref.dtype
    mean, inv_std = (x.to(latent.device) for x in _stats(ref, dtype))
    with torch.no_grad():
        return ref.decode(latent.to(dtype) / inv_std + mean).sample


def _latent(t: int, h: int, w: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, Z, t, h, w, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("t,h,w", [(1, 3, 5), (2, 4, 4), (3, 3, 5)])
def test_decode_matches_diffusers_fp32(ref, ours, t, h, w):
    latent = _latent(t, h, w, seed=10 * t + h)
    expected = _reference_decode(ref, latent)
    got = ours.decode_frames(latent)
    assert got.shape == expected.shape == (1, 3, 1 + 4 * (t - 1), 16 * h, 16 * w)
    assert (got.abs() < 1).float().mean() > 0.5  # not just the clamp talking
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("tiles,t,h,w", [(2, 3, 2, 30), (3, 1, 2, 30), (3, 3, 3, 7), (5, 2, 2, 5)])
def test_tile_major_decode_matches_diffusers_fp32(ref, ours, tiles, t, h, w, monkeypatch):
    """Column strips with halos, cropped after every resnet and upsampling: the whole-frame result, strip edges included
    (w=30: halos narrower than the frame; w=5, 7: halos reaching across it, strips one or two columns wide)."""
    monkeypatch.setattr(ours, "tiles", tiles)
    latent = _latent(t, h, w, seed=40 + t + w)
    got = ours.decode_frames(latent)
    assert (got - _reference_decode(ref, latent)).abs().max().item() <= 1e-5
    strips = ours.decoder.column_tiles(w, tiles)
    assert [s.dst for s in strips] == [(8 * w * k // tiles, 8 * w * (k + 1) // tiles) for k in range(tiles)]
    if w == 30:  # the interior edges read a halo, the frame's edges do not
        assert strips[0].src[0] == 0 and 15 < strips[0].src[1] < 30 and strips[-1].src[1] == 30


def test_tile_count_is_checked(ours):
    with pytest.raises(ValueError, match="column tiles must be 1..4"):
        ours.decoder.column_tiles(4, 5)


def _one_rank_gather(rank: int, world: int):
    """An all-gather as rank `rank` sees it, with the other ranks' rows NaN: what this rank computed shows."""
    return lambda x: torch.cat([x if k == rank else torch.full_like(x, float("nan")) for k in range(world)])


@pytest.mark.parametrize("world,t,h,w,exact", [(2, 3, 3, 4, True), (3, 2, 7, 3, False), (4, 2, 1, 2, False)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_row_parallel_decode_is_exact(folder, ref, world, t, h, w, exact, channels_last):
    """Row blocks with halos from `Decoder.span`, tail histories sliced from frame 0's: every rank's own rows
    (and frame 0, decoded whole everywhere) are the single-device decode (h=1, world 4: empty blocks). Bit for
    bit where the CPU convs round alike at both heights (`exact`; a halo one row short shows at ~1e-7)."""
    vae = load_vae(folder, with_encoder=False, channels_last_3d=channels_last)
    latent = _latent(t, h, w, seed=60 + world)
    want = vae.decode_frames(latent)
    assert (want - _reference_decode(ref, latent)).abs().max().item() <= 1e-5
    got = torch.full_like(want, float("nan"))
    for rank in range(world):
        split = vae.setup_row_parallel(rank, world, _one_rank_gather(rank, world))
        mine = vae.decode_frames(latent)
        assert torch.equal(mine[:, :, 0], want[:, :, 0])
        per, a, b = split.block(2 * h)  # tail input: latent rows x 2 (the split block's x2 runs in the tail)
        err = (mine[:, :, 1:, 8 * a : 8 * b] - want[:, :, 1:, 8 * a : 8 * b]).abs()
        assert err.numel() == 0 or err.max().item() <= (0.0 if exact and not channels_last else 1e-5)
        assert mine[:, :, 1:, : 8 * a].isnan().all() and mine[:, :, 1:, 8 * b :].isnan().all()
        got = torch.where(got.isnan(), mine, got)
    assert (got - want).abs().max().item() <= (0.0 if exact and not channels_last else 1e-5)
    vae.tiles = 2
    with pytest.raises(ValueError, match="two different splits"):
        vae.decode_frames(latent)


def test_row_halo_is_the_column_walk(ours):
    """Rows and columns share one receptive-field walk: a tail row block's halo is the column walk's over
    the same layers, and the whole up path's walk reaches further (it also crosses the head's resnets)."""
    dec = ours.decoder
    for size, out in [(24, (0, 48)), (24, (48, 96)), (28, (40, 80))]:
        strip = dec.span(out, size, tail=True)
        assert strip.src[0] <= out[0] // 4 and strip.src[1] >= out[1] // 4  # it covers the rows it owns
        assert strip.crops[: dec.tail_first] == (None,) * dec.tail_first
    assert dec.span((0, 48), 24, tail=True).src == (0, 18) and dec.span((48, 96), 24, tail=True).src == (6, 24)
    whole = dec.span((0, 48), 6)  # the same output range from the stem (4 x fewer rows)
    assert whole.src[1] * 4 > 18


def test_decode_into_given_buffer(ref, ours):
    latent = _latent(2, 2, 3, seed=5)
    out = torch.full((1, 3, 5, 32, 48), float("nan"), dtype=torch.float64)
    got = ours.decode_frames(latent, out=out)
    assert got is out and not torch.isnan(out).any()
    assert (out.float() - _reference_decode(ref, latent)).abs().max().item() <= 1e-5


def test_decode_bf16_as_accurate_as_diffusers_bf16(folder, ref):
    """bf16 rounding differs in order from the reference's, so judge both against the fp32 result."""
    ref_bf16 = diffusers.AutoencoderKLWan.from_pretrained(folder / "vae", torch_dtype=torch.bfloat16).eval()
    ours = load_vae(folder, dtype=torch.bfloat16)
    latent = _latent(3, 3, 4, seed=7)
    exact = _reference_decode(ref, latent)
    ref_err = (_reference_decode(ref_bf16, latent).float() - exact).abs()
    got = ours.decode_frames(latent)
    assert got.dtype == torch.bfloat16
    err = (got.float() - exact).abs()
    assert err.mean() <= 1.25 * ref_err.mean() and err.max() <= 2 * ref_err.max()


def test_channels_last_and_decoder_only_match(folder, ref):
    latent = _latent(3, 3, 4, seed=8)
    expected = _reference_decode(ref, latent)
    cl = load_vae(folder, channels_last_3d=True, with_encoder=False)
    assert cl.encoder is None
    assert (cl.decode_frames(latent) - expected).abs().max().item() <= 1e-5
    assert all(k.startswith("decoder.") or k == "post_quant_conv.weight" or k == "post_quant_conv.bias" for k in cl.state_dict())
    with pytest.raises(ValueError, match="with_encoder=False"):
        cl.encode_mode(torch.zeros(1, 3, 1, 16, 16))


@pytest.mark.parametrize("frames,height,width", [(1, 16, 32), (5, 32, 16), (9, 16, 16)])
def test_encode_mode_matches_diffusers(ref, ours, frames, height, width):
    video = torch.rand(1, 3, frames, height, width, generator=torch.Generator().manual_seed(frames)) * 2 - 1
    mean, inv_std = _stats(ref)
    with torch.no_grad():
        mu = ref.encode(video).latent_dist.mode()
    expected = (mu - mean) * inv_std
    got = ours.encode_mode(video)
    assert got.shape == expected.shape == (1, Z, 1 + (frames - 1) // 4, height // 16, width // 16)
    assert (got - expected).abs().max().item() <= 1e-5


# ---------------------------------------------------------------------------------------- postprocess


def test_postprocess_matches_video_processor(ref, ours):
    from diffusers.video_processor import VideoProcessor

    latent = _latent(2, 2, 3, seed=11)
    video = ours.decode_frames(latent)
    ref_np = VideoProcessor(vae_scale_factor=16).postprocess_video(_reference_decode(ref, latent), output_type="np")[0]
    unit = to_float_frames(video)
    assert unit.shape == (5, 32, 48, 3) and unit.dtype == torch.float32
    assert np.abs(unit.numpy() - ref_np).max() <= 1e-5
    u8 = to_uint8_frames(video)
    assert u8.dtype == torch.uint8 and u8.shape == (5, 32, 48, 3)
    scaled = ref_np * 255
    expected = scaled.round().astype(np.uint8)
    near_tie = np.abs(scaled - np.floor(scaled) - 0.5) < 1e-3
    assert (u8.numpy() == expected)[~near_tie].all()
    assert (np.abs(u8.numpy().astype(int) - expected.astype(int)) <= 1).all()
    in_place = video.clone()
    assert to_unit_range_(in_place) is in_place
    assert torch.equal(in_place.permute(0, 2, 3, 4, 1)[0], unit)


def test_uint8_frames_values_and_input_untouched():
    video = torch.tensor([-1.0, 1.0, 2 / 255 - 1, 0.0, -3.0]).view(1, 1, 1, 1, 5).expand(1, 3, 1, 1, 5).contiguous()
    before = video.clone()
    assert to_uint8_frames(video)[0, 0, :, 0].tolist() == [0, 255, 1, 128, 0]  # 127.5 rounds to even
    assert torch.allclose(to_float_frames(video)[0, 0, :, 1], torch.tensor([0.0, 1.0, 1 / 255, 0.5, 0.0]))
    assert torch.equal(video, before)


# ----------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "shape,match",
    [
        ((1, Z - 1, 2, 3, 3), "channels"),
        ((Z, 2, 3, 3), "rank 4"),
        ((1, Z, 0, 3, 3), "empty axis"),
        ((1, Z, 2, 0, 3), "empty axis"),
    ],
)
def test_decode_rejects_bad_latents(ours, shape, match):
    with pytest.raises(ValueError, match=match):
        ours.decode_frames(torch.zeros(shape))


def test_decode_rejects_bad_out_buffer(ours):
    with pytest.raises(ValueError, match="out must be"):
        ours.decode_frames(torch.zeros(1, Z, 2, 2, 2), out=torch.empty(1, 3, 4, 32, 32))


@pytest.mark.parametrize("shape", [(1, 3, 4, 16, 16), (1, 3, 1, 24, 16), (1, 4, 1, 16, 16)])
def test_encode_rejects_bad_video(ours, shape):
    with pytest.raises(ValueError, match="video"):
        ours.encode_mode(torch.zeros(shape))


# ------------------------------------------------------------------------------------ strict loading


def _copy_with(folder, tmp_path, config_edit=None, state_edit=None):
    dst = tmp_path / "vae"
    dst.mkdir()
    cfg = json.loads((folder / "vae" / "config.json").read_text())
    if config_edit:
        config_edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    if state_edit:
        state = load_file(folder / "vae" / WEIGHTS)
        state_edit(state)
        save_file(state, dst / WEIGHTS)
    else:
        shutil.copy(folder / "vae" / WEIGHTS, dst / WEIGHTS)
    return tmp_path


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda s: s.pop("decoder.conv_out.bias"), "missing keys.*decoder.conv_out.bias"),
        (lambda s: s.update(extra=torch.zeros(2)), "unexpected keys.*extra"),
        (lambda s: s.update({"decoder.norm_out.gamma": torch.ones(9, 1, 1, 1)}), "shape mismatches.*norm_out"),
    ],
)
def test_strict_loading(folder, tmp_path, edit, match):
    with pytest.raises(CheckpointError, match=match):
        load_vae(_copy_with(folder, tmp_path, state_edit=edit))


@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda c: c.update(is_residual=False), "is_residual"),
        (lambda c: c.update(patch_size=1), "patch_size"),
        (lambda c: c.update(latents_std=c["latents_std"][:-1]), "latents_std"),
        (lambda c: c.update(in_channels=3), "in_channels"),
        (lambda c: c.update(temperal_downsample=[True, True]), "temperal_downsample"),
        (lambda c: c.update(scale_factor_spatial=8), "scale_factor_spatial"),
        (lambda c: c.update(attn_scales=[0.5]), "attn_scales"),
    ],
)
def test_bad_config_rejected(folder, tmp_path, edit, match):
    with pytest.raises(CheckpointError, match=match):
        load_vae(_copy_with(folder, tmp_path, config_edit=edit))


def test_sharded_checkpoint_loads(ref, tmp_path):
    ref.save_pretrained(tmp_path / "vae", max_shard_size="200KB")
    assert (tmp_path / "vae" / f"{WEIGHTS}.index.json").is_file()
    vae = load_vae(tmp_path)
    latent = _latent(1, 2, 2, seed=3)
    assert (vae.decode_frames(latent) - _reference_decode(ref, latent)).abs().max().item() <= 1e-5


# -------------------------------------------------------------------------------------------- compile


def _compiled_decode(vae, latent, backend):
    """Two decodes with every compile unit compiled (`apply_compile_vae` with this dynamo backend, the layout as
    loaded); the second may not compile anything. The units are the class's methods again afterwards."""
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            apply_compile_vae(vae, "default", backend=backend)
            vae.decode_frames(latent)  # warm-up compiles; later chunks (and tail frames) reuse the graphs
            with torch.compiler.set_stance("fail_on_recompile"):
                return vae.decode_frames(latent)
    finally:
        reset_compile_vae(vae)


@pytest.mark.parametrize("channels_last", [False, True])
def test_units_compiled_for_a_short_clip_serve_a_longer_one(folder, channels_last):
    """A unit's input is its own tensor per latent frame, so its guards do not depend on the clip length: the
    graphs of a 3-frame decode serve a 6-frame one (what the decode warm-up during the denoise loop relies on)."""
    vae = load_vae(folder, with_encoder=False, channels_last_3d=channels_last)
    counter = CompileCounter()
    try:
        apply_compile_vae(vae, "default", backend=counter)
        vae.decode_frames(_latent(3, 2, 3, seed=30))
        graphs = counter.frame_count
        with torch.compiler.set_stance("fail_on_recompile"):
            vae.decode_frames(_latent(6, 2, 3, seed=31))
    finally:
        reset_compile_vae(vae)
    assert graphs >= 3 and counter.frame_count == graphs


@pytest.mark.parametrize("channels_last", [False, True])
def test_chunk_body_traces_fullgraph_without_recompiles(folder, channels_last):
    """fullgraph tracing + guard stability of the chunk functions (no codegen, so it stays fast)."""
    vae = load_vae(folder, with_encoder=False, channels_last_3d=channels_last)
    latent = _latent(4, 2, 3, seed=12)
    assert torch.equal(_compiled_decode(vae, latent, "eager"), vae.decode_frames(latent))


def test_tile_major_units_compile_once_per_strip(folder):
    """Each unit compiles once per strip (a strip's crops and shapes are its bucket), then the second decode
    runs without compiling anything, fullgraph, and equals the eager tile-major decode."""
    vae = load_vae(folder, with_encoder=False, channels_last_3d=True)
    vae.tiles = 2
    latent = _latent(3, 2, 30, seed=14)
    eager = vae.decode_frames(latent)
    counter = CompileCounter()
    torch._dynamo.reset()
    try:
        apply_compile_vae(vae, "default", backend=counter)  # decoder_first_chunk is not called by column strips
        assert all(name in vae.__dict__ for name in vae.compile_units)  # every unit replaced on the instance
        vae.decode_frames(latent)
        # stem: frame 0 (allocates) + later frames; first_tile, head, tail: one graph per strip
        assert counter.frame_count == 2 + 3 * 2
        with torch.compiler.set_stance("fail_on_recompile"):
            got = vae.decode_frames(latent)
        assert counter.frame_count == 8
    finally:
        reset_compile_vae(vae)
    assert not any(name in vae.__dict__ for name in vae.compile_units)  # the class's methods again
    assert torch.equal(got, eager)


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("channels_last", [False, True])
def test_cuda_decode_and_compiled_units_match_diffusers(folder, channels_last):
    ref = diffusers.AutoencoderKLWan.from_pretrained(folder / "vae").eval().cuda()
    vae = load_vae(folder, device="cuda", channels_last_3d=channels_last, with_encoder=False)
    latent = _latent(3, 3, 5, seed=21).cuda()
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # exact fp32 convs on both sides
        expected = _reference_decode(ref, latent)
        eager = vae.decode_frames(latent)
        assert (eager - expected).abs().max().item() <= 1e-4
        compiled = _compiled_decode(vae, latent, "inductor")
    assert (compiled - eager).abs().max().item() <= 1e-4
