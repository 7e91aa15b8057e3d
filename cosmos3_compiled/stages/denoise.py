"""Stage: the denoising loop — video step per CFG branch, CFG combine in fp32, scheduler update in place (UniPC, or a
distilled checkpoint's FlowMatchEuler step, whose per-step noise sits in a static buffer)."""

from __future__ import annotations

import logging
import time

import torch

from cosmos3_compiled import fp8
from cosmos3_compiled.compile import CompilePlan, DecodeWarmup
from cosmos3_compiled.model import Branch, Cosmos3Transformer
from cosmos3_compiled.progress import progress
from cosmos3_compiled.scheduler import FlowMatchRun, UniPCRun

from .state import State, log_checksum

log = logging.getLogger(__name__)


class DenoiseStep:
    """One whole denoising step on static buffers: every branch's video step, the CFG combine and the
    scheduler update. Free of host syncs, so it can be compiled or captured in one CUDA graph.

    Inputs live in `timestep` (0-dim fp32) and the run's static buffers (`coeffs`; a FlowMatchRun's step index too),
    all filled before each call (`run.load_`); `latents` is updated in place.

    CFG parallelism: `cfg_gather` (distributed.Parallel.gather_cfg) turns this rank's one branch velocity
    into (cond, uncond) with one collective; every rank then does the same combine and update, so the
    latents stay identical on all ranks.

    Sound (`sound` [C_s, S], `sound_run`): the sound segment rides in the same video steps (the branches were set
    up with its tokens); its velocity gets the same CFG combine and its own UniPC update, inside this one step.
    Actions (`action` [A, action_dim], `action_run`, `action_channels` [1, action_dim]) likewise, after sound; with
    no noisy action token (forward dynamics) `action_run` is None and the actions are never stepped; after each
    update the padding channels are zeroed again.
    """

    def __init__(self, model: Cosmos3Transformer, run: UniPCRun | FlowMatchRun, branches: list[Branch],
                 latents: torch.Tensor, guidance_scale: float, cfg_gather=None, batch_cfg: bool = False,
                 sound: torch.Tensor | None = None, sound_run: UniPCRun | None = None,
                 action: torch.Tensor | None = None, action_run: UniPCRun | None = None,
                 action_channels: torch.Tensor | None = None):
        self.model, self.run, self.branches = model, run, branches
        self.latents = latents
        self.sound, self.sound_run = sound, sound_run
        self.action, self.action_run, self.action_channels = action, action_run, action_channels
        self.guidance = guidance_scale
        self.cfg_gather = cfg_gather
        self.timestep = torch.zeros((), device=latents.device, dtype=torch.float32)
        # both branches through the linears as one batch: set up the stacked RoPE tables once, here
        self.batched = model.setup_batched(branches) if batch_cfg and len(branches) > 1 else None

    def __call__(self) -> torch.Tensor:
        extra = dict(sound=self.sound, action=self.action)
        uncond = None
        if self.batched is not None:
            cond, uncond = self.model.forward_batched(self.latents, self.timestep, self.branches, *self.batched,
                                                      **extra)
        else:
            cond = self.model(self.latents, self.timestep, self.branches[0], **extra)
            if self.cfg_gather is not None:
                cond, uncond = self.gather(cond)
            elif len(self.branches) > 1:
                uncond = self.model(self.latents, self.timestep, self.branches[1], **extra)
        if self.sound is None and self.action is None:
            return self.run.step_(self.guide(cond, uncond), self.latents)
        # (vision, sound?, action?) velocities per branch: each segment combined alike, each updated by its own run
        i = 1
        if self.sound is not None:
            self.sound_run.step_(self.guide(cond[i], None if uncond is None else uncond[i]), self.sound)
            i += 1
        if self.action_run is not None:
            self.action_run.step_(self.guide(cond[i], None if uncond is None else uncond[i]), self.action)
            self.action.mul_(self.action_channels)
        return self.run.step_(self.guide(cond[0], None if uncond is None else uncond[0]), self.latents)

    def gather(self, cond):
        """CFG parallelism: this rank's velocity (a tensor, or one per token segment: vision, sound?, action?) →
        (cond, uncond) of the same structure, in one collective (the segments travel as one flat row)."""
        if isinstance(cond, torch.Tensor):
            return self.cfg_gather(cond)
        sizes = [c.numel() for c in cond]
        both = self.cfg_gather(torch.cat([c.reshape(1, -1) for c in cond], dim=1))  # ([1, N], [1, N])
        return tuple(tuple(x.view(c.shape) for x, c in zip(row.split(sizes, dim=1), cond)) for row in both)

    def guide(self, cond: torch.Tensor, uncond: torch.Tensor | None) -> torch.Tensor:
        """The CFG combine in fp32, `uncond + g·(cond − uncond)`; the cond velocity alone without CFG."""
        return cond if uncond is None else uncond + self.guidance * (cond - uncond)


class Denoise:
    """Reads latents, branches, run (and sound_latents, sound_run); writes latents and sound_latents (in place),
    metrics["steps"], ["shape_bucket"]; frees branches.

    `plan` gives the per-step runner (eager, steady-state guard or whole-step CUDA graph), admits the request's
    shape bucket and counts recompiles after warm-up. `cfg_gather`: this rank holds one CFG branch and gathers
    the other's velocity. `batch_cfg`: run both branches as one batch (only when both are on this rank, with
    whole-sequence tokens). `warmup_steps`: this job's steps before the steady state (compile.warmup_steps;
    resident models serve jobs with any value), per precision regime.

    `precision`: an FP8 checkpoint's per-step policy. The host sets each step's regime (`fp8.apply_step_regime`)
    before the step; each regime is its own runner (compiled graphs, CUDA graph) of the same step. Wherever the
    FP8 modes change, `refill_text(state)` (the TextPass stage's `fill`) recomputes the text K/V in place, as the
    reference's text path runs in the step's regime. Writes metrics["steps"]["regimes"] and ["text_pass_steps"].

    `decode_warmup` (compile.vae_warmup): a `compile.DecodeWarmup`, started once every regime is past its warm-up
    (the last CUDA-graph capture done) and joined after the last step; writes metrics["decode_warmup"].
    """

    def __init__(self, transformer: Cosmos3Transformer, plan: CompilePlan, warmup_steps: int = 1, cfg_gather=None,
                 batch_cfg: bool = False, precision: fp8.Fp8Policy | None = None, refill_text=None,
                 decode_warmup: DecodeWarmup | None = None):
        self.model, self.plan, self.warmup = transformer, plan, warmup_steps
        self.cfg_gather, self.batch_cfg = cfg_gather, batch_cfg
        self.precision, self.refill_text = precision, refill_text
        self.decode_warmup = decode_warmup

    @torch.no_grad()
    def __call__(self, state: State) -> State:
        plan, run = self.plan, state.run
        step = DenoiseStep(self.model, run, state.branches, state.latents, state.request.guidance_scale,
                           cfg_gather=self.cfg_gather if state.request.use_cfg else None, batch_cfg=self.batch_cfg,
                           sound=state.sound_latents, sound_run=state.sound_run, action=state.action_latents,
                           action_run=state.action_run,
                           action_channels=state.branches[0].action_channels if state.branches else None)
        timesteps = state.timesteps.to(torch.float32)
        n, policy = len(timesteps), self.precision
        regimes = [None] * n if policy is None else [policy.step_modes(i, n) for i in range(n)]
        # a sound segment makes other shapes of the same latent size: its length joins the bucket's key
        shape = state.request.latent_shape + ((state.request.sound_len,) if state.request.sound_len else ())
        # an action segment likewise; whether its actions are stepped (not in forward dynamics) changes the step
        action = state.request.action
        shape += (("action", action.chunk_size, action.actions_clean),) if action is not None else ()
        state.metrics["shape_bucket"] = plan.admit(shape, [b.text_len for b in state.branches],
                                                   tuple(dict.fromkeys(regimes)))
        runner = plan.step_runner(step, self.warmup, regimes)
        timer = StepTimer(state.latents.device)
        text_steps = []
        warm = self.decode_warmup
        try:
            for i in progress(range(n), desc="denoise", total=n):
                if policy is not None and fp8.apply_step_regime(self.model, policy, i, n):
                    self.refill_text(state)  # the text tower's FP8 linears changed regime: its K/V with them
                    text_steps.append(i)
                step.timestep.copy_(timesteps[i])  # host → device, no sync on the device side
                run.load_(i)
                with timer:
                    runner(i)
                if i == runner.warm_step:
                    plan.warmed_up()
                    if warm is not None:
                        warm.start(after_step=i)
        except Exception:
            if warm is not None:  # bounded (a few frames): let it finish before the models are dropped
                warm.join()
            raise
        state.metrics["steps"] = timer.summary()
        if warm is not None:
            state.metrics["decode_warmup"] = warm.join()
        if policy is not None:
            state.metrics["precision"] = policy.describe()
            state.metrics["steps"]["regimes"] = policy.schedule(n)
            state.metrics["steps"]["text_pass_steps"] = [0, *text_steps] if 0 not in text_steps else text_steps
            state.metrics["steps"]["steady_median_s_by_regime"] = regime_medians(state.metrics["steps"]["all_s"],
                                                                                 policy.schedule(n))
        recompiles = plan.steady_recompiles(elsewhere=warm.graphs if warm is not None else 0)
        if recompiles is not None:
            state.metrics["steps"]["recompiles_after_warmup"] = recompiles
        state.branches = []  # the K/V buffers are not needed past the last step: free them before decode
        log_checksum(log, "final latents", state.latents)
        return state


def regime_medians(secs: list[float], names: list[str]) -> dict:
    """Median step time per regime name, each regime's first step (its compile or capture) left out."""
    out = {}
    for name in dict.fromkeys(names):
        own = sorted(t for t, r in zip(secs, names) if r == name)
        first = secs[names.index(name)]
        own.remove(first)
        out[name] = own[len(own) // 2] if own else first
    return out


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
