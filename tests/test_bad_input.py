"""Bad requests and bad checkpoints fail with one clear line BEFORE any model is loaded; an interrupted
save leaves no partial file.

Loading is trapped: `build_embedded` / `load_checkpoint` (as the pipeline imports them) raise if called.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import cosmos3_compiled.resident as resident
from cosmos3_compiled.components import write_checkpoint
from cosmos3_compiled.errors import RequestError
from cosmos3_compiled.pipeline import generate
from helpers import compose_generate

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["height=32", "width=32", "num_frames=5", "sampler.num_inference_steps=1", "output.progress=false"]
WEIGHTS = "diffusion_pytorch_model.safetensors"


class Loaded(AssertionError):
    pass


@pytest.fixture
def no_load(monkeypatch):
    """Any attempt to build or load a model fails the test."""

    def trap(*args, **kwargs):
        raise Loaded("a model was loaded before the input was checked")

    monkeypatch.setattr(resident, "build_embedded", trap)
    monkeypatch.setattr(resident, "load_checkpoint", trap)
    monkeypatch.setattr(torch, "load", trap)  # nothing is ever unpickled


def fails(overrides: list[str], out_dir: Path, match: str) -> str:
    """generate() raises a user error whose message is one line containing `match`."""
    with pytest.raises(RequestError) as info:
        generate(compose_generate([*SMALL, *overrides]), out_dir)
    msg = str(info.value)
    assert "\n" not in msg, f"not one line:\n{msg}"
    assert match in msg, msg
    return msg


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "debug", "debug", seed=0)


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path) -> Path:
    """A private copy of the tiny checkpoint, free to break."""
    return Path(shutil.copytree(tiny_checkpoint, tmp_path / "ckpt"))


def shard(folder: Path, n: int = 2) -> list[str]:
    """Split `folder`'s single safetensors file into n shards + a diffusers index json; returns the shard names."""
    state = load_file(str(folder / WEIGHTS))
    keys = sorted(state)
    names = [f"diffusion_pytorch_model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for i, name in enumerate(names):
        part = {k: state[k] for k in keys[i::n]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (folder / f"{WEIGHTS}.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / WEIGHTS).unlink()
    return names


# --------------------------------------------------------------------------------------------------------------
# Requests


@pytest.mark.parametrize(("override", "seen"), [
    ("height=40", "got height=40 width=32"),
    ("width=20", "got height=32 width=20"),
    ("height=0", "got height=0 width=32"),
])
def test_size_not_multiple_of_16(no_load, tmp_path, override, seen):
    fails([override], tmp_path, f"height and width must be positive multiples of 16, {seen}")


@pytest.mark.parametrize("frames", [6, 8, 0])
def test_num_frames_not_4k_plus_1(no_load, tmp_path, frames):
    fails([f"num_frames={frames}"], tmp_path, f"num_frames must be 4k+1 (1, 5, 9, ..., 81, ...), got {frames}")


@pytest.mark.parametrize("prompt", ["''", "'   '"])
def test_empty_prompt(no_load, tmp_path, prompt):
    fails([f"prompt={prompt}"], tmp_path, "prompt is empty: pass prompt='...'")


def test_missing_conditioning_image(no_load, tmp_path):
    missing = tmp_path / "nope.png"
    fails([f"image={missing}"], tmp_path / "out", f"conditioning image {missing} does not exist")


def test_conditioning_image_not_an_image(no_load, tmp_path):
    bogus = tmp_path / "cond.png"
    bogus.write_text("not a png")
    fails([f"image={bogus}"], tmp_path / "out", f"conditioning image {bogus} is not a readable image")


def test_image_with_one_frame_is_rejected(no_load, tmp_path):
    from PIL import Image

    img = tmp_path / "cond.png"
    Image.new("RGB", (8, 8)).save(img)
    fails([f"image={img}", "num_frames=1"], tmp_path / "out", "image conditioning needs num_frames > 1")


def _clip(folder: Path, frames: int = 2) -> Path:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(frames):
        Image.new("RGB", (8, 8), (40 * i, 0, 0)).save(folder / f"{i:03d}.png")
    return folder


@pytest.mark.parametrize(("overrides", "match"), [
    (["num_frames=1"], "video conditioning needs num_frames > 1"),
    (["condition_frames=[]"], "condition_frames is empty"),
    (["condition_frames=[0,-1]"], "condition_frames=[0, -1]: latent frame indexes must be >= 0"),
    (["condition_frames=[0,2]"], "condition_frames=[0, 2]: index 2 is past the last latent frame (2 latent frames "
                                 "for num_frames=5: indexes 0 to 1)"),
    (["num_frames=9", "condition_frames=[3]"], "index 3 is past the last latent frame (3 latent frames"),
])
def test_bad_video_request(no_load, tmp_path, overrides, match):
    fails([f"video={_clip(tmp_path / 'clip')}", *overrides], tmp_path / "out", match)


def test_video_with_image(no_load, tmp_path):
    from PIL import Image

    img = tmp_path / "cond.png"
    Image.new("RGB", (8, 8)).save(img)
    fails([f"video={_clip(tmp_path / 'clip')}", f"image={img}"], tmp_path / "out",
          "video= (video-to-video) and image= (image-to-video) are two conditionings: pass one")


def test_unreadable_video(no_load, tmp_path):
    missing = tmp_path / "nope.mp4"
    fails([f"video={missing}"], tmp_path / "out", f"video {missing} does not exist")
    bogus = tmp_path / "clip.mp4"
    bogus.write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    fails([f"video={bogus}"], tmp_path / "out", f"video {bogus} is not a readable video (")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no frames here")
    fails([f"video={empty}"], tmp_path / "out", f"video folder {empty} holds no image frames")
    broken = _clip(tmp_path / "broken", 3)
    (broken / "001.png").write_bytes(b"not a png")
    fails([f"video={broken}"], tmp_path / "out", f"video frame {broken / '001.png'} is not a readable image")


def test_short_video_is_padded_not_refused(tmp_path):
    """One frame for condition_frames=[0,1] (5 needed): the reference repeats the last frame, and so do we."""
    from cosmos3_compiled.request import prepare

    job = prepare(compose_generate([*SMALL, f"video={_clip(tmp_path / 'clip', 1)}"]), tmp_path / "out")
    assert job.request.clean_frames == (0, 1) and job.request.clip_frames == 5


def test_unwritable_output_dir(no_load, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    out = blocker / "out"  # its parent is a regular file: no mkdir can make it, even as root
    fails([], out, f"output directory {out} is not writable (Not a directory)")
    assert blocker.read_text() == "x"


def test_output_dir_is_a_file(no_load, tmp_path):
    out = tmp_path / "out"
    out.write_text("x")
    fails([], out, f"output directory {out} is not writable")


@pytest.mark.parametrize(("override", "match"), [
    ("model.name=huge", "unknown model preset 'huge'; valid presets: debug"),
    ("sampler.num_inference_steps=0", "sampler.num_inference_steps must be >= 1, got 0"),
    ("fps=0", "fps must be positive, got 0.0"),
    ("output.crf=52", "output.crf=52: H.264 takes 0 (lossless) to 51"),
    ("output.crf=-1", "output.crf=-1: H.264 takes 0 (lossless) to 51"),
])
def test_bad_settings(no_load, tmp_path, override, match):
    fails([override], tmp_path, match)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_a_gpu(no_load, tmp_path):
    fails(["device=cuda"], tmp_path, "device=cuda but no CUDA device is available; use device=cpu")


def test_fa4_needs_cuda(no_load, tmp_path):
    fails(["model.attention_backend=fa4"], tmp_path, "model.attention_backend=fa4 needs device=cuda")


def test_pinned_text_tower_needs_offload_on_cuda(no_load, tmp_path):
    fails(["compile.pin_text_tower=true"], tmp_path, "compile.pin_text_tower=true needs compile.offload_text_tower=true")


@pytest.mark.parametrize("overrides,match", [
    (["model.vae_tiles=0"], "model.vae_tiles=0: use 1 to"),
    (["model.vae_tiles=99"], "model.vae_tiles=99: use 1 to"),
    (["model.vae_tiles=2", "parallel.vae_rows=true"], "model.vae_tiles > 1 and parallel.vae_rows=true"),
])
def test_vae_tiles_checked(no_load, tmp_path, overrides, match):
    fails(overrides, tmp_path, match)


def test_fused_qk_rope_forced_on_cpu(no_load, tmp_path):
    fails(["model.fused_qk_rope=true"], tmp_path, "model.fused_qk_rope=true needs device=cuda and Triton")


# --------------------------------------------------------------------------------------------------------------
# Checkpoints


def test_checkpoint_folder_missing(no_load, tmp_path):
    fails([f"checkpoint={tmp_path / 'nowhere'}"], tmp_path / "out", f"checkpoint folder {tmp_path / 'nowhere'} does not exist")


@pytest.mark.parametrize("sub", ["transformer", "vae", "scheduler", "text_tokenizer"])
def test_missing_subfolder(no_load, ckpt, tmp_path, sub):
    shutil.rmtree(ckpt / sub)
    fails([f"checkpoint={ckpt}"], tmp_path / "out", f"checkpoint {ckpt} lacks subfolder(s) {sub} (diffusers layout expected)")


def test_sharded_checkpoint_loads(ckpt, tmp_path, tiny_checkpoint):
    """Positive control for the shard test: a complete sharded transformer gives the same frames."""
    names = shard(ckpt / "transformer", 3)
    assert len(names) == 3 and not (ckpt / "transformer" / WEIGHTS).exists()
    sharded = generate(compose_generate([*SMALL, f"checkpoint={ckpt}"]), tmp_path / "a")
    single = generate(compose_generate([*SMALL, f"checkpoint={tiny_checkpoint}"]), tmp_path / "b")
    assert sharded.sha256 == single.sha256


def test_missing_shard(no_load, ckpt, tmp_path):
    names = shard(ckpt / "transformer", 2)
    (ckpt / "transformer" / names[1]).unlink()
    fails([f"checkpoint={ckpt}"], tmp_path / "out",
          f"shard(s) named in {WEIGHTS}.index.json are missing: {names[1]}")


@pytest.mark.parametrize(("component", "damage", "match"), [
    ("transformer", "garbage_header", "has a corrupt safetensors header"),
    ("vae", "garbage_header", "has a corrupt safetensors header"),
    ("transformer", "truncated", "is not a safetensors file (only 4 bytes)"),
    ("transformer", "header_not_json", "has a corrupt safetensors header (not JSON)"),
])
def test_corrupt_safetensors_header(no_load, ckpt, tmp_path, component, damage, match):
    path = ckpt / component / WEIGHTS
    data = bytearray(path.read_bytes())
    if damage == "garbage_header":  # header length far beyond the file
        data[:8] = (2**62).to_bytes(8, "little")
    elif damage == "truncated":
        data = data[:4]
    else:  # length intact, JSON mangled
        data[8:16] = b"\xff" * 8
    path.write_bytes(bytes(data))
    msg = fails([f"checkpoint={ckpt}"], tmp_path / "out", match)
    assert str(path) in msg


def test_pickle_only_folder_is_refused(no_load, ckpt, tmp_path):
    vae = ckpt / "vae"
    (vae / "diffusion_pytorch_model.bin").write_bytes((vae / WEIGHTS).read_bytes())  # content never read
    (vae / WEIGHTS).unlink()
    fails([f"checkpoint={ckpt}"], tmp_path / "out",
          f"{vae} holds only pickle weights (diffusion_pytorch_model.bin); refusing to unpickle. "
          "Convert them to safetensors first.")


def test_no_weights_at_all(no_load, ckpt, tmp_path):
    (ckpt / "transformer" / WEIGHTS).unlink()
    fails([f"checkpoint={ckpt}"], tmp_path / "out", f"{ckpt / 'transformer'} has no {WEIGHTS} or {WEIGHTS}.index.json")


def test_nothing_written_on_bad_input(no_load, tmp_path):
    out = tmp_path / "out"
    fails(["height=33"], out, "height and width must be positive multiples of 16")
    assert not out.exists() or not any(out.iterdir())


# --------------------------------------------------------------------------------------------------------------
# The console script


def test_cli_bad_input_is_one_error_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("HYDRA_FULL_ERROR", None)
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "cosmos3_compiled.cli", "height=33", f"hydra.run.dir={run_dir}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: height and width must be positive multiples of 16, got height=33 width=128"
    ], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert "sha256" not in proc.stdout
    assert not (run_dir / "video.mp4").exists() and not (run_dir / "metrics.json").exists()


# --------------------------------------------------------------------------------------------------------------
# Interrupted save


@pytest.mark.parametrize("existing", [False, True], ids=["fresh_dir", "over_earlier_video"])
def test_interrupted_save_leaves_no_partial_video(monkeypatch, tmp_path, existing):
    import threading

    from cosmos3_compiled.media import Mp4Writer

    out = tmp_path / "out"
    out.mkdir()
    earlier = b"an earlier, complete video"
    if existing:
        (out / "video.mp4").write_bytes(earlier)
    written = []

    def close_then_die(writer):
        written.append(writer.path)
        raise KeyboardInterrupt  # Ctrl-C while Save waits for the encoder's tail

    monkeypatch.setattr(Mp4Writer, "close", close_then_die)
    with pytest.raises(KeyboardInterrupt):
        generate(compose_generate(SMALL), out)
    assert not [t for t in threading.enumerate() if t.name.startswith("mp4-writer")]  # the encoder was stopped
    assert written and written[0].parent == out and written[0].name != "video.mp4"  # wrote to a temp name
    if existing:
        assert (out / "video.mp4").read_bytes() == earlier  # the earlier video is untouched
    else:
        assert not (out / "video.mp4").exists()
    leftovers = sorted(p.name for p in out.iterdir() if p.name != "video.mp4")
    assert leftovers == [], f"partial files left: {leftovers}"
