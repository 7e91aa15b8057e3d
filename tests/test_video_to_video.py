"""Video-to-video (`video=`, `condition_frames=`, `condition_keep=`): frames against diffusers' Cosmos3OmniPipeline
on a tiny official-layout checkpoint (fp32, CPU), the clip read the same way by both; our initial latents against
the reference's `prepare_latents` (which encodes the whole output-length clip while we encode only the frames the
clean latent frames depend on); which source frames are taken; an MP4 clip; models kept across T2V/V2V jobs; and
no new compiled graph when only the conditioning changes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import compose_generate
from PIL import Image
from reference import load_reference_pipeline, make_reference_checkpoint
from safetensors.torch import load_file

from cosmos3_compiled import compile as compile_mod
from cosmos3_compiled.media import read_clip, read_video_frames, write_mp4
from cosmos3_compiled.pipeline import generate
from cosmos3_compiled.request import prepare
from cosmos3_compiled.resident import RESIDENT
from cosmos3_compiled.stages.latents import Latents, pad_clip
from cosmos3_compiled.stages.state import State
from cosmos3_compiled.vae import load_vae

SOURCE_SIZE = (40, 56)  # source frames' height, width: another aspect ratio than every request (stretched)

# name: (source frames, request); every case is video-to-video on the same reference checkpoint
CASES = {
    "keep_first_odd_latent": (12, dict(keep="first", indexes=[0, 1], height=48, width=80, num_frames=9,
                                       negative="blurry, dark", guidance=4.0)),
    "keep_last_empty_negative": (12, dict(keep="last", indexes=[0, 1], height=32, width=48, num_frames=9,
                                          negative="", guidance=3.0, add_duration_template=False)),
    "noncontiguous_0_2": (11, dict(keep="first", indexes=[0, 2], height=32, width=32, num_frames=13,
                                   negative="static", guidance=4.0, add_resolution_template=False)),
    "short_clip_padded": (3, dict(keep="last", indexes=[0, 1], height=32, width=48, num_frames=9,
                                  negative="dark", guidance=4.0)),
}


def write_clip(folder, frames: int, seed: int = 0, size=SOURCE_SIZE):
    """`frames` PNG frames of smooth random colour fields plus noise (resize-sensitive), named in order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(frames):
        base = 127 + 100 * np.sin(xx[..., None] / (5 + i) + yy[..., None] / 7 + np.arange(3) * 2.1)
        img = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"frame_{i:04d}.png")
    return folder


def pil_frames(folder):
    """The clip as the reference is given it: every frame file, in name order, as RGB Pillow images."""
    return [Image.open(p).convert("RGB") for p in sorted(folder.glob("*.png"))]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_reference_checkpoint(tmp_path_factory.mktemp("v2v_ckpt"), seed=3)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return load_reference_pipeline(checkpoint)


def _overrides(folder, clip, req, steps=2):
    return [
        f"checkpoint={folder}", "prompt='The camera pans across the scene.'", f"negative_prompt='{req['negative']}'",
        f"height={req['height']}", f"width={req['width']}", f"num_frames={req['num_frames']}", "fps=16",
        "seed=5", f"sampler.num_inference_steps={steps}", f"sampler.guidance_scale={req['guidance']}",
        f"video={clip}", f"condition_frames=[{','.join(map(str, req['indexes']))}]", f"condition_keep={req['keep']}",
        f"add_resolution_template={req.get('add_resolution_template', True)}",
        f"add_duration_template={req.get('add_duration_template', True)}",
        "output.frames=float32", "output.progress=false",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_frames_match_reference(name, checkpoint, reference, tmp_path):
    frames, req = CASES[name]
    clip = write_clip(tmp_path / "clip", frames, seed=len(name))
    with torch.no_grad():
        ref = reference(
            prompt="The camera pans across the scene.", negative_prompt=req["negative"], video=pil_frames(clip),
            condition_frame_indexes_vision=req["indexes"], condition_video_keep=req["keep"],
            height=req["height"], width=req["width"], num_frames=req["num_frames"], fps=16.0,
            num_inference_steps=2, guidance_scale=req["guidance"], generator=torch.Generator("cpu").manual_seed(5),
            add_resolution_template=req.get("add_resolution_template", True),
            add_duration_template=req.get("add_duration_template", True),
            output_type="np", enable_safety_check=False,
        ).video
    ref = np.asarray(ref, dtype=np.float32).reshape(req["num_frames"], req["height"], req["width"], 3)
    state = generate(compose_generate(_overrides(checkpoint, clip, req)), tmp_path / "out")
    ours = load_file(str(state.outputs["frames"]))["frames"].numpy()
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max()
    print(f"{name}: max abs {err:.3g}")
    assert err <= 1e-4, f"{name}: max abs difference {err:.3g}"
    assert ref.std() > 0.05
    conditioning = state.metrics["conditioning"]
    assert conditioning["clean_latent_frames"] == sorted(set(req["indexes"]))
    assert conditioning["source_frames_read"] == min(frames, 4 * max(req["indexes"]) + 1)


@pytest.mark.parametrize("keep,indexes,frames,num_frames", [
    ("first", [0, 1], 12, 17), ("last", [0, 1], 12, 17), ("first", [2], 12, 13), ("last", [0, 2], 4, 13)])
def test_initial_latents_match_reference_whole_clip_encode(keep, indexes, frames, num_frames, checkpoint, reference,
                                                           tmp_path):
    """Our Latents stage encodes only the first 4·max(indexes)+1 frames of the (padded) conditioning clip; the
    reference's `prepare_latents` encodes the whole output-length clip. The causal encoder makes the clean
    latent frames the same; the noisy ones are the same noise draw."""
    clip = write_clip(tmp_path / "clip", frames, seed=frames)
    h, w = 32, 48
    with torch.no_grad():
        ref = reference.prepare_latents(
            video=pil_frames(clip), condition_frame_indexes_vision=indexes, condition_video_keep=keep,
            num_frames=num_frames, height=h, width=w, generator=torch.Generator("cpu").manual_seed(5), device="cpu",
            dtype=torch.float32)
    ref_latents, mask = ref[0], ref[5]
    job = prepare(compose_generate([f"checkpoint={checkpoint}", f"height={h}", f"width={w}", f"num_frames={num_frames}",
                                    "seed=5", f"video={clip}", f"condition_frames={indexes}",
                                    f"condition_keep={keep}"]), tmp_path / "out", writes=False)
    vae = load_vae(checkpoint, with_encoder=True)
    state = Latents(vae, 48, torch.device("cpu"))(State(request=job.request))
    ours = state.latents
    assert ours.shape == ref_latents.shape
    clean = sorted(set(indexes))
    assert mask[:, 0, 0].nonzero().flatten().tolist() == clean
    noisy = [t for t in range(ours.shape[2]) if t not in clean]
    assert torch.equal(ours[:, :, noisy], ref_latents[:, :, noisy])
    assert (ours[:, :, clean] - ref_latents[:, :, clean]).abs().max().item() <= 1e-5
    assert state.metrics["conditioning"]["frames_encoded"] == 4 * max(indexes) + 1 < num_frames


def test_which_source_frames_are_read(tmp_path):
    """first / last take that end of the clip; a shorter clip gives what it has (the stage pads it)."""
    folder = tmp_path / "clip"
    folder.mkdir()
    for i in range(7):
        Image.new("RGB", (4, 4), (i * 30, 0, 0)).save(folder / f"{i:02d}.png")
    (folder / ".hidden.png").write_bytes(b"junk")
    (folder / "notes.txt").write_text("not a frame")
    red = lambda frames: [f.getpixel((0, 0))[0] // 30 for f in frames]  # noqa: E731
    assert red(read_clip(folder, 5, "first")) == [0, 1, 2, 3, 4]
    assert red(read_clip(folder, 5, "last")) == [2, 3, 4, 5, 6]
    assert red(read_clip(folder, 9, "last")) == red(read_clip(folder, 9, "first")) == list(range(7))
    x = torch.arange(3.0).view(1, 1, 3, 1, 1)
    assert pad_clip(x, 5).flatten().tolist() == [0, 1, 2, 2, 2] and pad_clip(x, 2).flatten().tolist() == [0, 1]


@pytest.mark.slow
def test_mp4_clip_and_models_kept_across_t2v_and_v2v(tmp_path):
    """A checkpoint job without conditioning loads no VAE encoder; a later video-to-video job of the same process
    reuses the models and gains the encoder in place, and gives what a fresh process gives. An MP4 clip
    (decoded with PyAV) gives what a folder of its decoded frames gives."""
    from cosmos3_compiled.components import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "ckpt", "debug", seed=0)
    clip_dir = write_clip(tmp_path / "frames", 4, size=(32, 48))
    mp4 = tmp_path / "clip.mp4"
    write_mp4(torch.from_numpy(np.stack([np.asarray(f) for f in pil_frames(clip_dir)])), mp4, fps=8, crf=10)
    decoded = write_clip(tmp_path / "decoded", 0)
    for i, frame in enumerate(read_video_frames(mp4)):
        Image.fromarray(frame).save(decoded / f"{i:03d}.png")
    small = [f"checkpoint={ckpt}", "height=32", "width=48", "num_frames=5", "sampler.num_inference_steps=2",
             "output.progress=false", "output.video=false"]
    t2v = generate(compose_generate(small), tmp_path / "a")
    assert t2v.metrics["models"] == "loaded" and RESIDENT.models.vae.encoder is None
    v2v = generate(compose_generate([*small, f"video={mp4}", "condition_keep=last"]), tmp_path / "b")
    assert v2v.metrics["models"] == "reused" and RESIDENT.models.vae.encoder is not None
    fresh = generate(compose_generate([*small, f"video={decoded}", "condition_keep=last", "keep_loaded=false"]),
                     tmp_path / "c")
    assert fresh.metrics["models"] == "loaded"
    assert v2v.sha256 == fresh.sha256 != t2v.sha256
    assert v2v.metrics["conditioning"]["source_frames_read"] == 4  # of the 5 needed: the last one repeats


@pytest.mark.slow
def test_conditioning_changes_compile_nothing(tmp_path, monkeypatch):
    """T2V, then V2V and I2V of the same shape in one process, the whole video step compiled (compile.scope=full,
    so the clean-frame mask is inside the graph; dynamo's eager backend, no codegen): the later jobs reuse the
    graphs — the mask reaches them as data, never as a constant."""
    original = compile_mod.apply_compile
    monkeypatch.setattr(compile_mod, "apply_compile",
                        lambda model, settings: original(model, settings, backend="eager"))
    clip = write_clip(tmp_path / "clip", 5, size=(32, 32))
    image = tmp_path / "cond.png"
    Image.open(clip / "frame_0000.png").save(image)
    small = ["height=32", "width=32", "num_frames=9", "sampler.num_inference_steps=2", "output.progress=false",
             "output.video=false", "compile.mode=default", "compile.scope=full"]
    runs = {}
    for name, extra in (("t2v", []), ("v2v", [f"video={clip}"]), ("i2v", [f"image={image}"]),
                        ("v2v_0_2", [f"video={clip}", "condition_frames=[0,2]"])):
        runs[name] = generate(compose_generate([*small, *extra]), tmp_path / name)
    assert runs["t2v"].metrics["compile"]["unique_graphs"] >= 1
    for name in ("v2v", "i2v", "v2v_0_2"):
        m = runs[name].metrics
        assert m["models"] == "reused", name
        assert m["compile"]["unique_graphs"] == 0 and m["compile"]["recompiles"] == 0, (name, m["compile"])
    assert len({r.sha256 for r in runs.values()}) == 4  # each conditioning really changed the video
