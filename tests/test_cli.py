"""The Hydra app: every config option composes with typed values, typos fail at compose time, and the
console script writes a playable MP4, metrics.json and frames whose sha256 is the one printed.

CPU only; the model is the embedded debug default at 32x32, 1-2 steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import typing
from dataclasses import is_dataclass
from enum import Enum
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import DictConfig, ListConfig, OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file

from cosmos3_compiled.schema import ConditionKeep, Device, DType, FramesOut, GenerateConfig, Schedule
from helpers import CONF_DIR, compose_generate

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["height=32", "width=32", "num_frames=5", "sampler.num_inference_steps=2", "output.progress=false"]
STAGES = ("tokenize", "text_pass", "latents", "timesteps", "denoise", "decode", "postprocess", "save")


def run_cli(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """The console script's code path (`cosmos3-generate` = cosmos3_compiled.cli:main), run from this checkout."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "cosmos3_compiled.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def sha256_frames(path: Path) -> str:
    frames = load_file(str(path))["frames"]
    assert frames.dtype == torch.uint8
    return hashlib.sha256(frames.numpy().tobytes()).hexdigest()


def printed_sha(stdout: str) -> list[str]:
    return re.findall(r"^sha256 ([0-9a-f]{64})$", stdout, flags=re.M)


# --------------------------------------------------------------------------------------------------------------
# Composition: every option of every group, typed


def _options() -> list[tuple[str, str]]:
    """(group, option) for every conf/<group>/<option>.yaml, found on disk so new options are covered."""
    out = []
    for group in sorted(p for p in CONF_DIR.iterdir() if p.is_dir() and not p.name.startswith(("_", "."))):
        if group.name == "hydra":  # Hydra's own settings, not part of the app's config
            continue
        out += [(group.name, y.stem) for y in sorted(group.glob("*.yaml"))]
    return out


OPTIONS = _options()
HINTS_CACHE: dict[type, dict] = {}


def _hints(cls: type) -> dict:
    if cls not in HINTS_CACHE:
        HINTS_CACHE[cls] = typing.get_type_hints(cls)
    return HINTS_CACHE[cls]


def _schema_type(path: tuple[str, ...]):
    """The annotation GenerateConfig declares for a dotted path (None when the path is not in the schema)."""
    cls: typing.Any = GenerateConfig
    for key in path:
        if typing.get_origin(cls) is dict:  # a free-form mapping (e.g. compile.inductor): its value type
            cls = typing.get_args(cls)[1]
        elif not is_dataclass(cls) or key not in _hints(cls):
            return None
        else:
            cls = _hints(cls)[key]
    return cls


def _check_type(value, annotation, where: str) -> None:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            assert type(None) in args, f"{where}: None for non-optional {annotation}"
            return
        annotation = next(a for a in args if a is not type(None))
        origin = typing.get_origin(annotation)
    if origin is dict or annotation is dict:
        assert isinstance(value, (dict, DictConfig)), f"{where}: {value!r} is not a mapping"
    elif origin is list:
        assert isinstance(value, (list, ListConfig)), f"{where}: {value!r} is not a list"
        for i, item in enumerate(value):
            _check_type(item, args[0], f"{where}[{i}]")
    elif annotation is typing.Any:
        pass
    elif is_dataclass(annotation):
        assert isinstance(value, DictConfig) and OmegaConf.get_type(value) is annotation, f"{where}: not {annotation}"
    else:
        assert isinstance(value, annotation), f"{where}: {value!r} ({type(value).__name__}) is not {annotation}"
        if annotation is int:
            assert not isinstance(value, bool), f"{where}: bool where int expected"


def _leaves(node: dict, prefix: tuple[str, ...] = ()):
    for k, v in node.items():
        if isinstance(v, dict) and v:
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,), v


def _is_global(path: Path) -> bool:
    return any(line.strip() == "# @package _global_" for line in path.read_text().splitlines()[:5])


def test_groups_discovered():
    groups = {g for g, _ in OPTIONS}
    assert {"model", "sampler", "compile", "parallel", "output"} <= groups
    assert ("model", "debug") in OPTIONS and ("sampler", "default") in OPTIONS


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes_typed(group, option):
    path = CONF_DIR / group / f"{option}.yaml"
    cfg = compose_generate([f"{group}={option}"])
    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    raw.pop("defaults", None)
    assert raw, f"{path} sets nothing"
    prefix = () if _is_global(path) else (group,)
    if prefix:  # a group node is typed by its dataclass (an overlay's keys are global)
        assert OmegaConf.get_type(cfg[group]) is _schema_type((group,)), f"{group} node is not typed by the schema"
    for leaf, expected in _leaves(raw, prefix):
        dotted = ".".join(leaf)
        value = OmegaConf.select(cfg, dotted, throw_on_missing=True)
        if isinstance(expected, str) and expected.startswith("${"):
            continue  # interpolation: checked through the resolved value below
        got = value.value if isinstance(value, Enum) else value
        if isinstance(got, DictConfig):
            got = OmegaConf.to_container(got)
        assert got == expected, f"{dotted}: composed {got!r}, {path.name} says {expected!r}"
        annotation = _schema_type(leaf)
        assert annotation is not None, f"{dotted} ({path.name}) is not in the schema"
        _check_type(value, annotation, dotted)
    # the whole config resolves, and every schema field keeps its declared type
    resolved = OmegaConf.to_object(cfg)
    assert isinstance(resolved, GenerateConfig)
    for name, annotation in _hints(GenerateConfig).items():
        _check_type(cfg[name], annotation, name)


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "model"])
def test_model_options_are_runnable_requests(option):
    from cosmos3_compiled.config import preset
    from cosmos3_compiled.request import build_request

    cfg = compose_generate([f"model={option}"])
    preset(cfg.model.name)  # a known preset name, looked up exactly
    r = build_request(cfg)  # its default size (no checkpoint: the preset's) passes the request checks
    assert (r.height, r.width, r.num_frames) == (cfg.model.height, cfg.model.width, cfg.model.num_frames)


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "compile"])
def test_compile_options_name_known_modes(option):
    from cosmos3_compiled.compile import MODES

    cfg = compose_generate([f"compile={option}"])
    assert cfg.compile.mode in MODES or cfg.compile.mode == "auto"  # auto: resolved per job (test_defaults.py)
    assert cfg.compile.scope in ("blocks", "full")


def test_every_key_has_a_comment():
    """CONVENTIONS: every key in conf/ has a one-line comment saying what it does; reports every bare key."""
    bare = [f"{path.relative_to(CONF_DIR)}:{n}: {line.strip()}"
            for path in sorted(CONF_DIR.rglob("*.yaml"))
            for n, line in enumerate(path.read_text().splitlines(), 1)
            if re.match(r"^\s*[a-z_][a-z0-9_]*\s*:\s*\S", line) and "#" not in line]  # `key:` alone opens a block
    assert not bare, "keys without a comment:\n" + "\n".join(bare)


def test_defaults_compose_typed():
    cfg = compose_generate([])
    assert cfg.checkpoint is None and cfg.image is None
    assert cfg.model.name == "debug"
    assert cfg.device is Device.auto and cfg.dtype is DType.auto  # resolved per job (test_defaults.py)
    assert cfg.output.frames is FramesOut.none and cfg.output.video is True
    assert cfg.sampler.schedule is Schedule.checkpoint
    assert isinstance(cfg.fps, float) and isinstance(cfg.seed, int)
    assert (cfg.height, cfg.width, cfg.num_frames) == (None, None, None)  # the checkpoint's or the preset's


# The overrides the issue names, with a valid value and what the composed config must then hold.
REQUIRED_OVERRIDES = [
    ("checkpoint=/models/Cosmos3-Nano", "checkpoint", "/models/Cosmos3-Nano"),
    ("prompt='a cat on a sofa'", "prompt", "a cat on a sofa"),
    ("negative_prompt='blurry, low quality'", "negative_prompt", "blurry, low quality"),
    ("height=48", "height", 48),
    ("width=80", "width", 80),
    ("num_frames=13", "num_frames", 13),
    ("fps=12.5", "fps", 12.5),
    ("seed=7", "seed", 7),
    ("device=cuda", "device", Device.cuda),
    ("dtype=bfloat16", "dtype", DType.bfloat16),
    ("sampler.num_inference_steps=3", "sampler.num_inference_steps", 3),
    ("sampler.guidance_scale=1.5", "sampler.guidance_scale", 1.5),
    ("output.frames=uint8", "output.frames", FramesOut.uint8),
    ("output.frames=float32", "output.frames", FramesOut.float32),
    ("image=/tmp/cond.png", "image", "/tmp/cond.png"),
    ("video=/tmp/clip.mp4", "video", "/tmp/clip.mp4"),
    ("condition_keep=last", "condition_keep", ConditionKeep.last),
    ("add_resolution_template=false", "add_resolution_template", False),
    ("add_duration_template=false", "add_duration_template", False),
]


@pytest.mark.parametrize(("override", "key", "expected"), REQUIRED_OVERRIDES, ids=[o[0].split("=")[0] + "=" for o in
                                                                                  REQUIRED_OVERRIDES])
def test_required_overrides_exist(override, key, expected):
    cfg = compose_generate([override])
    value = OmegaConf.select(cfg, key)
    assert value == expected and type(value) is type(expected), f"{override}: got {value!r}"


def test_condition_frames_is_a_typed_int_list():
    assert list(compose_generate([]).condition_frames) == [0, 1]  # the reference's default
    assert list(compose_generate(["condition_frames=[0,2]"]).condition_frames) == [0, 2]
    with pytest.raises(ConfigCompositionException, match=re.escape("Error merging override condition_frames=[a]")):
        compose_generate(["condition_frames=[a]"])


def test_fps_int_is_coerced_to_float():
    assert compose_generate(["fps=30"]).fps == 30.0 and isinstance(compose_generate(["fps=30"]).fps, float)


@pytest.mark.parametrize("override", [
    "sampler.num_inference_stepz=3",
    "num_frame=5",
    "output.frame=uint8",
    "modle.name=debug",
    "compile.fullgrph=false",
])
def test_mistyped_key_fails_at_compose(override):
    with pytest.raises(ConfigCompositionException, match=re.escape(f"Could not override '{override.split('=')[0]}'")):
        compose_generate([override])


@pytest.mark.parametrize(("override", "detail"), [
    ("seed=abc", "Value 'abc' of type 'str' could not be converted to Integer"),
    ("height=1.5", "could not be converted to Integer"),
    ("fps=fast", "could not be converted to Float"),
    ("device=tpu", "Invalid value 'tpu', expected one of [auto, cpu, cuda]"),
    ("dtype=float16", "Invalid value 'float16', expected one of [auto, float32, bfloat16]"),
    ("output.frames=png", "Invalid value 'png', expected one of [none, uint8, float32]"),
    ("output.video=maybe", "'maybe' is not a valid bool"),
    ("sampler.schedule=cosine", "Invalid value 'cosine'"),
    ("output.preset=warp", "Invalid value 'warp', expected one of [ultrafast,"),
    ("compile.mode=turbo", "Invalid value 'turbo', expected one of [auto, eager, default,"),
])
def test_wrong_type_fails_at_compose(override, detail):
    with pytest.raises(ConfigCompositionException, match=re.escape(f"Error merging override {override}")) as info:
        compose_generate([override])
    assert detail in str(info.value.__cause__)


def test_unknown_group_option_fails_at_compose():
    with pytest.raises(MissingConfigException, match="model/huge"):
        compose_generate(["model=huge"])


def test_console_script_is_declared():
    from importlib.metadata import entry_points

    (script,) = entry_points(group="console_scripts", name="cosmos3-generate")
    assert script.value == "cosmos3_compiled.cli:main"
    from cosmos3_compiled.cli import main

    assert script.load() is main  # the declared script resolves to the CLI's entry point


def test_cli_rejects_wrong_type_before_running(tmp_path):
    proc = run_cli(["seed=abc", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert proc.returncode != 0
    assert "Error merging override seed=abc" in proc.stderr
    assert not (tmp_path / "run" / "video.mp4").exists()


# --------------------------------------------------------------------------------------------------------------
# Running the console script


@pytest.mark.slow
def test_cli_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*SMALL, "seed=3", "output.frames=uint8"]
    proc = run_cli([*overrides, f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.strip() == "" or "Traceback" not in proc.stderr

    # video.mp4: an H.264 MP4 that decodes to the requested frame count and size at the requested fps
    video = run_dir / "video.mp4"
    with av.open(str(video)) as container:
        assert "mp4" in container.format.name
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert float(stream.average_rate) == pytest.approx(24.0)
    from cosmos3_compiled.media import read_video_frames

    decoded = read_video_frames(video)
    assert decoded.shape == (5, 32, 32, 3) and decoded.dtype == np.uint8

    # frames.safetensors (uint8) is what the video encodes, and its sha256 is the printed one
    frames = load_file(str(run_dir / "frames.safetensors"))["frames"]
    assert frames.shape == (5, 32, 32, 3) and frames.dtype == torch.uint8
    luma_dec, luma_src = decoded.astype(np.float64).mean(-1), frames.numpy().astype(np.float64).mean(-1)
    assert np.corrcoef(luma_dec.ravel(), luma_src.ravel())[0, 1] > 0.6  # lossy, but the same pictures

    metrics = json.loads((run_dir / "metrics.json").read_text())
    printed = printed_sha(proc.stdout)
    assert len(printed) == 1, proc.stdout
    assert printed[0] == metrics["sha256"] == sha256_frames(run_dir / "frames.safetensors")
    with safe_open(str(run_dir / "frames.safetensors"), "pt") as f:
        assert f.metadata().get("sha256_uint8") == printed[0]

    # per-stage seconds and the resolved config
    seconds = metrics["seconds"]
    for stage in (*STAGES, "load", "total"):
        assert isinstance(seconds[stage], float) and seconds[stage] >= 0, stage
    assert seconds["total"] >= sum(seconds[s] for s in STAGES)
    from cosmos3_compiled.request import prepare

    job = prepare(compose_generate(overrides), tmp_path / "again")  # the config with every `auto` resolved
    assert metrics["config"] == OmegaConf.to_container(job.cfg, resolve=True, enum_to_str=True)
    assert metrics["auto"] == job.auto and metrics["config"]["device"] == "cpu"
    assert metrics["config"]["height"] == 32 and metrics["config"]["seed"] == 3
    assert metrics["source"] == "embedded:debug"
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert not list(run_dir.glob(".*partial*")), "temporary files left behind"


@pytest.fixture(scope="module")
def generate_fn():
    from cosmos3_compiled.pipeline import generate

    return generate


def test_float32_frames(tmp_path, generate_fn):
    state = generate_fn(compose_generate([*SMALL, "output.frames=float32", "output.video=false"]), tmp_path)
    path = tmp_path / "frames.safetensors"
    with safe_open(str(path), "pt") as f:
        assert list(f.keys()) == ["frames"]
    frames = load_file(str(path))["frames"]
    assert frames.shape == (5, 32, 32, 3) and frames.dtype == torch.float32
    assert 0.0 <= frames.min() and frames.max() <= 1.0
    assert frames.std() > 0.01  # not a constant picture
    # the sha256 is still that of the uint8 frames, which round the float ones
    expected_uint8 = (frames * 255).round().to(torch.uint8)
    assert (expected_uint8.int() - state.frames_uint8.int()).abs().max() <= 1
    assert not (tmp_path / "video.mp4").exists()


def test_vae_tiles_give_the_same_video(tmp_path, generate_fn):
    """model.vae_tiles reaches the decode: a tile-major decode in 3 strips, same frames (fp32, CPU)."""
    args = [*SMALL, "width=48", "output.frames=float32", "output.video=false"]
    generate_fn(compose_generate(args), tmp_path / "whole")
    generate_fn(compose_generate([*args, "model.vae_tiles=3"]), tmp_path / "tiled")
    a, b = (load_file(str(tmp_path / d / "frames.safetensors"))["frames"] for d in ("whole", "tiled"))
    assert a.std() > 0.01 and (a - b).abs().max().item() <= 1e-5
    cfg = json.loads((tmp_path / "tiled" / "metrics.json").read_text())["config"]
    assert cfg["model"]["vae_tiles"] == 3


def test_text_to_image_writes_png(tmp_path, generate_fn):
    from PIL import Image

    state = generate_fn(compose_generate([*SMALL, "num_frames=1", "width=48"]), tmp_path)
    png = tmp_path / "image.png"
    assert png.is_file() and not (tmp_path / "video.mp4").exists()
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size == (48, 32) and im.mode == "RGB"
        pixels = np.asarray(im)
    np.testing.assert_array_equal(pixels, state.frames_uint8[0].numpy())  # PNG is lossless
    assert json.loads((tmp_path / "metrics.json").read_text())["sha256"] == state.sha256


def test_tiny_checkpoint_tool_help():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "make_tiny_checkpoint.py"), "--help"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--preset" in proc.stdout and "--seed" in proc.stdout


@pytest.mark.parametrize(("preset", "seed"), [("debug", 0), ("debug_edge", 5)])
def test_tiny_checkpoint_matches_embedded_default(tmp_path, generate_fn, preset, seed):
    """tools/make_tiny_checkpoint.py writes the embedded default; loading it back gives the same frames."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import make_tiny_checkpoint
    finally:
        sys.path.remove(str(ROOT / "tools"))
    folder = make_tiny_checkpoint.main([str(tmp_path / "ckpt"), "--preset", preset, "--seed", str(seed)])
    for sub in ("transformer", "vae", "scheduler", "text_tokenizer"):
        assert (folder / sub).is_dir(), sub
    assert (folder / "model_index.json").is_file()
    assert not list(folder.rglob("*.bin")), "pickle weights written"

    request = [*SMALL, "seed=11", "sampler.guidance_scale=2.0"]
    embedded = generate_fn(compose_generate([*request, f"model={preset}", f"model.init_seed={seed}"]), tmp_path / "a")
    loaded = generate_fn(compose_generate([*request, f"checkpoint={folder}"]), tmp_path / "b")
    assert loaded.metrics["source"] == str(folder.resolve())
    assert embedded.sha256 == loaded.sha256
    # and the seed of the weights matters (the comparison above is not vacuous)
    other = generate_fn(compose_generate([*request, f"model={preset}", f"model.init_seed={seed + 1}"]), tmp_path / "c")
    assert other.sha256 != embedded.sha256


# --------------------------------------------------------------------------------------------------------------
# Multirun


@pytest.mark.slow
def test_multirun_two_seeds(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "seed=0,1", *SMALL[:-2], "sampler.num_inference_steps=1", "output.progress=false",
                    f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shas = []
    for job, seed in ((0, 0), (1, 1)):
        d = sweep / str(job)
        assert (d / "video.mp4").is_file() and (d / ".hydra" / "config.yaml").is_file()
        metrics = json.loads((d / "metrics.json").read_text())
        assert metrics["config"]["seed"] == seed
        assert metrics["models"] == ("loaded", "reused")[job]  # one process: job 1 takes job 0's models
        shas.append(metrics["sha256"])
    assert shas[0] != shas[1]
    assert printed_sha(proc.stdout) == shas  # jobs run in order, each prints its own line
    assert (sweep / "multirun.yaml").is_file()


@pytest.mark.slow
def test_multirun_failed_job_does_not_stop_the_sweep(tmp_path):
    """The bad job runs first; the good one after it still finishes; the command exits non-zero naming the error."""
    sweep = tmp_path / "sweep"
    proc = run_cli(["-m", "height=33,32", "width=32", "num_frames=5", "sampler.num_inference_steps=1",
                    "output.progress=false", f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out[-3000:]
    assert "job failed: height and width must be positive multiples of 16, got height=33 width=32" in out
    assert f"1 of 2 jobs failed:\n  {sweep / '0'}: height and width must be positive multiples of 16" in proc.stderr
    assert "Traceback" not in out  # a request error is one line, in the sweep too
    bad, good = sweep / "0", sweep / "1"
    assert not (bad / "video.mp4").exists() and not (bad / "metrics.json").exists()
    assert (good / "video.mp4").is_file(), out[-3000:]
    metrics = json.loads((good / "metrics.json").read_text())
    assert metrics["config"]["height"] == 32
    assert printed_sha(proc.stdout) == [metrics["sha256"]]
