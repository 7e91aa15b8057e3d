"""FP8 (ModelOpt) checkpoints through the product's pipeline (`pipeline.generate`, what cosmos3-generate runs) on the
CPU: a tiny checkpoint written by tools/make_fp8_checkpoint.py from an unquantized one built with diffusers' classes.

- precision.policy=a16: our frames equal diffusers' Cosmos3OmniPipeline on the dequantized checkpoint (fp8 weight
  × scale, float32).
- the shipped policy: the regime of every step (metrics.json) is the reference's, the text K/V are recomputed
  where it changes, and the frames follow diffusers' pipeline switching ModelOpt stand-in linears itself.
- the two regimes are two compiled graphs of the step: no recompile in steady state, none in a second job.
- the precision overrides are checked in one line before any weights are read.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers.pipelines.cosmos import mixed_precision as mp
from fp8_reference import make_fp8_tool, reference_fp8, transformer_state, write_dequantized
from helpers import compose_generate
from reference import load_reference_pipeline, make_reference_checkpoint
from safetensors.torch import load_file

from cosmos3_compiled import compile as compile_mod
from cosmos3_compiled.errors import RequestError
from cosmos3_compiled.pipeline import generate
from cosmos3_compiled.request import prepare

REQUEST = dict(prompt="A red fox in the snow.", negative_prompt="blurry", height=32, width=48, num_frames=5,
               fps=16.0, guidance=4.0, seed=11)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8_pipeline")
    src = make_reference_checkpoint(root / "bf16", seed=3)
    dst = make_fp8_tool().make_fp8_checkpoint(src, root / "fp8")
    return src, dst, write_dequantized(dst, root / "dequantized")


def _ours(folder, tmp_path, steps: int, extra=()):
    r = REQUEST
    cfg = compose_generate([
        f"checkpoint={folder}", f"prompt='{r['prompt']}'", f"negative_prompt='{r['negative_prompt']}'",
        f"height={r['height']}", f"width={r['width']}", f"num_frames={r['num_frames']}", f"fps={r['fps']}",
        f"seed={r['seed']}", f"sampler.num_inference_steps={steps}", f"sampler.guidance_scale={r['guidance']}",
        "output.frames=float32", "output.progress=false", "output.video=false", *extra,
    ])
    state = generate(cfg, tmp_path)
    return state, load_file(str(state.outputs["frames"]))["frames"].numpy()


def _reference(pipe, steps: int, **kwargs):
    r = REQUEST
    with torch.no_grad():
        video = pipe(prompt=r["prompt"], negative_prompt=r["negative_prompt"], height=r["height"], width=r["width"],
                     num_frames=r["num_frames"], fps=r["fps"], num_inference_steps=steps,
                     guidance_scale=r["guidance"], generator=torch.Generator("cpu").manual_seed(r["seed"]),
                     output_type="np", enable_safety_check=False, **kwargs).video
    return np.asarray(video, dtype=np.float32).reshape(r["num_frames"], r["height"], r["width"], 3)


def test_the_tool_writes_a_whole_checkpoint(folders):
    """Every file of the source folder is there (the VAE's weights too: they share the transformer's file name
    stem), unchanged except the transformer, plus hf_quant_config.json."""
    src, dst, _ = folders
    files = sorted(p.relative_to(src) for p in src.rglob("*") if p.is_file())
    assert sorted(p.relative_to(dst) for p in dst.rglob("*") if p.is_file()) == sorted(
        [*files, type(files[0])("hf_quant_config.json")])
    for rel in files:
        if rel.parts[0] != "transformer":
            assert (dst / rel).read_bytes() == (src / rel).read_bytes(), rel
    qc = json.loads((dst / "transformer" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "modelopt" and qc["runtime"]["diffusion_step_policy"]["first_steps"]["count"] == 3


def test_a16_frames_equal_diffusers_on_the_dequantized_checkpoint(folders, tmp_path):
    _, dst, deq = folders
    state, ours = _ours(dst, tmp_path, steps=3, extra=["precision.policy=a16"])
    ref = _reference(load_reference_pipeline(deq), steps=3)
    err = np.abs(ours - ref).max()
    print(f"a16 vs diffusers on the dequantized checkpoint: max abs {err:.3g}")
    assert err <= 1e-4 and ref.std() > 0.05
    assert state.metrics["steps"]["regimes"] == ["W8A16"] * 3 and state.metrics["precision"] == {"every_step": "a16"}


@pytest.mark.parametrize("steps,overrides", [(8, {}), (5, {"first_steps": 1, "last_steps": 2})],
                         ids=["shipped_3_3", "first_1_last_2"])
def test_shipped_policy_switches_where_the_reference_does(steps, overrides, folders, tmp_path):
    """Our regimes per step against the reference's own trace, with the frames of diffusers' pipeline whose
    mixed-precision runtime switches ModelOpt stand-ins of the same FP8 tensors (W8A8 in float64 there)."""
    src, dst, _ = folders
    extra = [f"precision.{k}={v}" for k, v in overrides.items()]
    state, ours = _ours(dst, tmp_path, steps, extra)
    pipe = load_reference_pipeline(src)
    pipe.transformer = reference_fp8(pipe.transformer, transformer_state(dst))
    ref = _reference(pipe, steps, mixed_precision_format="fp8",
                     **{f"mixed_precision_{k}": v for k, v in overrides.items()})
    trace = pipe._mixed_precision_trace
    first, last = overrides.get("first_steps", 3), overrides.get("last_steps", 3)
    assert trace == ["W8A16"] * first + ["W8A8"] * (steps - first - last) + ["W8A16"] * last
    steps_m = state.metrics["steps"]
    assert steps_m["regimes"] == trace
    # the text K/V are recomputed exactly where the regime changes (the text tower's q/k/v/out switch with it)
    assert steps_m["text_pass_steps"] == [0, first, steps - last]
    assert set(steps_m["steady_median_s_by_regime"]) == {"W8A16", "W8A8"}
    err = np.abs(ours - ref).max()
    print(f"shipped policy {overrides} vs diffusers' mixed precision: max abs {err:.3g}")
    # W8A8: float64 in the stand-in, float32 here; an input a last bit apart may round to the next fp8 value
    assert err <= 1e-3


def test_regimes_are_two_compiled_graphs_without_recompiles(folders, tmp_path, monkeypatch):
    """compile.mode=default (dynamo's eager backend: the graphs and guards, no codegen), the shipped policy: each
    regime compiles on its first step, the steady state runs under fail_on_recompile; a second job of the same
    shape in the same process compiles nothing."""
    _, dst, _ = folders
    original = compile_mod.apply_compile
    monkeypatch.setattr(compile_mod, "apply_compile",
                        lambda model, settings: original(model, settings, backend="eager"))
    extra = ["compile.mode=default", "compile.warmup_steps=1"]
    first, _ = _ours(dst, tmp_path / "a", steps=8, extra=extra)
    c = first.metrics["compile"]
    assert c["graph_breaks"] == 0 and c["recompiles"] == 0
    # one graph per (regime, branch text length), all compiled by the warm step (step 3, the first W8A8 one)
    lengths = set(first.metrics["shape_bucket"]["text"])
    assert len(first.metrics["shape_bucket"]["regimes"]) == 2
    assert c["unique_graphs"] == 2 * len(lengths), (c, first.metrics["shape_bucket"])
    assert first.metrics["steps"]["recompiles_after_warmup"] == 0
    again, _ = _ours(dst, tmp_path / "b", steps=8, extra=extra)
    assert again.metrics["models"] == "reused"
    assert again.metrics["compile"]["unique_graphs"] == 0 and again.metrics["compile"]["recompiles"] == 0


def _prepare(folder, tmp_path, *extra):
    return prepare(compose_generate([f"checkpoint={folder}", "height=32", "width=32", "num_frames=1", *extra]),
                   tmp_path / "out")


def test_precision_overrides_checked_in_one_line(folders, tmp_path):
    src, dst, _ = folders
    for folder, extra, match in [
        (src, ["precision.policy=a8"], "precision.policy=a8 applies to FP8 .* not quantized"),
        (src, ["precision.first_steps=2"], "precision.first_steps=2 applies to FP8"),
        (None, ["precision.policy=a16"], "embedded default model is not quantized"),
        (dst, ["precision.policy=a8", "precision.last_steps=1"], "precision.last_steps sets a W8A16 window"),
        (src, ["precision.fp8_attention=true"], "precision.fp8_attention=true applies to FP8"),
        (dst, ["precision.policy=a16", "precision.fp8_attention=true"], "fp8_attention=true runs at the W8A8 steps"),
    ]:
        with pytest.raises(RequestError, match=match) as err:
            if folder is None:
                prepare(compose_generate(extra), tmp_path / "out")
            else:
                _prepare(folder, tmp_path, *extra)
        assert "\n" not in str(err.value)
    assert _prepare(src, tmp_path).precision is None  # the default on an unquantized checkpoint: nothing to do
    job = _prepare(dst, tmp_path, "precision.first_steps=0", "precision.last_steps=1", "sampler.num_inference_steps=4")
    assert job.precision.schedule(4) == ["W8A8"] * 3 + ["W8A16"]
    job = _prepare(dst, tmp_path, "precision.fp8_attention=true", "sampler.num_inference_steps=8")
    assert [job.precision.step_modes(i, 8)[-1] for i in range(8)] == ["bf16"] * 3 + ["fp8"] * 2 + ["bf16"] * 3
    # a checkpoint with no step policy (the distilled ones) stays W8A8, as the reference's auto mode
    assert mp.Cosmos3MixedPrecisionConfig.resolve(
        quantization_config={"quant_method": "modelopt", "quant_algo": "FP8"}).enabled is False


def test_w8a8_needs_input_scales(folders, tmp_path):
    """A weight-only export (no input_scale) runs W8A16 only: any policy with a W8A8 step is refused up front."""
    src, _, _ = folders
    weights_only = make_fp8_tool().make_fp8_checkpoint(src, tmp_path / "w8", input_scales=False)
    for extra in (["precision.policy=a8"], ["sampler.num_inference_steps=35"]):
        with pytest.raises(RequestError, match="no input_scale .* use precision.policy=a16") as err:
            _prepare(weights_only, tmp_path, *extra)
        assert "\n" not in str(err.value)
    assert _prepare(weights_only, tmp_path, "precision.policy=a16").precision.all_a16
    # six steps with the shipped first/last 3: every step W8A16, the reasoner too, so nothing needs an input scale
    assert _prepare(weights_only, tmp_path, "sampler.num_inference_steps=6").precision is not None
    state, _ = _ours(weights_only, tmp_path / "run", steps=2, extra=["precision.policy=a16"])
    assert state.metrics["steps"]["regimes"] == ["W8A16"] * 2
