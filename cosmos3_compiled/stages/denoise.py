"""Stage: the denoising loop — video step per CFG branch, CFG combine in fp32, UniPC update in place."""

from __future__ import annotations

import logging
import time

import torch

from cosmos3_compiled.compile import compile_counters, make_step_runner
from cosmos3_compiled.progress import progress
from cosmos3_compiled.scheduler import unipc_step_

from .state import Components, State, log_checksum

log = logging.getLogger(__name__)


class DenoiseStep:
    """One whole denoising step on static buffers: every branch's video step, the CFG combine and the
    scheduler update. Free of host syncs, so it can be compiled or captured in one CUDA graph.

    Inputs live in `timestep` (0-dim fp32) and the scheduler's `coeff_buffer`, both filled before each
    call; `latents` is updated in place.

    CFG parallelism: `cfg_gather` (distributed.Parallel.gather_cfg) turns this rank's one branch velocity
    into (cond, uncond) with one collective; every rank then does the same combine and update, so the
    latents stay identical on all ranks.
    """

    def __init__(self, model, scheduler, branches, latents: torch.Tensor, guidance_scale: float, cfg_gather=None,
                 batch_cfg: bool = False):
        self.model, self.scheduler, self.branches = model, scheduler, branches
        self.latents = latents
        self.guidance = guidance_scale
        self.cfg_gather = cfg_gather
        self.timestep = torch.zeros((), device=latents.device, dtype=torch.float32)
        # both branches through the linears as one batch: set up the stacked RoPE tables once, here
        self.batched = model.setup_batched(branches) if batch_cfg and len(branches) > 1 else None

    def __call__(self) -> torch.Tensor:
        if self.batched is not None:
            cond, uncond = self.model.forward_batched(self.latents, self.timestep, self.branches, *self.batched)
            velocity = uncond + self.guidance * (cond - uncond)
            s = self.scheduler
            return unipc_step_(s.coeff_buffer, velocity, self.latents, s.history, s.last_sample)
        velocity = self.model(self.latents, self.timestep, self.branches[0])
        if self.cfg_gather is not None:
            cond, uncond = self.cfg_gather(velocity)
            velocity = uncond + self.guidance * (cond - uncond)
        elif len(self.branches) > 1:
            uncond = self.model(self.latents, self.timestep, self.branches[1])
            velocity = uncond + self.guidance * (velocity - uncond)
        s = self.scheduler
        return unipc_step_(s.coeff_buffer, velocity, self.latents, s.history, s.last_sample)


class Denoise:
    """Reads latents, branches, timesteps; writes latents (in place), metrics["steps"]; frees branches."""

    def __init__(self, components: Components, mode: str = "eager", warmup_steps: int = 1, batch_cfg: bool = False):
        self.model = components.transformer
        self.scheduler = components.scheduler
        self.mode, self.warmup, self.batch_cfg = mode, warmup_steps, batch_cfg
        self.parallel = components.parallel
        self.served = components.served

    @torch.no_grad()
    def __call__(self, state: State) -> State:
        par = self.parallel
        split_cfg = par is not None and par.cfg_size == 2 and state.request.use_cfg
        # batched CFG needs both branches on this rank and whole-sequence tokens (no Ulysses shards)
        batch_cfg = self.batch_cfg and not split_cfg and (par is None or par.ulysses is None)
        step = DenoiseStep(self.model, self.scheduler, state.branches, state.latents, state.request.guidance_scale,
                           cfg_gather=par.gather_cfg if split_cfg else None, batch_cfg=batch_cfg)
        bucket = {"latent": list(state.request.latent_shape), "text": [b.text_len for b in state.branches]}
        state.metrics["shape_bucket"] = bucket
        known = self.served is not None and set((tuple(bucket["latent"]), n) for n in bucket["text"]) <= self.served.text
        if self.served is not None and self.served.add(bucket["latent"], bucket["text"]):
            log.info("compile=%s: this process served more request shapes than compile.recompile_limit allows: "
                     "compiled graphs reset", self.mode)
        if self.mode != "eager":
            if known:
                log.info("compile=%s: shape bucket %s already compiled in this process", self.mode, bucket)
            else:
                log.info("compile=%s: first step compiles shape bucket %s (one graph per branch text length)",
                         self.mode, bucket)
        s = self.scheduler
        run = make_step_runner(self.mode, step, [state.latents, s.history, s.last_sample], self.warmup)
        timesteps = state.timesteps.to(torch.float32)
        timer = StepTimer(state.latents.device)
        warm = max(1, self.warmup)
        graphs_after_warmup = None
        for i in progress(range(len(timesteps)), desc="denoise", total=len(timesteps)):
            step.timestep.copy_(timesteps[i])  # host → device, no sync on the device side
            s.load_coefficients_(i)
            with timer:
                run()
            if i + 1 == warm:
                graphs_after_warmup = compile_counters()["unique_graphs"]
        state.metrics["steps"] = timer.summary()
        if graphs_after_warmup is not None:  # graphs compiled in steady state = recompiles
            state.metrics["steps"]["recompiles_after_warmup"] = compile_counters()["unique_graphs"] - graphs_after_warmup
        state.branches = []  # the K/V buffers are not needed past the last step: free them before decode
        log_checksum(log, "final latents", state.latents)
        return state


class StepTimer:
    """Per-step wall time: CUDA events on the GPU (read once at the end), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def __enter__(self):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks.append([ev, None])
        else:
            self.marks.append([time.perf_counter(), None])

    def __exit__(self, *exc):
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            self.marks[-1][1] = ev
        else:
            self.marks[-1][1] = time.perf_counter()

    def summary(self) -> dict:
        if self.cuda:
            torch.cuda.synchronize()
            secs = [a.elapsed_time(b) / 1e3 for a, b in self.marks]
        else:
            secs = [b - a for a, b in self.marks]
        steady = sorted(secs[1:]) or secs
        return {"first_s": secs[0], "steady_median_s": steady[len(steady) // 2], "all_s": secs}
