"""Scale-out on torch.distributed, on the CPU with gloo: CFG-parallel and Ulysses sequence-parallel runs of the
debug model against the single-process run (video-step velocity and whole generations under torchrun),
only rank 0 writes, and the Ulysses video step compiles fullgraph with its collectives inside the graph."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import (STEP_TEXT_LENS, compose_generate, setup_step_branches, spawn_ranks, step_reference,
                     step_worker_inputs, subprocess_env, torchrun)
from omegaconf import OmegaConf
from safetensors.torch import load_file

from cosmos3_compiled import distributed
from cosmos3_compiled.checkpoint import build_random
from cosmos3_compiled.compile import apply_compile
from cosmos3_compiled.config import preset
from cosmos3_compiled.distributed import ParallelError, Ulysses, layout
from cosmos3_compiled.pipeline import generate
from cosmos3_compiled.schema import CompileConfig
from cosmos3_compiled.vae import RowSplit

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR_LAUNCHER = ROOT / "cosmos3_compiled" / "conf" / "hydra" / "launcher"
GUIDANCE = 4.0


# ---- layout and errors (no processes) --------------------------------------------------------------


def test_layout_and_errors(monkeypatch):
    assert layout(True, 0, 4) == (2, 2) and layout(False, 0, 2) == (1, 2) and layout(True, 1, 2) == (2, 1)
    with pytest.raises(ParallelError, match=r"needs 4 processes but the job has 2.*--nproc-per-node 4"):
        layout(True, 2, 2)
    sp = Ulysses(2, 1, None)
    sp.setup_tokens(9)  # 9 tokens over 2 ranks: 5 each, the last one zero-padded
    assert sp.padded == 10 and sp.shard_tokens(torch.arange(1, 10)).tolist() == [6, 7, 8, 9, 0]
    with pytest.raises(ParallelError, match=r"divide the model's 2 key/value heads; use parallel.ulysses in \[1, 2\]"):
        Ulysses(4, 0, None).check_heads(2)
    model = build_random(preset("debug"), seed=0)
    with pytest.raises(ParallelError, match="4 key/value heads|2 key/value heads"):
        distributed.apply_sequence_parallel(model, Ulysses(4, 0, None))
    distributed.apply_sequence_parallel(model, Ulysses(2, 0, None))  # no collective before the first step
    branch = model.setup_branch(5, (1, 6, 6), fps=16.0)  # 1 × 3 × 3 tokens
    assert branch.cos.shape == (5, 8) and branch.k_bufs[0].shape == (1, 5 + 9, 16)  # keys: the 9 real tokens
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.agree_run_dir(["seed=1"]) == ["seed=1"]  # one process: Hydra's own run dir


@pytest.mark.parametrize("overrides, message", [
    (["parallel=cfg", "parallel.backend=gloo"], "needs several processes; launch with `torchrun --nproc-per-node 2"),
    (["parallel=ulysses", "parallel.backend=gloo"], "needs several processes"),
])
def test_parallel_without_torchrun_fails_in_one_line(overrides, message, tmp_path, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = compose_generate([*overrides, "output.progress=false"])
    with pytest.raises(ParallelError, match=message):
        generate(cfg, tmp_path)
    assert not any(tmp_path.iterdir())


def test_nccl_on_cpu_is_rejected(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = compose_generate(["parallel=cfg", "parallel.backend=nccl"])  # asked for (null follows the device)
    with pytest.raises(ParallelError, match="parallel.backend=nccl needs device=cuda; use parallel.backend=gloo"):
        distributed.init_parallel(cfg.parallel, "cpu")


# ---- the video step on 2 ranks (torch.multiprocessing, gloo) ---------------------------------------------


def _step_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    ids, latents, timesteps = step_worker_inputs(rank, world, port)
    report = {}
    with torch.no_grad():
        # the single-process reference, computed on every rank
        ref, want = step_reference(ids, latents, timesteps)
        combined = {t: want[t][1] + GUIDANCE * (want[t][0] - want[t][1]) for t in timesteps}

        # CFG parallel: one branch per rank, one all-gather, the same fp32 combine everywhere
        par = distributed.init_parallel(OmegaConf.create(dict(cfg=True, ulysses=1, backend="gloo")), "cpu")
        model = build_random(preset("debug"), seed=5)
        (mine,) = setup_step_branches(model, [ids[par.cfg_rank]])
        v = model(latents, torch.tensor(timesteps[0]), mine)
        cond, uncond = par.gather_cfg(v)
        got = uncond + GUIDANCE * (cond - uncond)
        report["cfg_max_abs"] = (got - combined[timesteps[0]]).abs().max().item()
        report["cfg_exact"] = torch.equal(got, combined[timesteps[0]])
        distributed.teardown(par)

        # Ulysses 2 (a second process group in the same processes, as a sweep would make)
        par = distributed.init_parallel(OmegaConf.create(dict(cfg=False, ulysses=0, backend="gloo")), "cpu")
        from torch._dynamo.utils import counters

        results = {}
        # each layer compiled fullgraph with the token shard / gather eager around them ("blocks", the
        # default scope; first, before any eager Ulysses collective ran in this process, as in a real run),
        # the whole video step fullgraph ("full"), then eager; a fresh model each
        for scope in ("blocks", "full", "eager"):
            torch.compiler.reset()
            counters.clear()
            model = build_random(preset("debug"), seed=5)
            distributed.apply_sequence_parallel(model, par.ulysses)
            branches = setup_step_branches(model, ids)
            assert branches[0].k_bufs[0].shape == (1, STEP_TEXT_LENS[0] + 18, 16)  # 1 of 2 kv heads, every token
            assert branches[0].cos.shape[0] == 9  # this rank's tokens
            if scope != "eager":  # the product's compile, in place (scope "full": `model.compile`)
                apply_compile(model, CompileConfig(mode="default", scope=scope, fullgraph=True, dynamic=False),
                              backend="aot_eager")
            for b in branches:  # warm-up: one graph per text length
                model(latents, torch.tensor(timesteps[0]), b)
            with torch.compiler.set_stance("fail_on_recompile"), torch._dynamo.config.patch(error_on_recompile=True):
                results[scope] = {t: [model(latents, torch.tensor(t), b) for b in branches] for t in timesteps}
            report[f"{scope}_graph_breaks"] = sum(counters["graph_break"].values())
            report[f"{scope}_unique_graphs"] = counters["stats"]["unique_graphs"]
        eager = results["eager"]
        errs = [(eager[t][i] - want[t][i]).abs().max().item() for t in timesteps for i in range(2)]
        report["ulysses_max_abs"] = max(errs)
        report["ulysses_exact"] = all(torch.equal(eager[t][i], want[t][i]) for t in timesteps for i in range(2))
        # a token count the degree does not divide (1 × 3 × 3 = 9: 5 + 4 padded to 5 + 5), eager
        odd = (1, 5, 6)
        lat_odd = torch.randn(1, 48, *odd, generator=torch.Generator().manual_seed(1))
        ref_odd = [ref.setup_branch(len(t), odd, fps=16.0) for t in ids]
        model = build_random(preset("debug"), seed=5)
        distributed.apply_sequence_parallel(model, par.ulysses)
        sp_odd = [model.setup_branch(len(t), odd, fps=16.0) for t in ids]
        for t, rb, sb in zip(ids, ref_odd, sp_odd):
            ref.text_pass(t, rb)
            model.text_pass(t, sb)
        want_odd = [ref(lat_odd, torch.tensor(700.0), b) for b in ref_odd]
        got_odd = [model(lat_odd, torch.tensor(700.0), b) for b in sp_odd]
        report["odd_max_abs"] = max((g - w).abs().max().item() for g, w in zip(got_odd, want_odd))
        report["odd_exact"] = all(torch.equal(g, w) for g, w in zip(got_odd, want_odd))
        for scope in ("blocks", "full"):
            report[f"{scope}_compiled_max_abs"] = max((results[scope][t][i] - eager[t][i]).abs().max().item()
                                                      for t in timesteps for i in range(2))
        distributed.teardown(par)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))


@pytest.mark.distributed
@pytest.mark.slow
def test_video_step_cfg_and_ulysses_match_single_process(tmp_path):
    for r in spawn_ranks(_step_worker, 2, tmp_path):
        assert r["cfg_exact"], r  # data movement only: bit-identical
        assert r["ulysses_max_abs"] <= 1e-5, r  # GEMMs over N/2 rows may round differently (exact here so far)
        assert r["odd_max_abs"] <= 1e-5, r  # padded queries dropped, padded keys never written
        for scope in ("full", "blocks"):  # blocks: 2 layers share one code object → 2 graphs (text lengths)
            assert r[f"{scope}_graph_breaks"] == 0 and r[f"{scope}_unique_graphs"] == 2, r
            assert r[f"{scope}_compiled_max_abs"] <= 1e-6, r


# ---- height-parallel VAE decode (2 ranks) ------------------------------------------------------------


def _decode_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    from cosmos3_compiled.components import embedded_vae_config, init_vae_random_
    from cosmos3_compiled.vae import VAEConfig, build_vae

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    raw = {**embedded_vae_config(48, full_size=False), "num_res_blocks": 2}  # the real VAE's block structure

    def build():
        vae = build_vae(VAEConfig.from_dict(raw), with_encoder=False, device="cpu")
        return init_vae_random_(vae, 3).eval().requires_grad_(False)

    z = torch.randn(1, 48, 3, 12, 5, generator=torch.Generator().manual_seed(0))
    want = build().decode_frames(z)
    par = distributed.init_parallel(OmegaConf.create(dict(cfg=False, ulysses=0, backend="gloo")), "cpu")
    vae = build()
    split = distributed.apply_row_parallel_decode(vae, par)
    got = vae.decode_frames(z)
    # the layout compile.vae=default uses (channels_last_3d) through the same split
    vae_cl = build().apply_channels_last_3d()
    distributed.apply_row_parallel_decode(vae_cl, par)
    got_cl = vae_cl.decode_frames(z)
    distributed.teardown(par)
    report = {"exact": torch.equal(got, want), "max_abs": (got - want).abs().max().item(),
              "block": list(split.block(24)), "reads": list(vae._row_block(12)[2].src),
              "max_abs_channels_last": (got_cl - want).abs().max().item()}
    # a whole generation given a different output folder per rank: only rank 0's gets anything
    cfg = compose_generate(["parallel=cfg", "parallel.backend=gloo", "parallel.vae_rows=true", *REQUEST])
    state = generate(cfg, Path(out_dir, f"out{rank}"))
    report["outputs"] = sorted(state.outputs)
    report["sha256"] = state.sha256
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))


@pytest.mark.distributed
@pytest.mark.slow
def test_row_parallel_decode_is_exact_and_only_rank0_writes(tmp_path):
    reports = spawn_ranks(_decode_worker, 2, tmp_path)
    # tail input 24 rows (12 latent rows × 2; the split block's ×2 runs in the tail): 12 per rank, each reading
    # a halo of the other's rows (`Decoder.span`) and nothing past the frame's edges
    assert [r["block"] for r in reports] == [[12, 0, 12], [12, 12, 24]]
    (lo0, hi0), (lo1, hi1) = (r["reads"] for r in reports)
    assert lo0 == 0 and 12 < hi0 < 24 and 0 < lo1 < 12 and hi1 == 24, reports
    assert all(r["exact"] for r in reports), reports  # a halo too small by a few rows shows up only at ~1e-5
    assert all(r["max_abs_channels_last"] <= 1e-5 for r in reports), reports
    # only global rank 0 writes (rank 1 decoded its rows but wrote nothing, not even its output folder)
    assert reports[0]["outputs"] == ["frames", "metrics", "video"] and reports[1]["outputs"] == []
    assert reports[1]["sha256"] is None and not (tmp_path / "out1").exists()
    assert sorted(p.name for p in (tmp_path / "out0").iterdir()) == ["frames.safetensors", "metrics.json", "video.mp4"]


def test_row_blocks_cover_uneven_heights():
    blocks = [RowSplit(rank, 3, None).block(28) for rank in range(3)]
    assert blocks == [(10, 0, 10), (10, 10, 20), (10, 20, 28)]  # the last one short (padded by the gather)


# ---- whole generations under torchrun ---------------------------------------------------------------


REQUEST = ["height=48", "width=64", "num_frames=5", "sampler.num_inference_steps=2", "output.frames=float32",
           "output.progress=false", "seed=7"]  # 2 × 2 × 2 = 8 video tokens


@pytest.fixture(scope="module")
def single_process_frames(tmp_path_factory):
    """The reference: one process, one thread (as torchrun's workers run), same request."""
    out = tmp_path_factory.mktemp("single")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        state = generate(compose_generate(REQUEST), out)
    finally:
        torch.set_num_threads(threads)
    return load_file(str(out / "frames.safetensors"))["frames"], state.sha256


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("layout_name, nproc, vae_rows, exact", [
    ("cfg", 2, False, True),
    ("ulysses", 2, False, False),
    ("cfg_ulysses", 4, True, False),  # and the decode split by rows over the 4 ranks
])
def test_torchrun_generation_matches_single_process(layout_name, nproc, vae_rows, exact, single_process_frames,
                                                    tmp_path):
    # model.batch_cfg needs both branches' whole sequences on one rank: every layout here falls back to per-branch
    overrides = [f"parallel={layout_name}", "parallel.backend=gloo", f"parallel.vae_rows={vae_rows}",
                 "model.batch_cfg=true", "hydra.verbose=[cosmos3_compiled.stages.denoise,cosmos3_compiled.stages.decode]"]
    proc = torchrun(nproc, [*overrides, *REQUEST], tmp_path)
    assert proc.returncode == 0, proc.report()
    # every rank ends with the same latents (the row-parallel decode relies on it) and the same video
    for what in ("final latents: sum", "video: sum"):
        found = [line.split(what, 1)[1] for line in (proc.stdout + proc.stderr).splitlines() if what in line]
        count = nproc if vae_rows or what != "video: sum" else 1
        assert len(set(found)) == 1 and len(found) == count, (what, found)
    want, want_sha = single_process_frames
    # one run directory, decided on rank 0 and used by every rank; only rank 0 wrote into it
    runs = [p for p in (tmp_path / "outputs").glob("*/*") if p.is_dir()]
    assert len(runs) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["outputs"], runs
    run = runs[0]
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert files == [".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml", "cli.log",
                     "frames.safetensors", "metrics.json", "video.mp4"], files
    assert proc.stdout.count("sha256 ") == 1  # printed by rank 0 only
    got = load_file(str(run / "frames.safetensors"))["frames"]
    err = (got - want).abs().max().item()
    print(f"{layout_name}: max abs vs single process {err:.3g}")
    if exact:
        assert torch.equal(got, want)
        assert f"sha256 {want_sha}" in proc.stdout
    else:  # float frames within fp32 noise; their uint8 rounding (the sha256) may flip a pixel at a .5 tie
        assert err <= 1e-5
    metrics = json.loads((run / "metrics.json").read_text())
    degree = {"cfg": 1, "ulysses": 2, "cfg_ulysses": 2}[layout_name]
    assert metrics["parallel"] == {"world_size": nproc, "backend": "gloo", "cfg": layout_name != "ulysses",
                                   "ulysses": degree, "vae_rows": vae_rows}


@pytest.mark.distributed
@pytest.mark.inductor
@pytest.mark.slow
def test_bf16_compiled_cfg_with_row_decode_matches_single_process(tmp_path):
    """bf16, inductor-compiled layers, CFG-parallel + row-parallel decode: the single-process frames, bit for bit
    (on the GPU this holds when both runs use the same compiled kernels: docs/distributed.md)."""
    request = [*REQUEST, "dtype=bfloat16", "compile=default", f"compile.cache_dir={tmp_path / 'cache'}"]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        state = generate(compose_generate(request), tmp_path / "single")
    finally:
        torch.set_num_threads(threads)
    proc = torchrun(2, ["parallel=cfg", "parallel.backend=gloo", "parallel.vae_rows=true", *request], tmp_path)
    assert proc.returncode == 0, proc.report()
    assert f"sha256 {state.sha256}" in proc.stdout


@pytest.mark.distributed
@pytest.mark.slow
def test_local_launcher_runs_a_job_on_two_processes(single_process_frames, tmp_path):
    """conf/hydra/launcher/local.yaml: a sweep job CFG-parallel over 2 submitit tasks (one job: 2 cores here)."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the `cluster` extra")
    env = subprocess_env()
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "cosmos3_compiled.cli", "-m", "hydra/launcher=local", "hydra.launcher.gpus_per_node=0",
           f"hydra.sweep.dir={sweep}", "parallel=cfg", "parallel.backend=gloo", *REQUEST]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    logs = "\n".join(f"===== {p} =====\n{p.read_text(errors='replace')}" for p in sorted(tmp_path.rglob("*.log*")))
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}\n{logs}"  # every task's whole log
    want, want_sha = single_process_frames
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert metrics["parallel"]["world_size"] == 2 and metrics["sha256"] == want_sha
    assert torch.equal(load_file(str(sweep / "0" / "frames.safetensors"))["frames"], want)
    assert sorted(p.name for p in sweep.iterdir() if not p.name.startswith(".")) == ["0", "multirun.yaml"]


@pytest.mark.parametrize("launcher", ["slurm", "local"])
def test_launcher_configs_compose(launcher):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="needs the `cluster` extra")
    cfg = compose_generate([f"hydra/launcher={launcher}", "parallel=cfg_ulysses", "hydra.launcher.tasks_per_node=4"],
                           return_hydra_config=True)
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher" if launcher == "slurm" else "LocalLauncher")
    assert cfg.hydra.launcher.tasks_per_node == 4 and cfg.hydra.launcher.timeout_min == 60
    for line in (CONF_DIR_LAUNCHER / f"{launcher}.yaml").read_text().splitlines():  # every key commented
        assert line.startswith("#") or "#" in line or not line.strip() or line.strip() == "defaults:", line
