"""The few-step distilled checkpoints (Cosmos3-Super-*-4Step, issue 20): FlowMatchEuler on a fixed schedule.

What the reference does (diffusers 0.42.1 distilled modular blocks, `FlowMatchEulerDiscreteScheduler`): the step
count is the schedule's length and guidance is 1; every step `x0 = x - sigma·v`, then `x = (1 - sigma')·x0 +
sigma'·noise` with fresh noise from the request's CPU generator (the last step too); the clean frames are put back
after every step. Checked here at the scheduler level (bitwise), end to end against the diffusers pipeline on a
tiny checkpoint with the shipped scheduler config, and for the defaults and the one-line refusals.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import compose_generate
from PIL import Image
from reference import load_reference_distilled_pipeline
from safetensors.torch import load_file

from cosmos3_compiled.compile import capture_cuda_graph
from cosmos3_compiled.components import write_checkpoint
from cosmos3_compiled.errors import RequestError
from cosmos3_compiled.pipeline import generate
from cosmos3_compiled.request import prepare
from cosmos3_compiled.scheduler import (
    COSMOS3_DISTILLED_SCHEDULER_CONFIG,
    FlowMatchEulerScheduler,
    SchedulerConfigError,
    draw_step_noise,
)

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = COSMOS3_DISTILLED_SCHEDULER_CONFIG
T_LIST = SHIPPED["fixed_step_sampler_config"]["t_list"]
SHAPE = (1, 4, 3, 5, 7)  # [B, C, T, h, w]; 420 values, not a multiple of 16 (the CPU sampler's block size)
VARIANTS = {
    "shipped": {},
    "shift3": {"shift": 3.0},
    "shift_terminal": {"shift_terminal": 0.3},
    "ode": {"stochastic_sampling": False},
}


def _velocity(x: torch.Tensor) -> torch.Tensor:
    """A stand-in model that depends on its input (a wrong step corrupts the later ones) and, like ours and the
    reference's, predicts nothing for the clean frame 0."""
    v = 0.7 * torch.tanh(x) + 0.1
    v[:, :, :1] = 0
    return v


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_fixed_schedule_matches_diffusers_bitwise(variant):
    from diffusers import FlowMatchEulerDiscreteScheduler

    config = {**SHIPPED, **VARIANTS[variant]}
    ref = FlowMatchEulerDiscreteScheduler.from_config(config)
    ref.set_timesteps(sigmas=T_LIST)  # Cosmos3DistilledSetTimestepsStep
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    ours_gen = torch.Generator().manual_seed(5)
    run = FlowMatchEulerScheduler.from_config(config).prepare(4, start, (0,), ours_gen)
    assert run.timesteps.dtype == torch.float32 and torch.equal(run.timesteps, ref.timesteps)
    assert torch.equal(run.sigmas, ref.sigmas) and run.sigmas[-1].item() == 0.0

    # the reference's update block: scheduler step with the generator, then the mask re-anchors frame 0
    mask = torch.zeros(SHAPE[2], 1, 1)
    mask[0] = 1.0
    gen, x_ref, x_ours = torch.Generator().manual_seed(5), start.clone(), start.clone()
    for t in ref.timesteps:
        x_ref = ref.step(_velocity(x_ref).unsqueeze(0), t, x_ref.unsqueeze(0), generator=gen, return_dict=False)[0]
        x_ref = mask * start + (1.0 - mask) * x_ref.squeeze(0)
        run.step(_velocity(x_ours), x_ours)
        assert torch.equal(x_ours, x_ref)
    assert torch.equal(x_ours[:, :, 0], start[:, :, 0]) and not torch.equal(x_ours, start)
    assert torch.equal(ours_gen.get_state(), gen.get_state())  # the same draws, all made ahead of the loop


def test_step_noise_is_one_draw_per_step():
    noise = draw_step_noise(torch.Generator().manual_seed(1), SHAPE, 3)
    gen = torch.Generator().manual_seed(1)
    assert torch.equal(noise, torch.stack([torch.randn(SHAPE, generator=gen) for _ in range(3)]))
    one_draw = torch.randn((3, *SHAPE), generator=torch.Generator().manual_seed(1))
    assert not torch.equal(noise, one_draw)  # why the draws stay separate: each ends on a partial block of 16


def _without_t_list(config):
    return {**config, "fixed_step_sampler_config": {"sample_type": "sde"}}


@pytest.mark.parametrize(("config", "distilled", "expected"), [
    (SHIPPED, None, T_LIST),  # the shipped checkpoints: scheduler_config.json only
    (SHIPPED, T_LIST, T_LIST),  # plus a modular_model_index.json saying the same
    (_without_t_list(SHIPPED), [1.0, 0.5], [1.0, 0.5]),  # diffusers' own source alone
], ids=["t_list", "both_agree", "distilled_sigmas"])
def test_where_the_fixed_schedule_comes_from(config, distilled, expected):
    sched = FlowMatchEulerScheduler.from_config(config, distilled)
    assert sched.config.t_list == tuple(expected) and sched.fixed_steps == len(expected)


@pytest.mark.parametrize(("override", "distilled", "match"), [
    ({}, [1.0, 0.75, 0.5, 0.25], "two fixed schedules"),
    (_without_t_list(SHIPPED), None, "without a fixed schedule"),
    ({"use_dynamic_shifting": True}, None, "use_dynamic_shifting"),
    ({"use_karras_sigmas": True}, None, "use_karras_sigmas"),
    ({"invert_sigmas": True}, None, "invert_sigmas"),
    ({"time_shift_type": "cosine"}, None, "time_shift_type"),
    ({"shift": 0.0}, None, "shift"),
    ({"fixed_step_sampler_config": {"t_list": [1.0, 1.0, 0.5]}}, None, "strictly decreasing"),
    ({"fixed_step_sampler_config": {"t_list": [1.0, 0.0]}}, None, r"in \(0, 1\]"),
    ({"_class_name": "EulerDiscreteScheduler"}, None, "_class_name"),
], ids=["disagree", "no_schedule", "dynamic_shift", "karras", "invert", "time_shift_type", "shift", "repeated",
        "zero_level", "class_name"])
def test_bad_fixed_schedules_raise_one_line(override, distilled, match):
    with pytest.raises(SchedulerConfigError, match=match) as info:
        FlowMatchEulerScheduler.from_config({**SHIPPED, **override}, distilled)
    assert "\n" not in str(info.value)


def test_step_compiles_fullgraph_without_recompiles():
    # the step as the denoise stage captures it: static buffers only (coefficient row, step index, noise, clean)
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    sched = FlowMatchEulerScheduler.from_config(SHIPPED)

    def rollout(step_fn):
        run = sched.prepare(4, start, (0,), torch.Generator().manual_seed(6))
        x = start.clone()
        for i in range(4):
            run.load_(i)
            step_fn(run)(_velocity(x), x)
        return x

    eager = rollout(lambda run: run.step_)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = rollout(lambda run: torch.compile(run.step_, fullgraph=True, backend="aot_eager"))
    assert torch.equal(compiled, eager)


@pytest.mark.gpu
def test_step_replays_in_cuda_graph():
    # one captured step, replayed 4 times with only the loaded step changing, follows the CPU run
    device = torch.device("cuda")
    start = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    sched = FlowMatchEulerScheduler.from_config(SHIPPED)
    cpu = sched.prepare(4, start, (0,), torch.Generator().manual_seed(6))
    velocities = [torch.randn(SHAPE, generator=torch.Generator().manual_seed(10 + i)) for i in range(4)]
    expected = start.clone()
    for v in velocities:
        cpu.step(v, expected)
    run = sched.prepare(4, start.to(device), (0,), torch.Generator().manual_seed(6))
    x, v = start.to(device), torch.zeros(SHAPE, device=device)
    run.load_(0)
    graph, _ = capture_cuda_graph(lambda: run.step_(v, x))
    x.copy_(start)
    for i in range(4):
        run.load_(i)
        v.copy_(velocities[i])
        graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(x.cpu(), expected, rtol=1e-6, atol=1e-6)


# ---- the product: checkpoint, defaults, refusals, frames -------------------------------------------------


@pytest.fixture(scope="module")
def distilled_checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("distilled") / "tiny", "debug", seed=0, distilled=True)


SMALL = ["height=32", "width=48", "num_frames=1", "output.progress=false"]


def test_defaults_follow_the_checkpoint(distilled_checkpoint, tmp_path):
    job = prepare(compose_generate([f"checkpoint={distilled_checkpoint}", *SMALL]), tmp_path / "out")
    assert isinstance(job.scheduler, FlowMatchEulerScheduler)
    assert (job.request.num_inference_steps, job.request.guidance_scale, job.request.use_cfg) == (4, 1.0, False)
    assert job.auto["sampler.num_inference_steps"].startswith("4: the length of the checkpoint's fixed")
    assert job.auto["sampler.guidance_scale"].startswith("1.0: a distilled checkpoint")
    explicit = prepare(compose_generate([f"checkpoint={distilled_checkpoint}", *SMALL, "sampler.num_inference_steps=4",
                                         "sampler.guidance_scale=1.0"]), tmp_path / "out")
    assert explicit.request.num_inference_steps == 4 and "sampler.guidance_scale" not in explicit.auto
    embedded = prepare(compose_generate(SMALL), tmp_path / "out")  # UniPC: the reference's 35 steps and 6.0
    assert (embedded.request.num_inference_steps, embedded.request.guidance_scale) == (35, 6.0)
    assert embedded.auto["sampler.guidance_scale"] == "6.0: the reference's default"


@pytest.mark.parametrize(("override", "match"), [
    ("sampler.num_inference_steps=3", "sampler.num_inference_steps=3: this distilled checkpoint runs its fixed 4-step"),
    ("sampler.guidance_scale=4.0", "sampler.guidance_scale=4.0: this distilled checkpoint has the guidance"),
    ("sampler.schedule=karras", "sampler.schedule=karras does not apply to this distilled checkpoint"),
    ("negative_prompt=blurry", "negative_prompt does not apply to a distilled checkpoint"),
], ids=["steps", "guidance", "schedule", "negative_prompt"])
def test_overrides_that_do_not_apply_fail_in_one_line(distilled_checkpoint, tmp_path, override, match):
    with pytest.raises(RequestError, match=match) as info:
        prepare(compose_generate([f"checkpoint={distilled_checkpoint}", *SMALL, override]), tmp_path / "out")
    assert "\n" not in str(info.value)


def test_a_disagreeing_modular_index_fails_through_the_cli(distilled_checkpoint, tmp_path):
    folder = Path(shutil.copytree(distilled_checkpoint, tmp_path / "ckpt"))
    (folder / "modular_model_index.json").write_text(json.dumps({"distilled_sigmas": [1.0, 0.5]}))
    proc = subprocess.run([sys.executable, "-m", "cosmos3_compiled.cli", f"checkpoint={folder}", *SMALL,
                           f"output.dir={tmp_path / 'out'}"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "two fixed schedules" in lines[0], proc.stderr


def _image(path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(path)
    return path


@pytest.mark.parametrize(("name", "num_frames"), [("t2i", 1), ("i2v", 9)])
def test_frames_match_the_distilled_reference(name, num_frames, distilled_checkpoint, tmp_path):
    image = _image(tmp_path / "cond.png") if name == "i2v" else None
    pipe = load_reference_distilled_pipeline(distilled_checkpoint)
    with torch.no_grad():
        ref = pipe(prompt="a lighthouse at night", height=32, width=48, num_frames=num_frames, fps=24.0,
                   generator=torch.Generator("cpu").manual_seed(11), output_type="np", output="videos",
                   **({"image": Image.open(image)} if image else {}))
    ref = np.asarray(ref, dtype=np.float32).reshape(num_frames, 32, 48, 3)

    cfg = compose_generate([f"checkpoint={distilled_checkpoint}", "prompt='a lighthouse at night'", "height=32",
                            "width=48", f"num_frames={num_frames}", "seed=11", "output.frames=float32",
                            "output.progress=false", f"image={image or 'null'}"])
    state = generate(cfg, tmp_path / "out")
    ours = load_file(str(state.outputs["frames"]))["frames"].numpy()
    err = np.abs(ours - ref).max()
    print(f"{name}: max abs {err:.3g}")
    assert ours.shape == ref.shape and err <= 1e-4, f"{name}: max abs difference {err:.3g}"
    assert ref.std() > 0.05  # not a constant image
    assert state.metrics["timesteps"] == pytest.approx([1000.0, 937.5, 833.3333, 625.0])
    assert state.metrics["text_tokens"]["uncond"] == 0  # guidance 1: the cond branch alone, as the reference


def test_random_weights_sample_the_distilled_schedule(distilled_checkpoint, tmp_path):
    """`model.distilled=true` (checkpoint=null: random-weight benchmarks of the 4-step models) samples what a distilled
    checkpoint of the same preset and seed samples; with a checkpoint it is refused in one line."""
    request = [*SMALL, "seed=3", "output.frames=float32"]
    generate(compose_generate([*request, "model.distilled=true"]), tmp_path / "embedded")
    generate(compose_generate([*request, f"checkpoint={distilled_checkpoint}"]), tmp_path / "loaded")
    embedded, loaded = (load_file(str(tmp_path / d / "frames.safetensors"))["frames"] for d in ("embedded", "loaded"))
    assert torch.equal(embedded, loaded)
    metrics = json.loads((tmp_path / "embedded" / "metrics.json").read_text())
    assert len(metrics["timesteps"]) == 4 and metrics["auto"]["sampler.guidance_scale"].startswith("1.0")
    with pytest.raises(RequestError, match=r"^model.distilled=true applies to checkpoint=null"):
        prepare(compose_generate([*request, f"checkpoint={distilled_checkpoint}", "model.distilled=true"]), tmp_path / "x")
