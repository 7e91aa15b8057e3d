"""Joint sound (`sound=true`): frames and waveform against diffusers' Cosmos3OmniPipeline(enable_sound=True) on a tiny
sound-capable official-layout checkpoint (fp32, CPU; its sound_tokenizer/ saved by diffusers' own class); the MP4's
AAC track and unchanged video frames; the WAV read back; the sound segment inside one traced denoising step (no graph
break, no recompile); one-line errors for requests that cannot have sound."""

from __future__ import annotations

import json
import shutil

import av
import numpy as np
import pytest
import torch
from helpers import compose_generate
from reference import load_reference_pipeline, make_reference_checkpoint
from safetensors.torch import load_file

from cosmos3_compiled.audio import TINY, load_audio_decoder
from cosmos3_compiled.checkpoint import build_random
from cosmos3_compiled.compile import compile_counters
from cosmos3_compiled.config import preset, replace
from cosmos3_compiled.errors import RequestError
from cosmos3_compiled.media import read_video_frames, read_wav, write_mp4
from cosmos3_compiled.pipeline import generate
from cosmos3_compiled.request import prepare
from cosmos3_compiled.scheduler import COSMOS3_SCHEDULER_CONFIG, FlowUniPCScheduler
from cosmos3_compiled.stages.denoise import DenoiseStep

PROMPT, NEGATIVE = "A dog barks at the sea.", "quiet, blurry"
CASES = {
    # odd latent (3 × 5), 9 frames; the MP4 gets frames too small for a byte-stable x264, so no MP4 check here
    "odd_latent_9f": dict(height=48, width=80, num_frames=9, fps=16.0, guidance=4.0, video=False),
    # 13 frames, both CFG branches as one batch, the video.mp4 with its AAC track checked
    "batched_13f_mp4": dict(height=96, width=128, num_frames=13, fps=24.0, guidance=3.0, video=True,
                            extra=["model.batch_cfg=true"]),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_reference_checkpoint(tmp_path_factory.mktemp("sound_ckpt"), sound=True, seed=2)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return load_reference_pipeline(checkpoint)


def _overrides(folder, req, steps=3):
    return [f"checkpoint={folder}", f"prompt='{PROMPT}'", f"negative_prompt='{NEGATIVE}'", f"height={req['height']}",
            f"width={req['width']}", f"num_frames={req['num_frames']}", f"fps={req['fps']}", "seed=11",
            f"sampler.num_inference_steps={steps}", f"sampler.guidance_scale={req['guidance']}", "sound=true",
            "output.frames=float32", "output.progress=false", f"output.video={req['video']}", *req.get("extra", [])]


@pytest.mark.parametrize("name", list(CASES))
def test_frames_and_waveform_match_reference(name, checkpoint, reference, tmp_path):
    req = CASES[name]
    with torch.no_grad():
        ref = reference(
            prompt=PROMPT, negative_prompt=NEGATIVE, height=req["height"], width=req["width"],
            num_frames=req["num_frames"], fps=req["fps"], num_inference_steps=3, guidance_scale=req["guidance"],
            generator=torch.Generator("cpu").manual_seed(11), output_type="np", enable_safety_check=False,
            enable_sound=True,
        )
    frames_ref = np.asarray(ref.video, dtype=np.float32).reshape(req["num_frames"], req["height"], req["width"], 3)
    state = generate(compose_generate(_overrides(checkpoint, req)), tmp_path)
    frames = load_file(str(state.outputs["frames"]))["frames"].numpy()
    waveform = load_file(str(state.outputs["waveform"]))["waveform"]
    frame_err = np.abs(frames - frames_ref).max()
    wave_err = (waveform - ref.sound.float()).abs().max().item()
    print(f"{name}: frames max abs {frame_err:.3g}, waveform max abs {wave_err:.3g}")
    assert waveform.shape == ref.sound.shape and waveform.dtype == torch.float32
    assert frame_err <= 1e-4 and wave_err <= 1e-4
    assert frames_ref.std() > 0.05 and ref.sound.std() > 0.01 and (ref.sound.abs() < 1).all()  # not trivial
    # the waveform is T · hop samples, T = ceil(int(F / fps · rate) / hop), not trimmed
    latent = -(-int(req["num_frames"] / req["fps"] * TINY.sampling_rate) // TINY.hop)
    assert waveform.shape == (TINY.audio_channels, latent * TINY.hop)
    # sound.wav: the waveform in 16-bit PCM, within half a step
    pcm, rate = read_wav(state.outputs["sound"])
    assert rate == TINY.sampling_rate and np.abs(pcm - waveform.numpy()).max() <= 0.5 / 32767 + 1e-7
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["seconds"]["decode_sound"] > 0 and metrics["sound"]["samples"] == waveform.shape[1]
    if req["video"]:
        _check_mp4(tmp_path / "video.mp4", state, waveform, tmp_path)


def _check_mp4(path, state, waveform, tmp_path):
    """An AAC track of the waveform's rate, channels and duration; the same video frames as an MP4 written
    without audio."""
    with av.open(str(path)) as container:
        (audio,) = container.streams.audio
        assert audio.codec_context.name == "aac" and audio.rate == TINY.sampling_rate
        assert audio.channels == TINY.audio_channels
        assert float(audio.duration * audio.time_base) == pytest.approx(waveform.shape[1] / TINY.sampling_rate,
                                                                         abs=1e-6)
        decoded = np.concatenate([f.to_ndarray() for f in container.decode(audio=0)], axis=1)
    # AAC pads to whole 1024-sample frames; what lies inside the waveform's span follows it (a lossy codec)
    assert decoded.shape[1] >= waveform.shape[1]
    assert np.abs(decoded[:, : waveform.shape[1]] - waveform.numpy()).mean() < 0.2 * waveform.abs().mean().item()
    silent = tmp_path / "silent.mp4"
    write_mp4(state.frames_uint8, silent, fps=state.request.fps)
    np.testing.assert_array_equal(read_video_frames(path), read_video_frames(silent))


def test_decoder_loads_strictly_and_folds_weight_norm(checkpoint, reference, tmp_path):
    """Our decoder equals diffusers' bit for bit on the same latents (weight norm and Snake folded at load); a
    file missing a decoder tensor is one line naming it; the encoder's tensors are never needed."""
    z = torch.randn(TINY.latent_dim, 7, generator=torch.Generator().manual_seed(0))
    ours = load_audio_decoder(checkpoint / "sound_tokenizer", torch.float32)
    with torch.no_grad():
        want = reference.sound_tokenizer.decode(z.unsqueeze(0))[0]
    assert torch.equal(ours(z), want)
    assert not any("weight_g" in k or "weight_v" in k for k in ours.state_dict())
    broken = tmp_path / "sound_tokenizer"
    shutil.copytree(checkpoint / "sound_tokenizer", broken)
    weights = broken / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(weights))
    del tensors["decoder.conv1.weight_g"]
    from safetensors.torch import save_file

    save_file({k: v for k, v in tensors.items() if not k.startswith("encoder.")}, str(weights))
    with pytest.raises(RequestError, match="missing 1 tensor.*decoder.conv1.weight_g") as err:
        load_audio_decoder(broken, torch.float32)
    assert "\n" not in str(err.value)


def test_sound_step_traces_whole_without_breaks_or_recompiles():
    """The whole denoising step with the sound segment (both CFG branches, both UniPC updates) traces as one graph
    (fullgraph: what the whole-step CUDA graph captures) and runs later steps with no recompile; it equals eager."""
    cfg = replace(preset("debug"), sound_gen=True, sound_dim=8)
    latent_shape, sound_len = (2, 3, 4), 5
    gen = torch.Generator().manual_seed(0)
    latents0 = torch.randn(1, 48, *latent_shape, generator=gen)
    sound0 = torch.randn(8, sound_len, generator=gen)
    scheduler = FlowUniPCScheduler.from_config(COSMOS3_SCHEDULER_CONFIG)

    def run(compiled: bool):
        model = build_random(cfg, seed=4)
        branches = []
        for n in (11, 7):
            b = model.setup_branch(n, latent_shape, fps=16.0, sound_len=sound_len)
            model.text_pass(torch.arange(n) % 1000, b)
            branches.append(b)
        latents, sound = latents0.clone(), sound0.clone()
        unipc = scheduler.prepare(4, latents.shape, "cpu")
        step = DenoiseStep(model, unipc, branches, latents, 4.0, sound=sound, sound_run=unipc.sibling(sound.shape))
        call = torch.compile(step, fullgraph=True, dynamic=False, backend="aot_eager") if compiled else step
        with torch.no_grad():
            for i, t in enumerate(unipc.timesteps.tolist()):
                step.timestep.fill_(float(t))
                unipc.load_(i)
                if compiled and i > 0:
                    with torch.compiler.set_stance("fail_on_recompile"):
                        call()
                else:
                    call()
        return latents, sound

    before = compile_counters()
    latents_c, sound_c = run(compiled=True)
    after = compile_counters()
    assert after["graph_breaks"] == before["graph_breaks"] and after["unique_graphs"] - before["unique_graphs"] == 1
    latents_e, sound_e = run(compiled=False)
    assert (latents_c - latents_e).abs().max() <= 1e-4 and (sound_c - sound_e).abs().max() <= 1e-4
    assert (sound_c - sound0).abs().max() > 0.1  # the sound latents really were denoised


def _copy_without(checkpoint, tmp_path, drop_sound_tokenizer=False, sound_gen=True):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder, ignore=shutil.ignore_patterns("sound_tokenizer") if drop_sound_tokenizer
                    else None)
    if not sound_gen:
        path = folder / "transformer" / "config.json"
        config = json.loads(path.read_text())
        path.write_text(json.dumps({**config, "sound_gen": False}))
    return folder


@pytest.mark.parametrize("case,match", [
    ("embedded", "embedded model=debug has no sound"),
    ("no_tokenizer", "has no sound_tokenizer/ folder"),
    ("no_sound_gen", "sound_gen false"),
    ("image", "needs a video"),
])
def test_requests_that_cannot_have_sound_fail_in_one_line(case, match, checkpoint, tmp_path):
    small = ["height=32", "width=32", "num_frames=5", "sound=true"]
    if case == "embedded":
        overrides = small
    else:
        folder = {"no_tokenizer": lambda: _copy_without(checkpoint, tmp_path, drop_sound_tokenizer=True),
                  "no_sound_gen": lambda: _copy_without(checkpoint, tmp_path, sound_gen=False)}.get(
            case, lambda: checkpoint)()
        overrides = [f"checkpoint={folder}", *small]
        if case == "image":
            overrides.append("num_frames=1")
    with pytest.raises(RequestError, match=match) as err:
        prepare(compose_generate(overrides), tmp_path / "out")
    assert "\n" not in str(err.value)


def test_sound_is_off_by_default(checkpoint, tmp_path):
    job = prepare(compose_generate([f"checkpoint={checkpoint}", "height=32", "width=32", "num_frames=5"]), tmp_path)
    assert job.request.sound_len == 0
    job = prepare(compose_generate([f"checkpoint={checkpoint}", "height=32", "width=32", "num_frames=5", "fps=20",
                                    "sound=true"]), tmp_path)
    assert job.request.sound_len == -(-int(5 / 20 * TINY.sampling_rate) // TINY.hop)


def test_make_tiny_checkpoint_with_sound(tmp_path):
    """tools/make_tiny_checkpoint.py --sound: a sound_tokenizer/ from diffusers' class and the audio head; sound=true
    runs on it and writes sound.wav; without --sound the checkpoint stays video-only."""
    import importlib.util

    from helpers import ROOT

    spec = importlib.util.spec_from_file_location("make_tiny_checkpoint", ROOT / "tools" / "make_tiny_checkpoint.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    folder = tool.main([str(tmp_path / "ckpt"), "--sound", "--seed", "3"])
    index = json.loads((folder / "model_index.json").read_text())
    assert index["sound_tokenizer"] == ["diffusers", "Cosmos3AVAEAudioTokenizer"]
    config = json.loads((folder / "transformer" / "config.json").read_text())
    assert config["sound_gen"] is True and config["sound_dim"] == TINY.latent_dim
    state = generate(compose_generate([f"checkpoint={folder}", "sound=true", "height=32", "width=32", "num_frames=5",
                                       "sampler.num_inference_steps=2", "output.progress=false", "output.video=false"]),
                     tmp_path / "out")
    pcm, rate = read_wav(state.outputs["sound"])
    assert rate == TINY.sampling_rate and pcm.shape == tuple(state.waveform.shape) and pcm.std() > 0.01
    plain = tool.main([str(tmp_path / "plain")])
    assert not (plain / "sound_tokenizer").exists()
    with pytest.raises(RequestError, match="no sound_tokenizer"):
        prepare(compose_generate([f"checkpoint={plain}", "sound=true", "height=32", "width=32", "num_frames=5"]),
                tmp_path / "o2")


def test_bench_sound_cpu_dry_run(tmp_path):
    """tools/bench_sound.py runs its CPU path end to end (tiny sizes): the script a GPU run will use stays runnable."""
    import importlib.util

    from helpers import ROOT

    spec = importlib.util.spec_from_file_location("bench_sound", ROOT / "tools" / "bench_sound.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.main(["--device", "cpu", "--preset", "debug", "--layers", "1", "--height", "32", "--width", "32",
                          "--frames", "5", "--warmup", "0", "--iters", "1", "--compile", "eager", "--audio-size",
                          "tiny", "--out", str(tmp_path)])
    assert results["with_sound"]["tokens_per_branch"] > results["without_sound"]["tokens_per_branch"]
    assert json.loads((tmp_path / "bench_sound.json").read_text())["audio_decode"]["samples"] > 0
