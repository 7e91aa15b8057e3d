"""End to end: our pipeline vs diffusers' Cosmos3OmniPipeline on tiny official-layout checkpoints (fp32, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import compose_generate
from PIL import Image
from reference import load_reference_pipeline, make_reference_checkpoint
from safetensors.torch import load_file

from cosmos3_compiled.pipeline import generate

CASES = {
    # name: (checkpoint kind, request)
    "t2v_karras_odd_latent_negative": ("karras", dict(prompt="A red fox in the snow.", negative_prompt="blurry, dark",
                                                      height=48, width=80, num_frames=9, fps=16.0, steps=3, guidance=4.0)),
    "t2v_shift_empty_negative_no_cfg": ("shift", dict(prompt="waves on a beach", negative_prompt="", height=32,
                                                      width=48, num_frames=5, fps=24.0, steps=2, guidance=1.0)),
    "t2i": ("karras", dict(prompt="a lighthouse at night", negative_prompt="", height=64, width=48, num_frames=1,
                           fps=24.0, steps=3, guidance=3.0)),
    "i2v": ("karras", dict(prompt="the scene comes alive", negative_prompt="static", height=48, width=64,
                           num_frames=5, fps=30.0, steps=3, guidance=4.0, image=True)),
    # both CFG branches through the linears as one batch (model.batch_cfg)
    "t2v_batched_cfg": ("karras", dict(prompt="A red fox in the snow.", negative_prompt="blurry", height=48, width=80,
                                       num_frames=5, fps=16.0, steps=3, guidance=4.0,
                                       extra=["model.batch_cfg=true"])),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {kind: make_reference_checkpoint(tmp_path_factory.mktemp(kind), sigma_schedule=kind, seed=i)
            for i, kind in enumerate(("karras", "shift"))}


def _image(path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_frames_match_reference(name, checkpoints, tmp_path):
    kind, req = CASES[name]
    folder = checkpoints[kind]
    image = _image(tmp_path / "cond.png") if req.get("image") else None
    pipe = load_reference_pipeline(folder)
    with torch.no_grad():
        ref = pipe(
            prompt=req["prompt"], negative_prompt=req["negative_prompt"], image=Image.open(image) if image else None,
            height=req["height"], width=req["width"], num_frames=req["num_frames"], fps=req["fps"],
            num_inference_steps=req["steps"], guidance_scale=req["guidance"],
            generator=torch.Generator("cpu").manual_seed(11), output_type="np", enable_safety_check=False,
        ).video
    ref = np.asarray(ref, dtype=np.float32).reshape(req["num_frames"], req["height"], req["width"], 3)

    cfg = compose_generate([
        f"checkpoint={folder}", f"prompt='{req['prompt']}'", f"negative_prompt='{req['negative_prompt']}'",
        f"height={req['height']}", f"width={req['width']}", f"num_frames={req['num_frames']}", f"fps={req['fps']}",
        "seed=11", f"sampler.num_inference_steps={req['steps']}", f"sampler.guidance_scale={req['guidance']}",
        "output.frames=float32", "output.progress=false", f"image={image if image else 'null'}",
        *req.get("extra", []),
    ])
    state = generate(cfg, tmp_path / "out")
    ours = load_file(str(state.outputs["frames"]))["frames"].numpy()
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max()
    print(f"{name}: max abs {err:.3g}")
    assert err <= 1e-4, f"{name}: max abs difference {err:.3g}"
    assert ref.std() > 0.05  # not a constant image
    uint8 = np.round(ref * 255).astype(np.uint8)
    assert (state.frames_uint8.numpy() != uint8).mean() < 1e-3
    suffix = "image.png" if req["num_frames"] == 1 else "video.mp4"
    assert (tmp_path / "out" / suffix).is_file() and (tmp_path / "out" / "metrics.json").is_file()
