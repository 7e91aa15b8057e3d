"""Models kept between the jobs of one process (`keep_loaded`): reused only for identical model/compile
settings, never after a failed job, with the same outputs as a fresh process, and no recompiles for a shape
already served."""

import pytest
import torch
from helpers import compose_generate

from cosmos3_compiled.compile import ServedBuckets
from cosmos3_compiled.pipeline import generate
from cosmos3_compiled.request import prepare
from cosmos3_compiled.resident import RESIDENT, resident_key

SMALL = ["height=32", "width=32", "num_frames=5", "sampler.num_inference_steps=2", "output.progress=false",
         "output.video=false"]


def run(tmp_path, name, *overrides):
    return generate(compose_generate([*SMALL, *overrides]), tmp_path / name).metrics


def test_second_job_reuses_the_models_and_matches_a_fresh_process(tmp_path):
    first = run(tmp_path, "a", "seed=0")
    assert first["models"] == "loaded" and RESIDENT.models is not None
    second = run(tmp_path, "b", "seed=1", "prompt=a different prompt that is longer than the first one")
    assert second["models"] == "reused"
    held = RESIDENT.models
    fresh = run(tmp_path, "c", "seed=1", "prompt=a different prompt that is longer than the first one", "keep_loaded=false")
    assert fresh["models"] == "loaded" and RESIDENT.models is None  # keep_loaded=false frees them at the end
    assert held.transformer is None  # ... and the ones kept before were released, not leaked
    assert second["sha256"] == fresh["sha256"] != first["sha256"]


@pytest.mark.parametrize("change", [pytest.param("compile.mode=default", marks=[pytest.mark.inductor, pytest.mark.slow]),
                                    "model.init_seed=1", "dtype=bfloat16", "model.vae_tiles=2"])
def test_other_model_settings_load_afresh(tmp_path, change):
    run(tmp_path, "a")
    held = RESIDENT.models
    assert run(tmp_path, "b", change)["models"] == "loaded"
    assert held.transformer is None and RESIDENT.models is not held


def test_request_settings_do_not_reload(tmp_path):
    run(tmp_path, "a")
    again = run(tmp_path, "b", "height=48", "num_frames=1", "sampler.guidance_scale=1.0", "compile.warmup_steps=2")
    assert again["models"] == "reused"


def test_failed_job_frees_the_models(tmp_path, monkeypatch):
    from cosmos3_compiled.stages.decode import Decode

    run(tmp_path, "a")
    held = RESIDENT.models

    def broken(self, state):
        raise RuntimeError("decode failed")

    monkeypatch.setattr(Decode, "__call__", broken)
    with pytest.raises(RuntimeError, match="decode failed"):
        run(tmp_path, "b", "seed=1")
    assert RESIDENT.models is None and held.transformer is None
    monkeypatch.undo()
    assert run(tmp_path, "c", "seed=1")["models"] == "loaded"


@pytest.mark.inductor
@pytest.mark.slow
def test_compiled_models_serve_a_known_shape_without_compiling(tmp_path, caplog):
    """compile=default on the CPU: the second job of the same shape compiles no graph (dynamo's counters) and
    its steps run under fail_on_recompile; a new text length compiles once and says so."""
    caplog.set_level("INFO", logger="cosmos3_compiled.compile")
    first = run(tmp_path, "a", "compile=default")
    assert first["compile"]["unique_graphs"] > 0
    second = run(tmp_path, "b", "compile=default", "seed=5")
    assert second["models"] == "reused"
    assert second["compile"]["unique_graphs"] == 0 and second["compile"]["graph_breaks"] == 0
    assert second["steps"]["recompiles_after_warmup"] == 0
    assert "already compiled in this process" in caplog.text
    third = run(tmp_path, "c", "compile=default", "prompt=another prompt with quite a few more words in it")
    assert third["compile"]["unique_graphs"] > 0 and third["steps"]["recompiles_after_warmup"] == 0


def test_served_shapes_reset_the_compiled_code_before_the_recompile_limit(monkeypatch):
    resets = []
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(1))
    served = ServedBuckets(limit=3)
    assert not served.add((2, 4, 4), [10, 7])
    assert not served.add((2, 4, 4), [10, 7])  # known shapes: nothing new
    assert not served.add((2, 4, 4), [12])  # 3 graphs of the video step: at the limit, not past it
    assert served.add((2, 4, 4), [13]) and resets == [1]  # a 4th would be past it: reset first
    assert served.text == {((2, 4, 4), 13)}
    assert not served.add((3, 4, 4), [13]) and not served.add((4, 4, 4), [13])
    assert served.add((5, 4, 4), [13]) and resets == [1, 1]  # 4th latent size for the VAE units


def test_key_ignores_request_fields(tmp_path):
    a = compose_generate([*SMALL, "seed=1", "prompt=x", "height=64"])
    b = compose_generate([*SMALL, "seed=2", "prompt=y", "compile.warmup_steps=3", "output.crf=20"])
    ja, jb = prepare(a, tmp_path / "a"), prepare(b, tmp_path / "b")
    assert resident_key(a, ja) == resident_key(b, jb)
    c = compose_generate([*SMALL, "model.attention_backend=math"])
    assert resident_key(c, prepare(c, tmp_path / "c")) != resident_key(a, ja)


@pytest.mark.gpu
def test_resident_cudagraph_requests_leave_gpu_memory_flat(tmp_path):
    """Every request of a resident `cudagraph` sweep captures its own step graph. What stays allocated between
    jobs must not grow: one new side stream per capture left a 32 MiB cuBLAS workspace behind each time."""
    base = [*SMALL, "device=cuda", "dtype=bfloat16", "compile=cudagraph", "output.video=true"]
    starts = [run(tmp_path, str(i), *base, f"seed={i}")["memory_gib_at_start"] for i in range(4)]
    # job 0 loaded the models, jobs 1-3 found them resident (job 0 may start above 0: earlier tests in the
    # process leave cuBLAS workspaces of their own)
    assert starts[0] < starts[1]
    assert max(starts[1:]) - min(starts[1:]) < 1 / 1024  # GiB: less than 1 MiB apart
