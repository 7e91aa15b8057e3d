"""FlowUniPC: UniPC multistep sampling for flow-prediction models, driven by ``scheduler_config.json``.

Numerically this follows diffusers 0.42.1 ``UniPCMultistepScheduler`` with ``prediction_type =
"flow_prediction"``, ``use_flow_sigmas = True`` and ``predict_x0 = True`` (UniP predictor + UniC
corrector, B(h) variants ``bh1``/``bh2``), but it is organised for graph capture:

* Everything UniPC computes from the noise levels alone (ratios of sigmas, ``expm1`` of log-SNR
  steps, the ``rho`` weights of the predictor and corrector, which order each step uses, which steps
  correct) is folded on the CPU, at ``set_timesteps`` time, into one row of scalar coefficients per
  step (layout in :func:`unipc_step_`). diffusers evaluates the same scalars with fp32 tensor ops;
  we evaluate them with the same fp32 ops and only combine the products in float64 before rounding
  each coefficient to fp32 once.
* A step is then a fixed linear combination of the current sample, the current prediction of x0,
  the x0 predictions of the previous ``solver_order`` steps and the sample the previous predictor
  started from. Steps of lower order (warm-up, the final step) simply carry zero coefficients, so
  :func:`unipc_step_` has no branch on data or step index and no host sync: it can run inside
  ``torch.compile(fullgraph=True)`` and a CUDA graph. The history lives in static buffers made by
  :meth:`FlowUniPCScheduler.setup_buffers` and is updated in place.

Noise schedules (``set_timesteps``), matching diffusers exactly:

* Karras flow sigmas (``use_karras_sigmas: true``): ``s_i = (hi^(1/7) + i/(n-1) * (lo^(1/7) -
  hi^(1/7)))^7`` with ``lo = sigma_min``, ``hi = sigma_max`` (float64), mapped to flow sigmas
  ``s / (1 + s)``. ``flow_shift`` is ignored here, as in diffusers.
* Shifted flow sigmas (``use_karras_sigmas: false``): ``s = linspace(1, 1/N, n+1)[:-1]`` (or the
  caller's explicit sigmas), ``s' = shift*s / (1 + (shift-1)*s)``, optionally stretched to
  ``shift_terminal``; a first sigma within 1e-6 of 1 is lowered by 1e-6 so that log(1 - sigma)
  stays finite.
* ``timesteps = trunc(sigma * num_train_timesteps)`` as int64 (n values); ``sigmas`` gets a final
  entry of 0 (``final_sigmas_type: zero``) or a repeat of the last sigma (``sigma_min``), as fp32.

Published Cosmos3 checkpoints (``scheduler/scheduler_config.json``) use UniPCMultistepScheduler with
``prediction_type: flow_prediction``, ``use_flow_sigmas: true``, ``use_karras_sigmas: true``,
``sigma_max: 200``, ``sigma_min: 0.147``, ``solver_order: 2``, ``solver_type: bh2``,
``predict_x0: true``, ``lower_order_final: true``, ``disable_corrector: []``,
``final_sigmas_type: zero``, ``num_train_timesteps: 1000`` (see :data:`COSMOS3_SCHEDULER_CONFIG`;
the values are those recorded in shared/COSMOS3.md §5 and not re-checked against the hub here).
For 35 steps this gives timesteps 995 ... 128. sglang instead runs flow sigmas shifted by 10
(``use_karras_sigmas: false, flow_shift: 10``); both are available through the config.

Known differences from diffusers, all outside what the Cosmos3 pipeline exercises:

* diffusers locates the first step by looking ``timesteps[0]`` up in the schedule and, when that
  value occurs twice (shift-10 flow sigmas with more than 100 steps), starts at index 1 and later
  fails with an index error. We always start at step 0.
* Explicit ``sigmas`` are read as float64.
* Keys this scheduler does not know are ignored, as diffusers ignores them (legacy files carry keys
  such as ``clip_sample`` or ``skip_prk_steps``); they are listed in ``FlowUniPCConfig.ignored_keys``.
"""

from __future__ import annotations

from .errors import RequestError

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "COSMOS3_SCHEDULER_CONFIG",
    "FlowUniPCConfig",
    "FlowUniPCScheduler",
    "SchedulerConfigError",
    "coefficient_row_size",
    "unipc_step_",
]


SchedulerConfigError = RequestError  # the one user-error type (errors.py)


# The published Cosmos3 scheduler settings (shared/COSMOS3.md §5), for tests and tools.
COSMOS3_SCHEDULER_CONFIG: dict = {
    "_class_name": "UniPCMultistepScheduler",
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "use_karras_sigmas": True,
    "sigma_max": 200.0,
    "sigma_min": 0.147,
    "solver_order": 2,
    "solver_type": "bh2",
    "predict_x0": True,
    "lower_order_final": True,
    "disable_corrector": [],
    "final_sigmas_type": "zero",
    "timestep_spacing": "linspace",
}

# diffusers' defaults for every UniPCMultistepScheduler argument: a key missing from a config file
# means this value, exactly as when diffusers builds the scheduler from that file.
_DIFFUSERS_DEFAULTS: dict = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "trained_betas": None,
    "solver_order": 2,
    "prediction_type": "epsilon",
    "thresholding": False,
    "dynamic_thresholding_ratio": 0.995,
    "sample_max_value": 1.0,
    "predict_x0": True,
    "solver_type": "bh2",
    "lower_order_final": True,
    "disable_corrector": [],
    "solver_p": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_flow_sigmas": False,
    "flow_shift": 1.0,
    "timestep_spacing": "linspace",
    "steps_offset": 0,
    "final_sigmas_type": "zero",
    "rescale_betas_zero_snr": False,
    "use_dynamic_shifting": False,
    "time_shift_type": "exponential",
    "sigma_min": None,
    "sigma_max": None,
    "shift_terminal": None,
}

# diffusers accepts these legacy solver names and runs them as bh2.
_BH2_ALIASES = ("midpoint", "heun", "logrho")
_KARRAS_RHO = 7.0
_FIRST_SIGMA_EPS = 1e-6


def _fail(key: str, value, expected: str) -> None:
    raise SchedulerConfigError(
        f"scheduler config: {key}={value!r} is not supported by FlowUniPCScheduler; expected {expected}."
    )


def _as_float(key: str, value, *, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(key, value, "a finite number")
    if positive and value <= 0:
        _fail(key, value, "a number > 0")
    return float(value)


def _as_bool(key: str, value) -> bool:
    if not isinstance(value, bool):
        _fail(key, value, "true or false")
    return value


@dataclasses.dataclass(frozen=True)
class FlowUniPCConfig:
    """The validated subset of a UniPCMultistepScheduler config that affects flow-prediction sampling.

    Build it with :meth:`from_dict`; direct construction skips validation.
    """

    num_train_timesteps: int
    solver_order: int
    solver_type: str  # "bh1" | "bh2"
    lower_order_final: bool
    disable_corrector: tuple[int, ...]
    use_karras_sigmas: bool
    flow_shift: float
    shift_terminal: float | None
    final_sigmas_type: str  # "zero" | "sigma_min"
    sigma_min: float | None
    sigma_max: float | None
    # Only read to derive a Karras range when sigma_min / sigma_max are absent.
    beta_schedule: str
    beta_start: float
    beta_end: float
    trained_betas: tuple[float, ...] | None
    ignored_keys: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, config: Mapping) -> FlowUniPCConfig:
        if not isinstance(config, Mapping):
            raise SchedulerConfigError(f"scheduler config must be a mapping, got {type(config).__name__}.")
        class_name = config.get("_class_name", "UniPCMultistepScheduler")
        if class_name != "UniPCMultistepScheduler":
            raise SchedulerConfigError(
                f"scheduler config: _class_name={class_name!r}; FlowUniPCScheduler only runs "
                "UniPCMultistepScheduler configs."
            )
        c = dict(_DIFFUSERS_DEFAULTS)
        ignored = []
        for key, value in config.items():
            if key.startswith("_"):
                continue
            if key in c:
                c[key] = value
            else:
                ignored.append(key)

        if c["prediction_type"] != "flow_prediction":
            _fail("prediction_type", c["prediction_type"], "'flow_prediction'")
        if _as_bool("use_flow_sigmas", c["use_flow_sigmas"]) is not True:
            _fail("use_flow_sigmas", c["use_flow_sigmas"], "true (flow-matching noise levels)")
        if _as_bool("predict_x0", c["predict_x0"]) is not True:
            _fail("predict_x0", c["predict_x0"], "true (diffusers has no flow_prediction solver without it)")
        if _as_bool("thresholding", c["thresholding"]):
            _fail("thresholding", True, "false (dynamic thresholding needs a data-dependent quantile)")
        if c["solver_p"] is not None:
            _fail("solver_p", c["solver_p"], "null (no external predictor)")
        for key in ("use_exponential_sigmas", "use_beta_sigmas"):
            if _as_bool(key, c[key]):
                _fail(key, True, "false (Karras or shifted flow sigmas only)")
        if _as_bool("use_dynamic_shifting", c["use_dynamic_shifting"]):
            _fail("use_dynamic_shifting", True, "false (resolution-dependent mu is not supported; set flow_shift)")
        if c["timestep_spacing"] not in ("linspace", "leading", "trailing"):
            _fail("timestep_spacing", c["timestep_spacing"], "'linspace', 'leading' or 'trailing'")

        solver_type = c["solver_type"]
        if solver_type in _BH2_ALIASES:
            solver_type = "bh2"
        if solver_type not in ("bh1", "bh2"):
            _fail("solver_type", solver_type, "'bh1' or 'bh2'")

        order = c["solver_order"]
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            _fail("solver_order", order, "an integer >= 1")
        steps = c["num_train_timesteps"]
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            _fail("num_train_timesteps", steps, "an integer >= 1")

        final = c["final_sigmas_type"]
        if final not in ("zero", "sigma_min"):
            _fail("final_sigmas_type", final, "'zero' or 'sigma_min'")
        lower_order_final = _as_bool("lower_order_final", c["lower_order_final"])
        if not lower_order_final and order > 1 and final == "zero":
            raise SchedulerConfigError(
                "scheduler config: lower_order_final=false with final_sigmas_type='zero' and "
                f"solver_order={order} makes the last UniP step divide by an infinite log-SNR step "
                "(diffusers returns inf there); set lower_order_final=true or final_sigmas_type='sigma_min'."
            )

        disable = c["disable_corrector"]
        if not isinstance(disable, (list, tuple)) or any(
            isinstance(i, bool) or not isinstance(i, int) for i in disable
        ):
            _fail("disable_corrector", disable, "a list of step indices")

        karras = _as_bool("use_karras_sigmas", c["use_karras_sigmas"])
        flow_shift = _as_float("flow_shift", c["flow_shift"])
        shift_terminal = c["shift_terminal"]
        if shift_terminal is not None:
            shift_terminal = _as_float("shift_terminal", shift_terminal, positive=False)
            if not 0.0 <= shift_terminal < 1.0:
                _fail("shift_terminal", shift_terminal, "null or a number in [0, 1)")
        sigma_min = None if c["sigma_min"] is None else _as_float("sigma_min", c["sigma_min"])
        sigma_max = None if c["sigma_max"] is None else _as_float("sigma_max", c["sigma_max"])
        if sigma_min is not None and sigma_max is not None and not sigma_min < sigma_max:
            _fail("sigma_min", sigma_min, f"a value below sigma_max={sigma_max}")

        trained = c["trained_betas"]
        if karras and (sigma_min is None or sigma_max is None) and trained is None:
            # The missing end of the Karras range comes from the VP beta schedule, as in diffusers.
            if _as_bool("rescale_betas_zero_snr", c["rescale_betas_zero_snr"]):
                _fail("rescale_betas_zero_snr", True, "false, or set sigma_min and sigma_max")
            if c["beta_schedule"] not in ("linear", "scaled_linear"):
                _fail(
                    "beta_schedule", c["beta_schedule"], "'linear' or 'scaled_linear', or set sigma_min and sigma_max"
                )

        return cls(
            num_train_timesteps=steps,
            solver_order=order,
            solver_type=solver_type,
            lower_order_final=lower_order_final,
            disable_corrector=tuple(disable),
            use_karras_sigmas=karras,
            flow_shift=flow_shift,
            shift_terminal=shift_terminal,
            final_sigmas_type=final,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            beta_schedule=c["beta_schedule"],
            beta_start=float(c["beta_start"]),
            beta_end=float(c["beta_end"]),
            trained_betas=None if trained is None else tuple(float(b) for b in trained),
            ignored_keys=tuple(ignored),
        )


# --------------------------------------------------------------------------------------------------
# Noise schedule


def _vp_sigma_range(cfg: FlowUniPCConfig) -> tuple[float, float]:
    """Smallest and largest VP sigma of the training beta schedule (fp32, as diffusers keeps them)."""
    n = cfg.num_train_timesteps
    if cfg.trained_betas is not None:
        betas = torch.tensor(cfg.trained_betas, dtype=torch.float32)
    elif cfg.beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, n, dtype=torch.float32)
    else:  # scaled_linear
        betas = torch.linspace(cfg.beta_start**0.5, cfg.beta_end**0.5, n, dtype=torch.float32) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    vp = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
    return float(vp[0]), float(vp[-1])


def _karras_flow_sigmas(cfg: FlowUniPCConfig, n: int, explicit: np.ndarray | None) -> np.ndarray:
    lo, hi = cfg.sigma_min, cfg.sigma_max
    if lo is None or hi is None:
        # diffusers reads the missing ends from the reversed input sigmas: with explicit (descending)
        # sigmas that is their first value for sigma_min and their last for sigma_max.
        if explicit is not None:
            first, last = float(explicit[0]), float(explicit[-1])
        else:
            first, last = _vp_sigma_range(cfg)
        lo = first if lo is None else lo
        hi = last if hi is None else hi
    ramp = np.linspace(0.0, 1.0, n)
    lo_root, hi_root = lo ** (1.0 / _KARRAS_RHO), hi ** (1.0 / _KARRAS_RHO)
    karras = (hi_root + ramp * (lo_root - hi_root)) ** _KARRAS_RHO
    return karras / (karras + 1.0)


def _shifted_flow_sigmas(cfg: FlowUniPCConfig, n: int, explicit: np.ndarray | None) -> np.ndarray:
    base = explicit if explicit is not None else np.linspace(1.0, 1.0 / cfg.num_train_timesteps, n + 1)[:-1]
    shift = cfg.flow_shift
    sigmas = shift * base / (1.0 + (shift - 1.0) * base)
    if cfg.shift_terminal:
        # Affine stretch of (1 - sigma) so that the last level lands exactly on shift_terminal.
        complement = 1.0 - sigmas
        stretch = complement[-1] / (1.0 - cfg.shift_terminal)
        sigmas = 1.0 - complement / stretch
    if abs(sigmas[0] - 1.0) < _FIRST_SIGMA_EPS:
        sigmas[0] -= _FIRST_SIGMA_EPS
    return sigmas


def build_schedule(
    cfg: FlowUniPCConfig, num_inference_steps: int | None, sigmas: Sequence[float] | np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps [n] int64, sigmas [n+1] fp32)`` on the CPU, as diffusers' ``set_timesteps``."""
    explicit = None
    if sigmas is not None:
        explicit = np.array(sigmas, dtype=np.float64).reshape(-1)
        if explicit.size == 0:
            raise ValueError("set_timesteps: explicit sigmas are empty.")
        num_inference_steps = explicit.size
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"set_timesteps: num_inference_steps={num_inference_steps!r}; expected an integer >= 1.")
    if cfg.use_karras_sigmas:
        levels = _karras_flow_sigmas(cfg, num_inference_steps, explicit)
    else:
        levels = _shifted_flow_sigmas(cfg, num_inference_steps, explicit)
    timesteps = torch.from_numpy(levels * cfg.num_train_timesteps).to(torch.int64)  # truncation
    last = levels[-1] if cfg.final_sigmas_type == "sigma_min" else 0.0
    table = np.concatenate([levels, [last]]).astype(np.float32)
    return timesteps, torch.from_numpy(table)


# --------------------------------------------------------------------------------------------------
# Coefficient table


def coefficient_row_size(solver_order: int) -> int:
    """Length of one coefficient row for a history of ``solver_order`` previous x0 predictions."""
    return 6 + 2 * solver_order


class _LevelScalars:
    """Per-level fp32 scalars evaluated with the same tensor ops diffusers uses."""

    def __init__(self, sigmas: torch.Tensor):
        self.sigmas = sigmas  # fp32 [n+1]

    def alpha(self, i: int) -> torch.Tensor:
        return 1 - self.sigmas[i]

    def lam(self, i: int) -> torch.Tensor:
        # log-SNR of a flow level: log(alpha) - log(sigma); +inf at sigma = 0.
        return torch.log(1 - self.sigmas[i]) - torch.log(self.sigmas[i])


def _bh_terms(
    levels: _LevelScalars, target: int, source: int, older: list[int], solver_type: str
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Scalars of one UniPC B(h) update from level ``source`` to level ``target``.

    Returns ``h_phi_1``, ``B_h``, the ratios ``r_k`` of the older levels (without the trailing 1),
    and the rows ``R`` (powers of [r_1 .. r_{p-1}, 1]) and right-hand side ``b`` of the order
    conditions, each an fp32 tensor.
    """
    lam_s0 = levels.lam(source)
    h = levels.lam(target) - lam_s0
    ratios = [(levels.lam(j) - lam_s0) / h for j in older]
    nodes = torch.stack(ratios + [torch.ones((), dtype=torch.float32)])
    hh = -h  # data (x0) prediction
    h_phi_1 = torch.expm1(hh)
    b_h = hh if solver_type == "bh1" else torch.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    rows, rhs = [], []
    for k in range(1, len(older) + 2):
        rows.append(torch.pow(nodes, k - 1))
        rhs.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return h_phi_1, b_h, ratios, rows, rhs


def _step_orders(cfg: FlowUniPCConfig, n: int) -> list[int]:
    orders = []
    for i in range(n):
        cap = min(cfg.solver_order, n - i) if cfg.lower_order_final else cfg.solver_order
        orders.append(min(cap, i + 1))  # warm-up: one more previous x0 per step
    return orders


def build_coefficients(cfg: FlowUniPCConfig, sigmas: torch.Tensor) -> torch.Tensor:
    """The ``[n, coefficient_row_size(solver_order)]`` fp32 table consumed by :func:`unipc_step_`."""
    n = sigmas.numel() - 1
    hist = cfg.solver_order
    levels = _LevelScalars(sigmas)
    orders = _step_orders(cfg, n)
    table = np.zeros((n, coefficient_row_size(hist)), dtype=np.float64)
    p_base = 4 + hist  # start of the predictor block
    for i in range(n):
        row = table[i]
        row[0] = float(sigmas[i])

        # Corrector (UniC): re-derive the sample at level i from the previous step's start
        # ``last_sample`` (level i-1) using the x0 just predicted at level i.
        if i > 0 and (i - 1) not in cfg.disable_corrector:
            order = orders[i - 1]
            older = [i - 1 - k for k in range(1, order)]  # levels of history slots 1 .. order-1
            h_phi_1, b_h, ratios, rows, rhs = _bh_terms(levels, i, i - 1, older, cfg.solver_type)
            if order == 1:
                rhos = [0.5]
            else:
                rhos = torch.linalg.solve(torch.stack(rows), torch.stack(rhs)).tolist()
            alpha_t = float(levels.alpha(i))
            scale = alpha_t * float(b_h)
            row[1] = float(sigmas[i]) / float(sigmas[i - 1])
            row[3] = -scale * rhos[-1]
            m0 = -alpha_t * float(h_phi_1) + scale * rhos[-1]
            for k, r in enumerate(ratios, start=1):
                w = scale * rhos[k - 1] / float(r)
                row[4 + k] -= w
                m0 += w
            row[4] = m0
        else:
            row[2] = 1.0

        # Predictor (UniP): from the (corrected) sample at level i to level i+1.
        order = orders[i]
        older = [i - k for k in range(1, order)]  # x0 of level i-k sits in history slot k-1
        h_phi_1, b_h, ratios, rows, rhs = _bh_terms(levels, i + 1, i, older, cfg.solver_type)
        alpha_t = float(levels.alpha(i + 1))
        row[p_base] = float(sigmas[i + 1]) / float(sigmas[i])
        m0 = -alpha_t * float(h_phi_1)
        if order > 1:
            if order == 2:
                rhos = [0.5]
            else:
                rhos = torch.linalg.solve(torch.stack(rows)[:-1, :-1], torch.stack(rhs)[:-1]).tolist()
            scale = alpha_t * float(b_h)
            for k, r in enumerate(ratios, start=1):
                w = scale * rhos[k - 1] / float(r)
                row[p_base + 1 + k] -= w
                m0 += w
        row[p_base + 1] = m0
    return torch.from_numpy(table.astype(np.float32))


# --------------------------------------------------------------------------------------------------
# The step


def unipc_step_(
    coeffs: torch.Tensor,  # [6 + 2K] fp32
    model_output: torch.Tensor,  # velocity, same shape as sample
    sample: torch.Tensor,  # x at the current level; overwritten with x at the next level
    history: torch.Tensor,  # [K, *sample.shape] previous x0 predictions, slot 0 = newest
    last_sample: torch.Tensor,  # sample the previous predictor started from
) -> torch.Tensor:
    """One UniPC step as a fixed linear combination; updates ``sample``, ``history``, ``last_sample``.

    Coefficient row (``K = solver_order``, ``P = 4 + K``)::

        [0]              sigma of this level          x0   = sample - c[0] * model_output
        [1]              on last_sample            \
        [2]              on sample                  |  xc  = corrected sample (UniC); a step
        [3]              on x0                      |        without corrector has c[2] = 1
        [4 .. 4+K)       on history[0 .. K)        /         and zeros elsewhere
        [P]              on xc                     \
        [P+1]            on x0                      |  out = sample at the next level (UniP)
        [P+2 .. P+2+K)   on history[0 .. K)        /

    then ``last_sample = xc``, history shifts by one slot with ``history[0] = x0``, and
    ``sample = out`` is returned. Lower-order steps carry zeros, so buffers must hold finite values
    (``setup_buffers`` zero-fills them). No branch depends on data or on the step index.
    """
    k = history.shape[0]
    p = 4 + k
    x0 = sample - coeffs[0] * model_output
    corrected = coeffs[1] * last_sample + coeffs[2] * sample + coeffs[3] * x0
    for j in range(k):
        corrected = corrected + coeffs[4 + j] * history[j]
    out = coeffs[p] * corrected + coeffs[p + 1] * x0
    for j in range(k):
        out = out + coeffs[p + 2 + j] * history[j]
    last_sample.copy_(corrected)
    for j in range(k - 1, 0, -1):
        history[j].copy_(history[j - 1])
    history[0].copy_(x0)
    sample.copy_(out)
    return sample


class FlowUniPCScheduler:
    """Stateful driver around :func:`unipc_step_` with diffusers' ``set_timesteps`` semantics.

    Usage::

        sched = FlowUniPCScheduler.from_folder(checkpoint / "scheduler")
        sched.set_timesteps(35)
        sched.setup_buffers(latents.shape, latents.device)
        for t in sched.timesteps:
            v = model(latents, t)
            sched.step(v, latents)  # latents updated in place

    For graph capture, call ``load_coefficients_(i)`` outside the graph and capture
    ``unipc_step_(sched.coeff_buffer, v, latents, sched.history, sched.last_sample)``.
    """

    order = 1  # model evaluations per step, as diffusers reports for UniPC

    def __init__(self, config: FlowUniPCConfig):
        self.config = config
        self.timesteps: torch.Tensor | None = None  # [n] int64, CPU
        self.sigmas: torch.Tensor | None = None  # [n+1] fp32, CPU
        self.coefficients: torch.Tensor | None = None  # [n, 6+2K] fp32, CPU
        self.step_index = 0
        self.coeff_buffer: torch.Tensor | None = None
        self.history: torch.Tensor | None = None
        self.last_sample: torch.Tensor | None = None
        self._device_coefficients: torch.Tensor | None = None

    @classmethod
    def from_config(cls, config: Mapping) -> FlowUniPCScheduler:
        return cls(FlowUniPCConfig.from_dict(config))

    @classmethod
    def from_folder(cls, path: str | Path) -> FlowUniPCScheduler:
        """Read ``scheduler_config.json`` from ``path``, ``path/scheduler`` or the file ``path`` itself."""
        path = Path(path)
        if path.is_file():
            candidates = [path]
        else:
            candidates = [path / "scheduler_config.json", path / "scheduler" / "scheduler_config.json"]
        for candidate in candidates:
            if candidate.is_file():
                with open(candidate, encoding="utf-8") as f:
                    return cls.from_config(json.load(f))
        raise FileNotFoundError(
            f"no scheduler config found; looked for {', '.join(str(c) for c in candidates)}."
        )

    @property
    def num_inference_steps(self) -> int | None:
        return None if self.timesteps is None else self.timesteps.numel()

    def set_timesteps(
        self, num_inference_steps: int | None = None, sigmas: Sequence[float] | np.ndarray | None = None
    ) -> None:
        """Compute timesteps, sigmas and the coefficient table; restart at step 0.

        ``sigmas`` (descending flow levels, no trailing zero) replaces the default levels as in
        diffusers; with Karras sigmas and both sigma_min / sigma_max set it only fixes the count.
        """
        self.timesteps, self.sigmas = build_schedule(self.config, num_inference_steps, sigmas)
        self.coefficients = build_coefficients(self.config, self.sigmas)
        self._device_coefficients = None
        self.reset()

    def setup_buffers(
        self, shape: Sequence[int], device: torch.device | str, dtype: torch.dtype = torch.float32
    ) -> None:
        """Allocate the static history, last-sample and coefficient buffers (zero-filled)."""
        shape = tuple(shape)
        self.history = torch.zeros((self.config.solver_order, *shape), device=device, dtype=dtype)
        self.last_sample = torch.zeros(shape, device=device, dtype=dtype)
        row = coefficient_row_size(self.config.solver_order)
        self.coeff_buffer = torch.zeros(row, device=device, dtype=torch.float32)
        self._device_coefficients = None

    def reset(self) -> None:
        """Restart at step 0 with empty history (buffers keep their storage)."""
        self.step_index = 0
        if self.history is not None:
            self.history.zero_()
            self.last_sample.zero_()

    def load_coefficients_(self, step_index: int) -> torch.Tensor:
        """Copy row ``step_index`` into ``coeff_buffer`` (device to device: no host sync)."""
        if self.coefficients is None:
            raise RuntimeError("call set_timesteps(n) before stepping.")
        if self.coeff_buffer is None:
            raise RuntimeError("call setup_buffers(shape, device) before stepping.")
        n = self.coefficients.shape[0]
        if not 0 <= step_index < n:
            raise IndexError(f"step index {step_index} is outside the {n}-step schedule; call set_timesteps again.")
        if self._device_coefficients is None:
            self._device_coefficients = self.coefficients.to(self.coeff_buffer.device)
        self.coeff_buffer.copy_(self._device_coefficients[step_index])
        return self.coeff_buffer

    def step(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Advance one step: ``sample`` is overwritten with the next-level sample and returned."""
        if self.history is None:
            self.setup_buffers(sample.shape, sample.device, sample.dtype)
        elif self.last_sample.shape != sample.shape or self.last_sample.device != sample.device:
            raise ValueError(
                f"sample {tuple(sample.shape)} on {sample.device} does not match the buffers "
                f"{tuple(self.last_sample.shape)} on {self.last_sample.device}; call setup_buffers again."
            )
        self.load_coefficients_(self.step_index)
        unipc_step_(self.coeff_buffer, model_output, sample, self.history, self.last_sample)
        self.step_index += 1
        return sample
