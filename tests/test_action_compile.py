"""Compile contract of the action step (`action.mode=policy|forward_dynamics`): the whole denoising step with the
action segment traces as one graph (fullgraph, what the whole-step CUDA graph captures), runs later steps and a
change of embodiment domain (data: a 0-dim long tensor read by an embedding lookup) with no recompile, and equals
eager; on a GPU it captures into a CUDA graph whose replay equals an eager step."""

from __future__ import annotations

import pytest
import torch

from cosmos3_compiled.checkpoint import build_random
from cosmos3_compiled.compile import capture_cuda_graph, compile_counters
from cosmos3_compiled.config import preset, replace
from cosmos3_compiled.scheduler import COSMOS3_SCHEDULER_CONFIG, FlowUniPCScheduler
from cosmos3_compiled.stages.denoise import DenoiseStep

ACTION_DIM, CHUNK, WIDTH = 8, 3, 5
LATENT_SHAPE = (2, 3, 4)
STEPS = 4
SOUND_DIM, SOUND_LEN = 8, 3


def _cfg():
    return replace(preset("debug"), action_gen=True, action_dim=ACTION_DIM, num_embodiment_domains=4, sound_gen=True,
                   sound_dim=SOUND_DIM)


def _inputs(device="cpu"):
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 48, *LATENT_SHAPE, generator=gen).to(device)
    action = torch.randn(CHUNK, ACTION_DIM, generator=gen).to(device)
    sound = torch.randn(SOUND_DIM, SOUND_LEN, generator=gen).to(device)
    return latents, action, sound


def _step(model, latents, action, clean: bool, domain: int, device="cpu", sound=None):
    """Both CFG branches (different text lengths) with an action segment; a policy step (noisy actions, own UniPC run)
    or a forward-dynamics one (clean actions, never stepped); `sound`: a sound segment before the actions."""
    branches = []
    for n in (11, 7):
        b = model.setup_branch(n, LATENT_SHAPE, fps=16.0, action_len=CHUNK, action_clean=clean, action_domain=domain,
                               action_width=WIDTH, sound_len=0 if sound is None else SOUND_LEN)
        model.text_pass((torch.arange(n) % 1000).to(device), b)
        branches.append(b)
    scheduler = FlowUniPCScheduler.from_config(COSMOS3_SCHEDULER_CONFIG)
    unipc = scheduler.prepare(STEPS, latents.shape, device)
    action.mul_(branches[0].action_channels)
    step = DenoiseStep(model, unipc, branches, latents, 4.0, action=action,
                       action_run=None if clean else unipc.sibling(action.shape),
                       action_channels=branches[0].action_channels, sound=sound,
                       sound_run=None if sound is None else unipc.sibling(sound.shape))
    return step, unipc, branches


def _rollout(clean: bool, compiled: bool, domains=(1, 2), with_sound: bool = False):
    """STEPS steps per domain; between domains only the branches' 0-dim domain tensors change (fill_)."""
    model = build_random(_cfg(), seed=4)
    latents0, action0, sound0 = _inputs()
    latents, action, sound = latents0.clone(), action0.clone(), sound0.clone()
    step, unipc, branches = _step(model, latents, action, clean, domains[0], sound=sound if with_sound else None)
    call = torch.compile(step, fullgraph=True, dynamic=False, backend="aot_eager") if compiled else step
    outs = []
    with torch.no_grad():
        for k, d in enumerate(domains):
            for b in branches:
                b.action_domain.fill_(d)
            latents.copy_(latents0)
            sound.copy_(sound0)
            action.copy_(action0 * branches[0].action_channels)
            for i, t in enumerate(unipc.timesteps.tolist()):
                step.timestep.fill_(float(t))
                unipc.load_(i)
                if compiled and (k > 0 or i > 0):
                    with torch.compiler.set_stance("fail_on_recompile"):
                        call()
                else:
                    call()
            outs.append((latents.clone(), action.clone(), sound.clone()))
    return outs


@pytest.mark.parametrize("mode,with_sound", [("policy", False), ("forward_dynamics", False), ("policy", True)])
def test_action_step_fullgraph_no_recompiles_across_steps_and_domains(mode, with_sound):
    clean = mode == "forward_dynamics"
    before = compile_counters()
    compiled = _rollout(clean, compiled=True, with_sound=with_sound)
    after = compile_counters()
    assert after["graph_breaks"] == before["graph_breaks"]
    assert after["unique_graphs"] - before["unique_graphs"] == 1  # one graph for all steps and both domains
    eager = _rollout(clean, compiled=False, with_sound=with_sound)
    for (lc, ac, sc), (le, ae, se) in zip(compiled, eager):
        assert (lc - le).abs().max() <= 1e-4 and (ac - ae).abs().max() <= 1e-4 and (sc - se).abs().max() <= 1e-4
    if with_sound:  # the sound segment was stepped (by its own run) alongside the actions
        assert (compiled[0][2] - _inputs()[2]).abs().max() > 1e-3
    # the domain really is read by the compiled step (a domain baked into the graph would give domain 1's result)
    assert (compiled[0][0] - compiled[1][0]).abs().max() > 1e-3
    if not clean:
        assert (compiled[0][1] - compiled[1][1]).abs().max() > 1e-3
        assert compiled[0][1][:, WIDTH:].abs().max() == 0  # padding channels stay zero


@pytest.mark.gpu
def test_action_step_captures_in_cuda_graph_and_replay_equals_eager():
    dev = "cuda"
    model = build_random(_cfg(), seed=4).to(dev)
    latents0, action0, _ = _inputs(dev)

    def fresh():
        latents, action = latents0.clone(), action0.clone()
        step, unipc, branches = _step(model, latents, action, clean=False, domain=2, device=dev)
        return step, unipc, latents, action

    def at(step, unipc, i):  # what the denoise loop sets before step i
        step.timestep.fill_(float(unipc.timesteps[i]))
        unipc.load_(i)

    with torch.no_grad():
        # as CudaGraphRunner: step 0 runs for real inside capture_cuda_graph, step 1 is the first replay
        step, unipc, latents, action = fresh()
        at(step, unipc, 0)
        graph, _ = capture_cuda_graph(step)
        at(step, unipc, 1)
        graph.replay()
        torch.cuda.synchronize()
        eager, e_unipc, e_latents, e_action = fresh()
        for i in range(2):
            at(eager, e_unipc, i)
            eager()
    assert (latents - e_latents).abs().max() <= 1e-4 and (action - e_action).abs().max() <= 1e-4
    assert (action - action0).abs().max() > 1e-3
