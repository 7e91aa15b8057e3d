"""FlowUniPC against diffusers' UniPCMultistepScheduler, plus the compile / graph contract."""

import dataclasses
import warnings

import pytest
import torch

from cosmos3_compiled.compile import capture_cuda_graph
from cosmos3_compiled.scheduler import (
    COSMOS3_SCHEDULER_CONFIG,
    FlowUniPCScheduler,
    SchedulerConfigError,
    coefficient_row_size,
    merge_schedule_overrides,
    unipc_step_,
)

# sglang's schedule: the published config with flow sigmas shifted by 10.
SHIFT10_CONFIG = merge_schedule_overrides(COSMOS3_SCHEDULER_CONFIG, "shift", 10.0)

# Other option values the scheduler supports; each must also match diffusers.
VARIANT_CONFIGS = {
    "order3_shift5": {**SHIFT10_CONFIG, "flow_shift": 5.0, "solver_order": 3},
    "bh1_partial_corrector": {**SHIFT10_CONFIG, "flow_shift": 3.0, "solver_type": "bh1", "disable_corrector": [1, 3]},
    "sigma_min_final": {
        **SHIFT10_CONFIG,
        "final_sigmas_type": "sigma_min",
        "lower_order_final": False,
        "shift_terminal": 0.1,
    },
    "karras_range_from_betas": {
        k: v for k, v in COSMOS3_SCHEDULER_CONFIG.items() if k not in ("sigma_min", "sigma_max")
    },
    "legacy_keys_and_alias": {**COSMOS3_SCHEDULER_CONFIG, "solver_type": "midpoint", "clip_sample": False},
}

SHAPE = (1, 4, 3, 5, 6)  # [B, C, F, H, W]


def _reference(config, n):
    diffusers = pytest.importorskip("diffusers")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.UniPCMultistepScheduler.from_config(dict(config))
        ref.set_timesteps(n)
    return ref


def _rollout_pair(config, n, seed=0):
    """Run both schedulers on the same fixed random "model"; return per-step relative errors."""
    ref = _reference(config, n)
    ours = FlowUniPCScheduler.from_config(config).prepare(n, SHAPE, "cpu")
    g = torch.Generator().manual_seed(seed)
    x_ref = torch.randn(SHAPE, generator=g)
    x_ours = x_ref.clone()
    errors = []
    for t in ref.timesteps:
        noise = torch.randn(SHAPE, generator=g)
        # The "model" depends on its input so that a wrong step would also corrupt later steps.
        x_ref = ref.step(noise + 0.5 * x_ref, t, x_ref, return_dict=False)[0]
        ours.step(noise + 0.5 * x_ours, x_ours)
        errors.append(((x_ref - x_ours).abs().max() / x_ref.abs().max()).item())
    return ref, ours, errors


@pytest.mark.parametrize("n", [1, 2, 3, 5, 35])
@pytest.mark.parametrize("config", [COSMOS3_SCHEDULER_CONFIG, SHIFT10_CONFIG], ids=["karras_cosmos3", "shift10"])
def test_matches_diffusers(config, n):
    ref, ours, errors = _rollout_pair(config, n)
    assert ours.timesteps.dtype == torch.int64 and ours.timesteps.device.type == "cpu"
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert ours.sigmas.dtype == torch.float32
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=0, atol=1e-7)
    assert len(errors) == n
    assert max(errors) <= 1e-5, errors


@pytest.mark.parametrize("name", sorted(VARIANT_CONFIGS))
def test_option_variants_match_diffusers(name):
    ref, ours, errors = _rollout_pair(VARIANT_CONFIGS[name], 7, seed=1)
    assert torch.equal(ours.timesteps, ref.timesteps)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, rtol=0, atol=1e-7)
    assert max(errors) <= 1e-5, errors


def test_cosmos3_schedule_endpoints():
    run = FlowUniPCScheduler.from_config(COSMOS3_SCHEDULER_CONFIG).prepare(35, SHAPE, "cpu")
    assert run.timesteps[0].item() == 995 and run.timesteps[-1].item() == 128
    assert run.sigmas[-1].item() == 0.0
    assert run.coefficients.shape == (35, coefficient_row_size(2))
    assert run.coeffs.shape == (coefficient_row_size(2),) and run.history.shape == (2, *SHAPE)
    assert not run.history.any() and not run.last_sample.any()


def test_last_step_lands_on_x0():
    # With a zero final sigma the first-order final step returns the x0 prediction itself.
    last = FlowUniPCScheduler.from_config(SHIFT10_CONFIG).prepare(4, SHAPE, "cpu").coefficients[-1]
    predictor = last[4 + 2 :]
    assert predictor[0].item() == 0.0 and predictor[1].item() == 1.0
    assert torch.count_nonzero(predictor[2:]) == 0


def test_runs_are_independent():
    # The scheduler is shared by every request: a run must not leak into the next, even interleaved.
    sched = FlowUniPCScheduler.from_config(COSMOS3_SCHEDULER_CONFIG)
    runs = [sched.prepare(5, SHAPE, "cpu") for _ in range(2)]
    g = torch.Generator().manual_seed(3)
    start = torch.randn(SHAPE, generator=g)
    velocities = [torch.randn(SHAPE, generator=g) for _ in range(5)]
    xs = [start.clone(), start.clone()]
    for v in velocities:
        for run, x in zip(runs, xs):
            run.step(v, x)
    assert torch.equal(xs[0], xs[1]) and not torch.equal(xs[0], start)
    with pytest.raises(IndexError, match="outside the 5-step schedule"):
        runs[0].step(torch.zeros(SHAPE), torch.zeros(SHAPE))
    with pytest.raises(dataclasses.FrozenInstanceError):
        sched.config = None


def _eager_and_compiled(backend, steps=4):
    torch.compiler.reset()  # a cached graph of another backend would count as a recompile
    sched = FlowUniPCScheduler.from_config(COSMOS3_SCHEDULER_CONFIG)
    g = torch.Generator().manual_seed(4)
    start = torch.randn(SHAPE, generator=g)
    velocities = [torch.randn(SHAPE, generator=g) for _ in range(steps)]

    def run(step_fn):
        r = sched.prepare(steps, SHAPE, "cpu")
        x = start.clone()
        for i, v in enumerate(velocities):
            r.load_(i)
            step_fn(r.coeffs, v, x, r.history, r.last_sample)
        return x

    eager = run(unipc_step_)
    compiled_fn = torch.compile(unipc_step_, fullgraph=True, backend=backend)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = run(compiled_fn)
        with torch.compiler.set_stance("fail_on_recompile"):
            again = run(compiled_fn)
    return eager, compiled, again


def test_step_compiles_fullgraph_without_recompiles():
    # aot_eager: the full Dynamo + AOTAutograd trace (graph breaks, guards, input mutation) without
    # paying a C++ compile in the default suite; the inductor variant below is marked slow.
    eager, compiled, again = _eager_and_compiled("aot_eager")
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
    torch.testing.assert_close(again, eager, rtol=0, atol=0)


@pytest.mark.slow
def test_step_compiles_with_inductor():
    eager, compiled, again = _eager_and_compiled("inductor")
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(again, compiled, rtol=0, atol=0)


@pytest.mark.gpu
def test_step_replays_in_cuda_graph():
    # One captured graph of the compiled step, replayed for every step with only the coefficient
    # row changing, must follow the eager CPU run (itself checked against diffusers above).
    device = torch.device("cuda")
    n = 8
    g = torch.Generator().manual_seed(5)
    start = torch.randn(SHAPE, generator=g)
    velocities = [torch.randn(SHAPE, generator=g) for _ in range(n)]

    sched = FlowUniPCScheduler.from_config(COSMOS3_SCHEDULER_CONFIG)
    cpu = sched.prepare(n, SHAPE, "cpu")
    expected = start.clone()
    for v_i in velocities:
        cpu.step(v_i, expected)

    run = sched.prepare(n, SHAPE, device)
    x = start.to(device)
    v = torch.zeros(SHAPE, device=device)
    step_fn = torch.compile(run.step_, fullgraph=True)
    run.load_(0)
    # the product's capture: one real call on a side stream (compiles outside the capture), then the capture
    graph, _ = capture_cuda_graph(lambda: step_fn(v, x))
    run.history.zero_()  # the warm-up call wrote into the history, the last sample and x
    run.last_sample.zero_()
    x.copy_(start)
    for i in range(n):
        run.load_(i)
        v.copy_(velocities[i])
        graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(x.cpu(), expected, rtol=1e-5, atol=1e-5)
    assert not torch.equal(x.cpu(), start)


BAD_CONFIGS = [
    ({"prediction_type": "epsilon"}, "prediction_type"),
    ({"prediction_type": "v_prediction"}, "prediction_type"),
    ({"use_flow_sigmas": False}, "use_flow_sigmas"),
    ({"solver_type": "bh3"}, "solver_type"),
    ({"solver_order": 0}, "solver_order"),
    ({"predict_x0": False}, "predict_x0"),
    ({"thresholding": True}, "thresholding"),
    ({"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    ({"use_beta_sigmas": True}, "use_beta_sigmas"),
    ({"use_dynamic_shifting": True}, "use_dynamic_shifting"),
    ({"final_sigmas_type": "one"}, "final_sigmas_type"),
    ({"timestep_spacing": "cosine"}, "timestep_spacing"),
    ({"flow_shift": -1.0}, "flow_shift"),
    ({"sigma_min": 300.0}, "sigma_min"),
    ({"disable_corrector": "none"}, "disable_corrector"),
    ({"lower_order_final": False}, "lower_order_final"),
    ({"_class_name": "FlowMatchEulerDiscreteScheduler"}, "_class_name"),
]


@pytest.mark.parametrize("override,key", BAD_CONFIGS, ids=[k for _, k in BAD_CONFIGS])
def test_bad_config_values_raise(override, key):
    with pytest.raises(SchedulerConfigError, match=key):
        FlowUniPCScheduler.from_config({**COSMOS3_SCHEDULER_CONFIG, **override})


def test_missing_prediction_type_means_diffusers_default():
    config = {k: v for k, v in COSMOS3_SCHEDULER_CONFIG.items() if k != "prediction_type"}
    with pytest.raises(SchedulerConfigError, match="'epsilon'"):
        FlowUniPCScheduler.from_config(config)


def test_bad_step_count_raises():
    sched = FlowUniPCScheduler.from_config(COSMOS3_SCHEDULER_CONFIG)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sched.prepare(0, SHAPE, "cpu")


@pytest.mark.parametrize("schedule", ["checkpoint", "karras", "shift"])
def test_schedule_overrides(schedule):
    # What each sampler.schedule choice means, checked against diffusers' own reading of the result.
    cfg = FlowUniPCScheduler.from_config(COSMOS3_SCHEDULER_CONFIG).config
    no_range = {k: v for k, v in COSMOS3_SCHEDULER_CONFIG.items() if k not in ("sigma_min", "sigma_max")}
    merged = merge_schedule_overrides(no_range, schedule, 7.0)
    assert merged is not no_range and "sigma_max" not in no_range
    ref = _reference(merged, 5).config
    ours = FlowUniPCScheduler.from_config(merged).config
    assert ours.use_karras_sigmas == ref.use_karras_sigmas == (schedule != "shift")
    assert ours.flow_shift == ref.flow_shift == (7.0 if schedule == "shift" else 1.0)
    if schedule == "karras":
        assert (ours.sigma_min, ours.sigma_max) == (cfg.sigma_min, cfg.sigma_max)
    else:
        assert ours.sigma_min is ref.sigma_min is None
    kept = merge_schedule_overrides({**COSMOS3_SCHEDULER_CONFIG, "sigma_max": 80.0}, schedule, 7.0)
    assert kept["sigma_max"] == 80.0
    with pytest.raises(SchedulerConfigError, match="sampler.schedule"):
        merge_schedule_overrides(COSMOS3_SCHEDULER_CONFIG, "cosine", 7.0)
