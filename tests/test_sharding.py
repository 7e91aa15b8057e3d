"""Weight sharding (`parallel.shard=fsdp`, FSDP2 over the job's one device mesh) on the CPU with gloo: the sharded
video step alone and with CFG / Ulysses gives the single-process velocities, compiles per layer with no graph
breaks and no recompiles, and whole generations under torchrun give the single-process frames. Also the `super`
preset's size and the settings sharding refuses."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import (compose_generate, setup_step_branches, spawn_ranks, step_reference, step_worker_inputs,
                     torchrun)
from omegaconf import OmegaConf
from safetensors.torch import load_file

from cosmos3_compiled import distributed, offload, sharding
from cosmos3_compiled.checkpoint import build_random
from cosmos3_compiled.compile import apply_compile
from cosmos3_compiled.config import preset
from cosmos3_compiled.distributed import ParallelError, layout
from cosmos3_compiled.errors import RequestError
from cosmos3_compiled.model import Cosmos3Transformer
from cosmos3_compiled.pipeline import generate
from cosmos3_compiled.schema import CompileConfig

GUIDANCE = 4.0


# ---- no processes ----------------------------------------------------------------------------------


def test_super_preset_is_64b():
    """32 B per tower as published (hidden 5120, 64 layers, 64 q / 8 kv heads, FFN 25600 inferred)."""
    with torch.device("meta"):
        model = Cosmos3Transformer(preset("super"))
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    text = sum(v for n, v in sizes.items() if offload.is_text_param(n))
    video = sum(sizes.values()) - text
    assert 31.9e9 < text < 32.1e9 and 31.1e9 < video < 31.4e9, (text, video)
    cfg = compose_generate(["model=super"])
    assert cfg.model.name == "super" and cfg.parallel.shard.value == "none"


def test_layout_and_refusals():
    assert layout(False, 1, 2, shard=True) == (1, 1)  # 2 replicas: identical compute, weights split
    assert layout(True, 1, 4, shard=True) == (2, 1)  # 2 replicas of a CFG pair
    with pytest.raises(ParallelError, match="needs 1 processes but the job has 2"):
        layout(False, 1, 2)
    with pytest.raises(RequestError, match="compile=cudagraph captures the whole step.*compile=default"):
        sharding.check_compile("fsdp", "cudagraph", "blocks")
    with pytest.raises(RequestError, match="compile.scope=full.*compile.scope=blocks"):
        sharding.check_compile("fsdp", "default", "full")
    sharding.check_compile("fsdp", "eager", "full")
    sharding.check_compile("none", "cudagraph", "full")


def test_shard_without_torchrun_fails_in_one_line(tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = compose_generate(["parallel.shard=fsdp", "parallel.backend=gloo", "output.progress=false"])
    with pytest.raises(ParallelError, match=r"parallel.shard=fsdp needs several processes.*--nproc-per-node 2"):
        generate(cfg, tmp_path)


# ---- the sharded video step on 2 ranks --------------------------------------------------------------------


def _video_numel(model) -> int:
    """Elements of the video tower's parameters this rank holds (its shards, when sharded)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return sum((p.to_local() if hasattr(p, "to_local") else p).numel()
               for p in model.parameters() if not offload.is_text_param(names[id(p)]))


def _step_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from torch._dynamo.utils import counters

    ids, latents, timesteps = step_worker_inputs(rank, world, port)
    report = {}
    with torch.no_grad():
        ref, want = step_reference(ids, latents, timesteps)
        whole = _video_numel(ref)

        # shard alone (2 replicas): every rank runs both branches; eager, then each layer compiled fullgraph
        par = distributed.init_parallel(OmegaConf.create(dict(cfg=False, ulysses=1, backend="gloo", shard="fsdp")),
                                        "cpu")
        report["replicas"] = par.replicas
        for scope in ("eager", "blocks"):
            torch.compiler.reset()
            counters.clear()
            model = build_random(preset("debug"), seed=5)
            sharding.apply_fsdp(model, par.mesh)
            report["video_fraction"] = _video_numel(model) / whole
            report["text_on_rank"] = all(not hasattr(p, "to_local") for p in offload.text_params(model))
            branches = setup_step_branches(model, ids)
            if scope == "blocks":
                apply_compile(model, CompileConfig(mode="default", scope="blocks", fullgraph=True, dynamic=False),
                              backend="aot_eager")
            for b in branches:  # warm-up: one graph per text length
                model(latents, torch.tensor(timesteps[0]), b)
            with torch.compiler.set_stance("fail_on_recompile"):
                got = {t: [model(latents, torch.tensor(t), b) for b in branches] for t in timesteps}
            report[f"{scope}_max_abs"] = max((got[t][i] - want[t][i]).abs().max().item()
                                             for t in timesteps for i in range(2))
            report[f"{scope}_graph_breaks"] = sum(counters["graph_break"].values())
            report[f"{scope}_unique_graphs"] = counters["stats"]["unique_graphs"]
        # model.batch_cfg's step (forward_batched) is an FSDP forward method too
        torch.compiler.reset()
        model = build_random(preset("debug"), seed=5)
        sharding.apply_fsdp(model, par.mesh)
        branches = setup_step_branches(model, ids)
        got = model.forward_batched(latents, torch.tensor(timesteps[1]), branches, *model.setup_batched(branches))
        report["batched_max_abs"] = max((g - w).abs().max().item() for g, w in zip(got, want[timesteps[1]]))
        distributed.teardown(par)

        # shard + CFG parallel (one branch per rank) and shard + Ulysses 2, eager
        for name, node in (("cfg", dict(cfg=True, ulysses=1)), ("ulysses", dict(cfg=False, ulysses=0))):
            par = distributed.init_parallel(OmegaConf.create(dict(**node, backend="gloo", shard="fsdp")), "cpu")
            model = build_random(preset("debug"), seed=5)
            distributed.apply_sequence_parallel(model, par.ulysses)
            sharding.apply_fsdp(model, par.mesh)
            if name == "cfg":
                (mine,) = setup_step_branches(model, [ids[par.cfg_rank]])
                cond, uncond = par.gather_cfg(model(latents, torch.tensor(timesteps[0]), mine))
                combined = want[timesteps[0]][1] + GUIDANCE * (want[timesteps[0]][0] - want[timesteps[0]][1])
                err = (uncond + GUIDANCE * (cond - uncond) - combined).abs().max().item()
            else:
                branches = setup_step_branches(model, ids)
                err = max((model(latents, torch.tensor(timesteps[0]), b) - w).abs().max().item()
                          for b, w in zip(branches, want[timesteps[0]]))
            report[f"{name}_max_abs"] = err
            report[f"{name}_describe"] = par.describe()
            distributed.teardown(par)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))


@pytest.mark.distributed
@pytest.mark.slow
def test_sharded_video_step_matches_single_process(tmp_path):
    for r in spawn_ranks(_step_worker, 2, tmp_path):
        assert r["replicas"] == 2 and 0.5 <= r["video_fraction"] < 0.52, r  # dim-0 shards (a few rows padded)
        assert r["text_on_rank"], r  # the text tower stays whole (plain tensors) on every rank
        for key in ("eager", "blocks", "batched", "cfg", "ulysses"):
            assert r[f"{key}_max_abs"] <= 1e-5, (key, r)
        assert r["blocks_graph_breaks"] == 0 and r["blocks_unique_graphs"] == 2, r  # one graph per text length
        assert r["cfg_describe"]["shard"] == "fsdp" and r["ulysses_describe"]["ulysses"] == 2, r


# ---- whole generations under torchrun ---------------------------------------------------------------

REQUEST = ["height=48", "width=64", "num_frames=5", "sampler.num_inference_steps=2", "output.frames=float32",
           "output.progress=false", "seed=7"]


@pytest.fixture(scope="module")
def single_process_frames(tmp_path_factory):
    out = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        generate(compose_generate(REQUEST), out)
    finally:
        torch.set_num_threads(threads)
    return load_file(str(out / "frames.safetensors"))["frames"]


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("nproc, overrides", [
    (2, ["parallel.shard=fsdp", "model.batch_cfg=true"]),  # 2 replicas, both branches batched
    (2, ["parallel=cfg", "parallel.shard=fsdp"]),
    (4, ["parallel=cfg_ulysses", "parallel.shard=fsdp"]),  # 2 CFG groups × Ulysses 2, weights over all 4
])
def test_torchrun_sharded_generation_matches_single_process(nproc, overrides, single_process_frames, tmp_path):
    proc = torchrun(nproc, [*overrides, "parallel.backend=gloo", *REQUEST], tmp_path)
    assert proc.returncode == 0, proc.report()
    (run,) = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    got = load_file(str(run / "frames.safetensors"))["frames"]
    err = (got - single_process_frames).abs().max().item()
    print(f"{overrides}: max abs vs single process {err:.3g}")
    assert err <= 1e-5
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["parallel"]["shard"] == "fsdp" and metrics["parallel"]["world_size"] == nproc
