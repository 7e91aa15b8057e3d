"""Shared test helpers: Hydra composition of the real configs, seeded random weights for the reference (diffusers)
models, the text pass done two ways, and torchrun launches whose failures show every rank's whole output."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir

from cosmos3_compiled.schema import register_configs

ROOT = Path(__file__).resolve().parents[1]
CONF_DIR = ROOT / "cosmos3_compiled" / "conf"


# ---- Hydra -------------------------------------------------------------------------------------------


def compose_generate(overrides: list[str] | None = None, return_hydra_config: bool = False):
    """The `generate` config composed from conf/ with the Compose API (as the CLI would, without running)."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="generate", overrides=list(overrides or []),
                       return_hydra_config=return_hydra_config)


# ---- random weights of reference models ----------------------------------------------------------------


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int, bias_std: float = 0.05) -> torch.nn.Module:
    """Every parameter of a reference (diffusers) model drawn from one seeded generator, random but not trivial:
    norm gains (RMSNorm `*norm*.weight`, the VAE's `gamma`) 1 + 0.3·N(0, 1), so a norm skipped or applied twice
    shows up; token embeddings N(0, 1); other weights N(0, 1/fan_in), so activations stay O(1) through the
    layers; biases `bias_std`·N(0, 1), non-zero and different per channel. Our own models get the product's
    `checkpoint.init_random_` / `components.init_vae_random_`; a parity test hands the reference's weights to
    ours through the official checkpoint layout."""
    gen = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=gen)
        leaf = name.rsplit(".", 1)[-1]
        if leaf == "gamma" or (leaf == "weight" and p.ndim == 1 and "norm" in name):
            p.copy_(1.0 + 0.3 * noise)
        elif "embed_tokens" in name:
            p.copy_(noise)
        elif p.ndim >= 2:
            p.copy_(noise / math.sqrt(p[0].numel()))
        else:
            p.copy_(bias_std * noise)
    return module


# ---- text pass two ways ------------------------------------------------------------------------------

GRID = (2, 4, 6)  # latent frames, patch rows, patch columns of the branches' video part


def text_kv_both_ways(one_at_a_time, layer_by_layer, prompts: list[torch.Tensor]):
    """(branches filled by `one_at_a_time.text_pass` per prompt, branches filled by one
    `layer_by_layer.text_passes` over all prompts); the two models may be one."""
    one = [one_at_a_time.setup_branch(len(ids), GRID, fps=24.0) for ids in prompts]
    for ids, branch in zip(prompts, one):
        one_at_a_time.text_pass(ids, branch)
    both = [layer_by_layer.setup_branch(len(ids), GRID, fps=24.0) for ids in prompts]
    layer_by_layer.text_passes(list(zip(prompts, both)))
    return one, both


def same_text_kv(a, b) -> bool:
    """Every K and V buffer of branches `a` equals (bit for bit) its counterpart in `b`."""
    return all(torch.equal(ka, kb) and torch.equal(va, vb)
               for x, y in zip(a, b, strict=True)
               for ka, kb, va, vb in zip(x.k_bufs, y.k_bufs, x.v_bufs, y.v_bufs, strict=True))


# ---- multi-process runs ------------------------------------------------------------------------------


def subprocess_env() -> dict:
    """The environment of a child run: this checkout first on the path, one thread per process."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1"}


class Run:
    """A finished multi-process run: the launcher's output and every rank's own log."""

    def __init__(self, proc: subprocess.CompletedProcess, log_dir: Path):
        self.returncode, self.stdout, self.stderr = proc.returncode, proc.stdout, proc.stderr
        self.log_dir = log_dir

    def rank_logs(self) -> str:
        """Every file torchrun wrote per rank (stdout.log, stderr.log, error.json), whole, in rank order."""
        parts = []
        for path in sorted(p for p in self.log_dir.rglob("*") if p.is_file()):
            parts.append(f"===== {path.relative_to(self.log_dir)} =====\n{path.read_text(errors='replace')}")
        return "\n".join(parts) or f"(no per-rank logs under {self.log_dir})"

    def report(self) -> str:
        """For an assertion message: the exit status, the launcher's whole output and every rank's whole log."""
        return (f"exit status {self.returncode}\n===== launcher stdout =====\n{self.stdout}\n"
                f"===== launcher stderr =====\n{self.stderr}\n{self.rank_logs()}")


def torchrun(nproc: int, args: list[str], cwd: Path, timeout: float = 240) -> Run:
    """`torchrun --standalone --nproc-per-node N -m cosmos3_compiled.cli ARGS` in `cwd`. Every rank's stdout and
    stderr also go whole to its own file (`--tee 3 --log-dir`), outside `cwd`, for `Run.report()`."""
    log_dir = Path(cwd).parent / f"{Path(cwd).name}_torchrun_logs"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "--tee", "3", "--log-dir", str(log_dir), "-m", "cosmos3_compiled.cli", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    return Run(proc, log_dir)


# ---- the video step on several CPU ranks (mp.spawn workers) ----------------------------------------------

STEP_LATENT_SHAPE = (2, 5, 6)  # 2 × 3 × 3 = 18 video tokens: Ulysses 2 gets 9 each
STEP_TEXT_LENS = (13, 8)  # cond, uncond


def spawn_ranks(worker, world: int, out_dir: Path) -> list[dict]:
    """Run `worker(rank, world, port, out_dir)` on `world` spawned CPU processes (a free local port for their
    rendezvous) and return each rank's report, the JSON it wrote to `out_dir/rank<r>.json`."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(world, port, str(out_dir)), nprocs=world)
    reports = [json.loads((Path(out_dir) / f"rank{rank}.json").read_text()) for rank in range(world)]
    print(reports)
    return reports


def step_worker_inputs(rank: int, world: int, port: int):
    """A spawned rank's torch.distributed environment (one CPU thread), and the inputs every rank shares:
    (prompt ids per branch, latents, the two timesteps)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(3)
    ids = [torch.randint(0, 1000, (n,), generator=gen) for n in STEP_TEXT_LENS]
    latents = torch.randn(1, 48, *STEP_LATENT_SHAPE, generator=torch.Generator().manual_seed(0))
    return ids, latents, (999.0, 512.0)


def setup_step_branches(model, ids):
    """One CFG branch per prompt at STEP_LATENT_SHAPE, its text pass run."""
    branches = []
    for text in ids:
        b = model.setup_branch(len(text), STEP_LATENT_SHAPE, fps=16.0)
        model.text_pass(text, b)
        branches.append(b)
    return branches


def step_reference(ids, latents, timesteps):
    """The single-process reference every spawned rank compares against: the seeded debug model and its
    velocity per timestep and branch. The model is returned too, for further reference steps on it."""
    from cosmos3_compiled.checkpoint import build_random
    from cosmos3_compiled.config import preset

    ref = build_random(preset("debug"), seed=5)
    ref_branches = setup_step_branches(ref, ids)
    want = {t: [ref(latents, torch.tensor(t), b) for b in ref_branches] for t in timesteps}
    return ref, want
