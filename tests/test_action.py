"""Action-conditioned generation (`action.mode=...`): our tables and helpers against diffusers' own, the three action
tasks against diffusers' Cosmos3OmniPipeline(action=CosmosActionCondition(...)) on a tiny action-capable
official-layout checkpoint (fp32, CPU), and one-line refusals before any weights are read."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import compose_generate, torchrun
from PIL import Image
from reference import load_reference_pipeline, make_reference_checkpoint
from safetensors.torch import load_file, save_file

from cosmos3_compiled import action as act
from cosmos3_compiled.cli import quote_free_text
from cosmos3_compiled.errors import RequestError
from cosmos3_compiled.pipeline import generate
from cosmos3_compiled.request import prepare

ref_mod = pytest.importorskip("diffusers.pipelines.cosmos.pipeline_cosmos3_omni")

ACTION_DIM, DOMAIN, CHUNK, TIER = 16, "bridge_orig_lerobot", 4, 256
PROMPT, NEGATIVE = "The robot arm picks up the red block", "blurry"
SOURCE = (96, 400)  # height, width (multiples of 16): tier 256 → canvas 192 × 320, content 77 × 320 (downscaled)


def _frames(n: int, seed: int = 0) -> list[Image.Image]:
    gen = np.random.default_rng(seed)
    base = gen.integers(0, 256, size=(SOURCE[0] // 8, SOURCE[1] // 8, 3)).astype(np.float32)
    out = []
    for i in range(n):  # smooth images that change from frame to frame
        small = np.clip(base + 25.0 * i, 0, 255).astype(np.uint8)
        out.append(Image.fromarray(small).resize((SOURCE[1], SOURCE[0]), Image.Resampling.BICUBIC))
    return out


# ---- tables and helpers against the reference's ----------------------------------------------------------


def test_tables_match_reference():
    assert act.DOMAIN_IDS == ref_mod._EMBODIMENT_TO_DOMAIN_ID
    assert act.RAW_DIMS == ref_mod._EMBODIMENT_TO_RAW_ACTION_DIM
    assert act.VIEW_POINTS == ref_mod._ACTION_VIEWPOINT_TEMPLATES
    ref_tiers = {int(t): {float(r): hw for r, hw in bins.items()} for t, bins in ref_mod._ACTION_RESOLUTION_BINS.items()}
    assert act.TIERS == ref_tiers


def test_canvas_and_prompt_match_reference():
    from diffusers.video_processor import VideoProcessor

    for tier in act.TIERS:
        for h, w in [(272, 400), (480, 640), (720, 1280), (1280, 720), (512, 512), (96, 400), (400, 96)]:
            ref = VideoProcessor.classify_height_width_bin(h, w, ratios=ref_mod._ACTION_RESOLUTION_BINS[str(tier)])
            assert act.canvas_size(h, w, tier) == ref
    build = ref_mod.Cosmos3OmniPipeline._build_action_json_prompt
    for desc, view, frames, fps, h, w in [(PROMPT, "ego_view", 17, 16.0, 192, 320), ("Push it!", "wrist_view", 61, 24.0,
                                           480, 832), ("  ", None, 5, 10.0, 640, 640), ("x", "nope", 121, 1.5, 832, 480)]:
        ours = act.json_prompt(desc, view_point=view, num_frames=frames, fps=fps, height=h, width=w)
        assert ours == build(desc, view_point=view, num_frames=frames, fps=fps, height=h, width=w)
    json.loads(ours)


@pytest.mark.parametrize("frames", [1, 3, 7])
def test_fit_clip_matches_reference(frames):
    """Our clip fitting (repeat/cut, antialiased bicubic downscale, right/bottom pad) and latent crop size against the
    reference's `_prepare_action_video_conditioning` on the same [-1, 1] tensor."""
    from diffusers.video_processor import VideoProcessor

    pipe = ref_mod.Cosmos3OmniPipeline.__new__(ref_mod.Cosmos3OmniPipeline)
    pipe.video_processor = VideoProcessor(vae_scale_factor=16, resample="bilinear")
    pipe.vae_scale_factor_spatial = 16
    clip = _frames(frames)
    ref, size, th, tw = pipe._prepare_action_video_conditioning(clip, TIER, CHUNK + 1, "cpu", torch.float32)
    from cosmos3_compiled.stages.latents import clip_to_tensor

    canvas = act.canvas_size(*SOURCE, TIER)
    ours = act.fit_clip(clip_to_tensor(clip, *act.source_size(*SOURCE)), CHUNK + 1, canvas)
    assert canvas == (th, tw) and ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-6
    assert act.content_size(SOURCE, canvas) == (int(size[2]), int(size[3]))
    lat = torch.zeros(1, 1, 1, th // 16, tw // 16)
    spec = act.ActionSpec("policy", DOMAIN, CHUNK, 10, ACTION_DIM, canvas, act.content_size(SOURCE, canvas))
    assert act.crop_latent(lat, spec).shape == pipe._remove_action_video_padding_from_latent(lat, size).shape


def test_pad_actions_repeats_last_and_zero_pads():
    a = torch.arange(6.0).view(2, 3)
    out = act.pad_actions(a, 4, 5)
    assert out.shape == (4, 5) and (out[2:, :3] == a[1]).all() and (out[:, 3:] == 0).all()
    assert act.pad_actions(torch.ones(7, 3), 4, 3).shape == (4, 3)


# ---- the three tasks against the reference -----------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    # sound-capable too: joint sound with an action task is one more parametrization of the same tasks
    return make_reference_checkpoint(tmp_path_factory.mktemp("action_ckpt"), action_dim=ACTION_DIM, seed=3, sound=True)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return load_reference_pipeline(checkpoint)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("action_src")
    clip = _frames(CHUNK + 1, seed=1)
    (root / "clip").mkdir()
    for i, f in enumerate(clip):
        f.save(root / "clip" / f"{i:03d}.png")
    clip[0].save(root / "first.png")
    actions = torch.randn(CHUNK - 1, act.RAW_DIMS[DOMAIN], generator=torch.Generator().manual_seed(5))  # short
    save_file({"actions": actions}, str(root / "actions.safetensors"))
    return root, clip, actions


@pytest.mark.parametrize("mode,sound", [("forward_dynamics", False), ("policy", False), ("inverse_dynamics", False),
                                        ("policy", True), ("forward_dynamics", True)])
def test_action_task_matches_reference(mode, sound, checkpoint, reference, sources, tmp_path):
    """Frames, actions and (with sound=true: the token order text | vision | sound | action, three schedulers)
    the waveform, against the reference on the same seed."""
    root, clip, actions = sources
    fps, guidance, steps, seed = 16.0, 4.0, 3, 7
    cond = dict(image=Image.open(root / "first.png").convert("RGB")) if mode != "inverse_dynamics" else dict(
        video=[Image.open(root / "clip" / f"{i:03d}.png").convert("RGB") for i in range(CHUNK + 1)])
    condition = ref_mod.CosmosActionCondition(
        mode=mode, chunk_size=CHUNK, domain_name=DOMAIN, resolution_tier=TIER,
        raw_actions=actions if mode == "forward_dynamics" else None, **cond)
    with torch.no_grad():
        ref = reference(prompt=PROMPT, negative_prompt=NEGATIVE, action=condition, fps=fps,
                        num_inference_steps=steps, guidance_scale=guidance,
                        generator=torch.Generator("cpu").manual_seed(seed), output_type="np",
                        enable_safety_check=False, enable_sound=sound)
    source = f"image={root / 'first.png'}" if mode != "inverse_dynamics" else f"video={root / 'clip'}"
    overrides = [f"checkpoint={checkpoint}", f"prompt='{PROMPT}'", f"negative_prompt='{NEGATIVE}'", source,
                 f"fps={fps}", f"seed={seed}", f"sampler.num_inference_steps={steps}",
                 f"sampler.guidance_scale={guidance}", f"action.mode={mode}", f"action.domain={DOMAIN}",
                 f"action.chunk_size={CHUNK}", f"action.resolution_tier={TIER}", "output.frames=float32",
                 "output.progress=false", "output.video=false"]
    if mode == "forward_dynamics":
        overrides.append(f"action.actions={root / 'actions.safetensors'}")
    if sound:
        overrides.append("sound=true")
    state = generate(compose_generate(overrides), tmp_path)
    frames = load_file(str(state.outputs["frames"]))["frames"].numpy()
    frames_ref = np.asarray(ref.video, dtype=np.float32).reshape(frames.shape)
    frame_err = float(np.abs(frames - frames_ref).max())
    assert frames.shape == (CHUNK + 1, 64, 320, 3)  # the content's latent (4 × 20) × 16
    msg = f"{mode}: frames max abs {frame_err:.3g}"
    if mode == "forward_dynamics":
        assert ref.action is None and "actions" not in state.outputs
    else:
        got = load_file(str(state.outputs["actions"]))["actions"]
        want = ref.action[0].float()
        assert got.shape == want.shape == (CHUNK, act.RAW_DIMS[DOMAIN])
        action_err = (got - want).abs().max().item()
        msg += f", actions max abs {action_err:.3g}"
        assert action_err <= 1e-4 and want.std() > 0.05
        assert (state.action_latents[:, act.RAW_DIMS[DOMAIN]:] == 0).all()
    if sound:
        waveform = load_file(str(state.outputs["waveform"]))["waveform"]
        want = ref.sound.float().reshape(waveform.shape)  # [C, N]: 5 frames at 16 fps of the tokenizer's rate
        sound_err = (waveform - want).abs().max().item()
        msg += f", waveform max abs {sound_err:.3g}"
        assert sound_err <= 1e-4 and want.std() > 0.01
    else:
        assert ref.sound is None and "waveform" not in state.outputs
    print(msg)
    assert frame_err <= 1e-4 and frames_ref.std() > 0.02


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout", [["parallel=cfg", "parallel.shard=fsdp"],
                                    ["parallel=ulysses", "parallel.vae_rows=true"]])
def test_parallel_policy_with_sound_matches_one_process(layout, checkpoint, sources, tmp_path):
    """Two CPU ranks, a policy rollout with sound (the same code path as sound or actions alone). parallel=cfg with
    FSDP-sharded weights: the (vision, sound, action) velocities of each rank's branch travel in one gather, the
    audio and action heads are all-gathered with the other weights; parallel=ulysses with the row-split decode:
    the sound and action tokens are sharded with the vision tokens. Frames, waveform and actions equal the
    single process's to fp32 rounding."""
    root, _, _ = sources
    args = [f"checkpoint={checkpoint}", f"prompt={PROMPT}", f"negative_prompt={NEGATIVE}", f"image={root / 'first.png'}",
            "fps=16.0", "seed=7", "sampler.num_inference_steps=3", "sampler.guidance_scale=4.0", "action.mode=policy",
            f"action.domain={DOMAIN}", f"action.chunk_size={CHUNK}", f"action.resolution_tier={TIER}", "sound=true",
            "output.frames=float32", "output.progress=false", "output.video=false"]
    one = tmp_path / "one"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's workers run
    try:  # in process, the console script's quoting of the free text for Hydra
        generate(compose_generate(quote_free_text(args)), one)
    finally:
        torch.set_num_threads(threads)
    two = tmp_path / "two"
    two.mkdir()
    proc = torchrun(2, [*layout, "parallel.backend=gloo", f"output.dir={two / 'out'}", *args], two)
    assert proc.returncode == 0, proc.report()
    for name, key in (("frames.safetensors", "frames"), ("sound.safetensors", "waveform"),
                      ("actions.safetensors", "actions")):
        got, want = load_file(str(two / "out" / name))[key], load_file(str(one / name))[key]
        assert (got - want).abs().max().item() <= 1e-5 * max(1.0, want.abs().max().item()), name


# ---- one-line refusals before any load -------------------------------------------------------------------


def _refusal(overrides, tmp_path) -> str:
    with pytest.raises(RequestError) as err:
        prepare(compose_generate(overrides), tmp_path / "out")
    text = str(err.value)
    assert "\n" not in text
    return text


def test_refusals(checkpoint, sources, tmp_path):
    root, _, _ = sources
    img = f"image={root / 'first.png'}"
    base = [f"checkpoint={checkpoint}", img, "action.chunk_size=4"]
    cases = [
        (base + ["action.mode=policy", "action.domain=bridge"], "not a Cosmos3 embodiment domain"),
        (base + ["action.mode=policy", "action.domain=libero"], "no fixed action width"),
        (base + ["action.mode=policy", f"action.domain={DOMAIN}", "height=256"], "height= does not apply"),
        (base + ["action.mode=policy", f"action.domain={DOMAIN}", "num_frames=17"], "num_frames= does not apply"),
        (base + ["action.mode=forward_dynamics", f"action.domain={DOMAIN}"], "needs the actions"),
        (base + ["action.mode=policy", "action.domain=hand_pose"], "more than the checkpoint's action_dim"),
        (base + ["action.mode=policy", f"action.domain={DOMAIN}", "action.raw_dim=12"], "is not the width"),
        (base + ["action.mode=inverse_dynamics", f"action.domain={DOMAIN}"], "pass video="),
        ([img, "action.mode=policy", f"action.domain={DOMAIN}", "action.chunk_size=4"], "embedded"),
        (base + ["action.mode=policy", f"action.domain={DOMAIN}", "action.chunk_size=6"], "multiple of 4"),
        (base + ["action.domain=av"], "action.mode is null"),
        (base + ["action.mode=forward_dynamics", f"action.domain={DOMAIN}", f"action.actions={root / 'none.st'}"],
         "does not exist"),
    ]
    for overrides, needle in cases:
        assert needle in _refusal(overrides, tmp_path), overrides


def test_refuses_checkpoint_without_action_head(tmp_path, sources):
    from cosmos3_compiled.components import write_checkpoint

    root, _, _ = sources
    folder = write_checkpoint(tmp_path / "plain")
    text = _refusal([f"checkpoint={folder}", f"image={root / 'first.png'}", "action.mode=policy",
                     f"action.domain={DOMAIN}", "action.chunk_size=4"], tmp_path)
    assert "action_gen false" in text
