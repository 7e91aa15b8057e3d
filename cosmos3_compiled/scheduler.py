"""FlowUniPC: diffusers 0.42.1 ``UniPCMultistepScheduler`` for flow prediction, organised for graph capture.

Supported: ``prediction_type="flow_prediction"``, ``use_flow_sigmas``, ``predict_x0`` (UniP predictor +
UniC corrector, ``bh1``/``bh2``), Karras or shifted flow sigmas, computed exactly as diffusers does.

:class:`FlowUniPCScheduler` holds only the validated config, so one instance can serve every request
and nothing a request does leaks into the next. :meth:`FlowUniPCScheduler.prepare` returns a
:class:`UniPCRun` per request: schedule, coefficient table and static device buffers.

Everything UniPC derives from the noise levels alone (sigma ratios, ``expm1`` of log-SNR steps, the
``rho`` weights, the order of each step, which steps correct) is folded on the CPU into one row of
scalars per step, so that a step (:func:`unipc_step_`) is a fixed linear combination with no branch
on data or step index and no host sync: it compiles with ``fullgraph=True`` and replays in a CUDA
graph. Warm-up and final lower-order steps just carry zero coefficients. The scalars use the same
fp32 tensor ops as diffusers and only their products are combined in float64 (one rounding to fp32),
which keeps every step within fp32 rounding of diffusers.

Published Cosmos3 checkpoints use Karras flow sigmas (:data:`COSMOS3_SCHEDULER_CONFIG`, values from
shared/COSMOS3.md §5); sglang shifts flow sigmas by 10. :func:`merge_schedule_overrides` picks either.

Known difference from diffusers, outside what the pipeline exercises: when ``timesteps[0]`` occurs
twice (shift-10 flow sigmas, more than 100 steps) diffusers starts at index 1 and later fails; we
always start at step 0. Unknown config keys are ignored, as diffusers ignores them.

The few-step distilled checkpoints (Cosmos3-Super-*-4Step) ship a ``FlowMatchEulerDiscreteScheduler`` with a
fixed schedule instead (:data:`COSMOS3_DISTILLED_SCHEDULER_CONFIG`): :class:`FlowMatchEulerScheduler` runs it as
diffusers' distilled modular blocks do, with every step's fresh noise drawn ahead of the loop into a static
buffer (:class:`FlowMatchRun`), so its step is captured the same way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .errors import RequestError

__all__ = [
    "COSMOS3_DISTILLED_SCHEDULER_CONFIG",
    "COSMOS3_SCHEDULER_CONFIG",
    "FlowMatchEulerConfig",
    "FlowMatchEulerScheduler",
    "FlowMatchRun",
    "FlowUniPCConfig",
    "FlowUniPCScheduler",
    "SchedulerConfigError",
    "UniPCRun",
    "build_coefficients",
    "build_fixed_schedule",
    "build_schedule",
    "coefficient_row_size",
    "draw_step_noise",
    "merge_schedule_overrides",
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

# A key missing from a config file means diffusers' default, exactly as when diffusers loads it.
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

_BH2_ALIASES = ("midpoint", "heun", "logrho")  # legacy names diffusers runs as bh2
_KARRAS_RHO = 7.0
_FIRST_SIGMA_EPS = 1e-6  # keeps log(1 - sigma) finite at the first level
# sampler.schedule=karras on a checkpoint without a Karras range gets the published Cosmos3 one.
_KARRAS_DEFAULT_RANGE = {"sigma_max": 200.0, "sigma_min": 0.147}


def merge_schedule_overrides(raw: Mapping, schedule: str, flow_shift: float) -> dict:
    """``raw`` with the ``sampler.schedule`` choice applied: ``checkpoint`` | ``karras`` | ``shift``."""
    raw = dict(raw)
    if schedule == "karras":
        raw["use_karras_sigmas"] = True
        for key, value in _KARRAS_DEFAULT_RANGE.items():
            raw.setdefault(key, value)
    elif schedule == "shift":
        raw.update(use_karras_sigmas=False, flow_shift=float(flow_shift))
    elif schedule != "checkpoint":
        raise SchedulerConfigError(f"sampler.schedule={schedule!r}; expected checkpoint, karras or shift.")
    return raw


def _fail(key: str, value, expected: str, who: str = "FlowUniPCScheduler"):
    raise SchedulerConfigError(
        f"scheduler config: {key}={value!r} is not supported by {who}; expected {expected}."
    )


def _as_float(key: str, value, *, positive: bool = True, who: str = "FlowUniPCScheduler") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        _fail(key, value, "a finite number", who)
    if positive and value <= 0:
        _fail(key, value, "a number > 0", who)
    return float(value)


def _as_bool(key: str, value, who: str = "FlowUniPCScheduler") -> bool:
    if not isinstance(value, bool):
        _fail(key, value, "true or false", who)
    return value


def _as_count(key: str, value, who: str = "FlowUniPCScheduler") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(key, value, "an integer >= 1", who)
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

    @classmethod
    def from_dict(cls, config: Mapping) -> FlowUniPCConfig:
        if not isinstance(config, Mapping):
            raise SchedulerConfigError(f"scheduler config must be a mapping, got {type(config).__name__}.")
        class_name = config.get("_class_name", "UniPCMultistepScheduler")
        if class_name != "UniPCMultistepScheduler":
            raise SchedulerConfigError(
                f"scheduler config: _class_name={class_name!r}; FlowUniPCScheduler only runs "
                "UniPCMultistepScheduler configs (FlowMatchEulerScheduler: the distilled checkpoints' "
                "FlowMatchEulerDiscreteScheduler)."
            )
        c = {**_DIFFUSERS_DEFAULTS, **{k: v for k, v in config.items() if k in _DIFFUSERS_DEFAULTS}}

        if c["prediction_type"] != "flow_prediction":
            _fail("prediction_type", c["prediction_type"], "'flow_prediction'")
        if not _as_bool("use_flow_sigmas", c["use_flow_sigmas"]):
            _fail("use_flow_sigmas", False, "true (flow-matching noise levels)")
        if not _as_bool("predict_x0", c["predict_x0"]):
            _fail("predict_x0", False, "true (diffusers has no flow_prediction solver without it)")
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

        solver_type = "bh2" if c["solver_type"] in _BH2_ALIASES else c["solver_type"]
        if solver_type not in ("bh1", "bh2"):
            _fail("solver_type", solver_type, "'bh1' or 'bh2'")
        order = _as_count("solver_order", c["solver_order"])
        steps = _as_count("num_train_timesteps", c["num_train_timesteps"])

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
        if not isinstance(disable, (list, tuple)) or any(isinstance(i, bool) or not isinstance(i, int) for i in disable):
            _fail("disable_corrector", disable, "a list of step indices")

        karras = _as_bool("use_karras_sigmas", c["use_karras_sigmas"])
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
                _fail("beta_schedule", c["beta_schedule"], "'linear' or 'scaled_linear', or set sigma_min and sigma_max")

        return cls(
            num_train_timesteps=steps,
            solver_order=order,
            solver_type=solver_type,
            lower_order_final=lower_order_final,
            disable_corrector=tuple(disable),
            use_karras_sigmas=karras,
            flow_shift=_as_float("flow_shift", c["flow_shift"]),
            shift_terminal=shift_terminal,
            final_sigmas_type=final,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            beta_schedule=c["beta_schedule"],
            beta_start=float(c["beta_start"]),
            beta_end=float(c["beta_end"]),
            trained_betas=None if trained is None else tuple(float(b) for b in trained),
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


def _karras_flow_sigmas(cfg: FlowUniPCConfig, n: int) -> np.ndarray:
    lo, hi = cfg.sigma_min, cfg.sigma_max
    if lo is None or hi is None:
        vp_lo, vp_hi = _vp_sigma_range(cfg)
        lo = vp_lo if lo is None else lo
        hi = vp_hi if hi is None else hi
    ramp = np.linspace(0.0, 1.0, n)
    lo_root, hi_root = lo ** (1.0 / _KARRAS_RHO), hi ** (1.0 / _KARRAS_RHO)
    karras = (hi_root + ramp * (lo_root - hi_root)) ** _KARRAS_RHO
    return karras / (karras + 1.0)  # VP sigma -> flow sigma; flow_shift does not apply, as in diffusers


def _shifted_flow_sigmas(cfg: FlowUniPCConfig, n: int) -> np.ndarray:
    base = np.linspace(1.0, 1.0 / cfg.num_train_timesteps, n + 1)[:-1]
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


def build_schedule(cfg: FlowUniPCConfig, num_inference_steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps [n] int64, sigmas [n+1] fp32)`` on the CPU, as diffusers' ``set_timesteps``."""
    n = num_inference_steps
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"num_inference_steps={n!r}; expected an integer >= 1.")
    levels = _karras_flow_sigmas(cfg, n) if cfg.use_karras_sigmas else _shifted_flow_sigmas(cfg, n)
    timesteps = torch.from_numpy(levels * cfg.num_train_timesteps).to(torch.int64)  # truncation
    last = levels[-1] if cfg.final_sigmas_type == "sigma_min" else 0.0
    return timesteps, torch.from_numpy(np.concatenate([levels, [last]]).astype(np.float32))


# --------------------------------------------------------------------------------------------------
# Coefficient table


def coefficient_row_size(solver_order: int) -> int:
    """Length of one coefficient row for a history of ``solver_order`` previous x0 predictions."""
    return 6 + 2 * solver_order


# Per-level scalars as 0-dim fp32 tensor ops, one level at a time like diffusers: a vectorised log
# over all levels may round differently.
def _alpha(sigmas: torch.Tensor, i: int) -> torch.Tensor:
    return 1 - sigmas[i]


def _lam(sigmas: torch.Tensor, i: int) -> torch.Tensor:
    return torch.log(1 - sigmas[i]) - torch.log(sigmas[i])  # log-SNR; +inf at sigma = 0


def _bh_terms(sigmas: torch.Tensor, target: int, source: int, older: list[int], solver_type: str):
    """Scalars of one UniPC B(h) update from level ``source`` to level ``target``.

    Returns ``h_phi_1``, ``B_h``, the ratios ``r_k`` of the older levels (without the trailing 1),
    and the rows ``R`` (powers of [r_1 .. r_{p-1}, 1]) and right-hand side ``b`` of the order
    conditions, each an fp32 tensor.
    """
    lam_s0 = _lam(sigmas, source)
    h = _lam(sigmas, target) - lam_s0
    ratios = [(_lam(sigmas, j) - lam_s0) / h for j in older]
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


def build_coefficients(cfg: FlowUniPCConfig, sigmas: torch.Tensor) -> torch.Tensor:
    """The ``[n, coefficient_row_size(solver_order)]`` fp32 table consumed by :func:`unipc_step_`."""
    n = sigmas.numel() - 1
    hist = cfg.solver_order
    cap = [min(hist, n - i) if cfg.lower_order_final else hist for i in range(n)]
    orders = [min(cap[i], i + 1) for i in range(n)]  # warm-up: one more previous x0 per step
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
            h_phi_1, b_h, ratios, rows, rhs = _bh_terms(sigmas, i, i - 1, older, cfg.solver_type)
            rhos = [0.5] if order == 1 else torch.linalg.solve(torch.stack(rows), torch.stack(rhs)).tolist()
            alpha_t = float(_alpha(sigmas, i))
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
        h_phi_1, b_h, ratios, rows, rhs = _bh_terms(sigmas, i + 1, i, older, cfg.solver_type)
        alpha_t = float(_alpha(sigmas, i + 1))
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
    (``prepare`` zero-fills them).
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


class EagerStep:
    """A run's eager convenience over its traceable `load_(i)` / `step_(velocity, sample)`: load the next step,
    step, advance `index`."""

    def step(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        self.load_(self.index)
        self.step_(velocity, sample)
        self.index += 1
        return sample


@dataclasses.dataclass(eq=False)
class UniPCRun(EagerStep):
    """One request's sampling state. For graph capture, call ``load_(i)`` outside the graph and
    capture ``step_``: its inputs are the static buffers ``coeffs``, ``history``, ``last_sample``."""

    timesteps: torch.Tensor  # [n] int64, CPU
    sigmas: torch.Tensor  # [n+1] fp32, CPU
    coefficients: torch.Tensor  # [n, row] fp32, CPU
    coeffs: torch.Tensor  # [row] fp32, device: the row of the current step
    history: torch.Tensor  # [K, *shape], device
    last_sample: torch.Tensor  # [*shape], device
    device_coefficients: torch.Tensor  # the table on the device, so load_ never waits on the host
    index: int = 0  # next step of the convenience ``step``

    def load_(self, i: int) -> torch.Tensor:
        """Copy row ``i`` into ``coeffs`` (device to device: no host sync)."""
        n = self.coefficients.shape[0]
        if not 0 <= i < n:
            raise IndexError(f"step index {i} is outside the {n}-step schedule.")
        return self.coeffs.copy_(self.device_coefficients[i])

    def step_(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Advance ``sample`` in place by the step whose row is loaded; traceable, no host sync."""
        return unipc_step_(self.coeffs, velocity, sample, self.history, self.last_sample)

    def sibling(self, sample_shape: Sequence[int]) -> UniPCRun:
        """The run of another sample on the same schedule (the sound segment's latents): its own zeroed history,
        the same coefficient buffers, so this run's ``load_`` loads both. As the reference's per-modality copy of
        the scheduler: same sigmas, separate history."""
        shape = tuple(sample_shape)
        return dataclasses.replace(
            self, history=self.history.new_zeros((self.history.shape[0], *shape)),
            last_sample=self.last_sample.new_zeros(shape), index=0,
        )



@dataclasses.dataclass(frozen=True)
class FlowUniPCScheduler:
    """Immutable: holds only the validated config; :meth:`prepare` makes each request's :class:`UniPCRun`."""

    config: FlowUniPCConfig
    fixed_steps = None  # the schedule is computed for any step count (FlowMatchEulerScheduler: a fixed one)

    @classmethod
    def from_config(cls, config: Mapping) -> FlowUniPCScheduler:
        return cls(FlowUniPCConfig.from_dict(config))

    def prepare(
        self,
        num_inference_steps: int,
        sample_shape: Sequence[int],
        device: torch.device | str,
        dtype: torch.dtype = torch.float32,
    ) -> UniPCRun:
        """Schedule and coefficient table (CPU) plus zero-filled static step buffers on ``device``."""
        timesteps, sigmas = build_schedule(self.config, num_inference_steps)
        coefficients = build_coefficients(self.config, sigmas)
        shape = tuple(sample_shape)
        return UniPCRun(
            timesteps=timesteps,
            sigmas=sigmas,
            coefficients=coefficients,
            coeffs=torch.zeros(coefficients.shape[1], device=device, dtype=torch.float32),
            history=torch.zeros((self.config.solver_order, *shape), device=device, dtype=dtype),
            last_sample=torch.zeros(shape, device=device, dtype=dtype),
            device_coefficients=coefficients.to(device),
        )


# --------------------------------------------------------------------------------------------------
# FlowMatchEuler on a fixed schedule: the few-step distilled checkpoints


# The scheduler_config.json of the distilled Cosmos3-Super-Text2Image-4Step / -Image2Video-4Step checkpoints, as
# shipped (issue 20), for tests and tools.
COSMOS3_DISTILLED_SCHEDULER_CONFIG: dict = {
    "_class_name": "FlowMatchEulerDiscreteScheduler",
    "fixed_step_requires_explicit_sigmas": True,
    "fixed_step_sampler_config": {"sample_type": "sde", "t_list": [1.0, 0.9375, 0.8333333333333334, 0.625]},
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "stochastic_sampling": True,
    "use_dynamic_shifting": False,
    "use_karras_sigmas": False,
    "time_shift_type": "exponential",
    "invert_sigmas": False,
    "shift_terminal": None,
}

# diffusers' FlowMatchEulerDiscreteScheduler defaults for the keys that change the schedule or the step.
_FLOW_MATCH_DEFAULTS: dict = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
    "invert_sigmas": False,
    "shift_terminal": None,
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "time_shift_type": "exponential",
    "stochastic_sampling": False,
}
_FM = "FlowMatchEulerScheduler"


def _sigma_list(where: str, value) -> tuple[float, ...]:
    """A fixed schedule: noise levels in (0, 1], strictly decreasing (a repeated first level would make diffusers
    start its loop at the second occurrence)."""
    numbers = (not isinstance(value, (str, bytes)) and isinstance(value, Sequence) and len(value) > 0
               and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))
    levels = tuple(float(v) for v in value) if numbers else ()
    if not numbers or any(not 0.0 < v <= 1.0 for v in levels) or any(a <= b for a, b in zip(levels, levels[1:])):
        raise SchedulerConfigError(f"{where}={value!r}; expected strictly decreasing noise levels in (0, 1].")
    return levels


@dataclasses.dataclass(frozen=True)
class FlowMatchEulerConfig:
    """The validated FlowMatchEulerDiscreteScheduler settings of a fixed-schedule (distilled) checkpoint.

    ``t_list``: the checkpoint's noise levels, before ``shift`` (and ``shift_terminal``) apply, exactly as
    diffusers' ``set_timesteps(sigmas=...)`` takes them. Build it with :meth:`from_dict`.
    """

    num_train_timesteps: int
    shift: float
    shift_terminal: float | None
    stochastic: bool  # stochastic_sampling: re-noise to the next level after every step (SDE); else an Euler step
    t_list: tuple[float, ...]

    @classmethod
    def from_dict(cls, config: Mapping, distilled_sigmas: Sequence[float] | None = None) -> FlowMatchEulerConfig:
        """`distilled_sigmas`: the checkpoint's modular_model_index.json value of that name, where diffusers'
        distilled modular pipeline reads the schedule from; the shipped scheduler_config.json carries the same
        list as ``fixed_step_sampler_config.t_list``. Either one gives the schedule; both must agree."""
        if not isinstance(config, Mapping):
            raise SchedulerConfigError(f"scheduler config must be a mapping, got {type(config).__name__}.")
        class_name = config.get("_class_name")
        if class_name != "FlowMatchEulerDiscreteScheduler":
            raise SchedulerConfigError(
                f"scheduler config: _class_name={class_name!r}; {_FM} only runs FlowMatchEulerDiscreteScheduler "
                "configs."
            )
        c = {**_FLOW_MATCH_DEFAULTS, **{k: v for k, v in config.items() if k in _FLOW_MATCH_DEFAULTS}}
        if _as_bool("use_dynamic_shifting", c["use_dynamic_shifting"], _FM):
            _fail("use_dynamic_shifting", True, "false (a fixed schedule gets no resolution-dependent mu)", _FM)
        for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas"):
            if _as_bool(key, c[key], _FM):
                _fail(key, True, "false (the fixed schedule's levels as given)", _FM)
        if c["time_shift_type"] not in ("exponential", "linear"):
            _fail("time_shift_type", c["time_shift_type"], "'exponential' or 'linear'", _FM)
        shift_terminal = c["shift_terminal"]
        if shift_terminal is not None:
            shift_terminal = _as_float("shift_terminal", shift_terminal, positive=False, who=_FM)
            if not 0.0 <= shift_terminal < 1.0:
                _fail("shift_terminal", shift_terminal, "null or a number in [0, 1)", _FM)

        fixed = config.get("fixed_step_sampler_config")
        if fixed is not None and not isinstance(fixed, Mapping):
            _fail("fixed_step_sampler_config", fixed, "a mapping with t_list", _FM)
        t_list = (fixed or {}).get("t_list")
        if t_list is not None:
            t_list = _sigma_list("scheduler config: fixed_step_sampler_config.t_list", t_list)
        if distilled_sigmas is not None:
            distilled = _sigma_list("modular_model_index.json: distilled_sigmas", distilled_sigmas)
            if t_list is not None and distilled != t_list:
                raise SchedulerConfigError(
                    f"the checkpoint gives two fixed schedules: modular_model_index.json distilled_sigmas "
                    f"{list(distilled)} and scheduler_config.json fixed_step_sampler_config.t_list {list(t_list)}."
                )
            t_list = distilled
        if t_list is None:
            raise SchedulerConfigError(
                "scheduler config: FlowMatchEulerDiscreteScheduler without a fixed schedule "
                "(fixed_step_sampler_config.t_list, or distilled_sigmas in modular_model_index.json); only the "
                "distilled checkpoints' fixed-step sampling is supported."
            )
        return cls(
            num_train_timesteps=_as_count("num_train_timesteps", c["num_train_timesteps"], _FM),
            shift=_as_float("shift", c["shift"], who=_FM),
            shift_terminal=shift_terminal,
            stochastic=_as_bool("stochastic_sampling", c["stochastic_sampling"], _FM),
            t_list=t_list,
        )


def build_fixed_schedule(cfg: FlowMatchEulerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """``(timesteps [n] fp32, sigmas [n+1] fp32)`` on the CPU, as diffusers' ``set_timesteps(sigmas=t_list)``:
    the levels shifted in float32 (then stretched to ``shift_terminal``), timesteps = sigma · num_train_timesteps
    unrounded, a final level 0."""
    levels = np.array(cfg.t_list).astype(np.float32)
    levels = cfg.shift * levels / (1 + (cfg.shift - 1) * levels)
    if cfg.shift_terminal:
        complement = 1 - levels
        levels = 1 - complement / (complement[-1] / (1 - cfg.shift_terminal))
    sigmas = torch.from_numpy(levels).to(torch.float32)
    timesteps = sigmas * cfg.num_train_timesteps
    return timesteps, torch.cat([sigmas, torch.zeros(1)])


def draw_step_noise(generator: torch.Generator, shape: Sequence[int], steps: int) -> torch.Tensor:
    """``[steps, *shape]`` fp32 on the CPU: step i's fresh noise, one ``randn(shape)`` per step from `generator` in
    step order, as diffusers' stochastic step draws them (a single draw of steps × numel values is not the same:
    the CPU normal sampler treats each draw's last partial block of 16 on its own)."""
    out = torch.empty((steps, *shape), dtype=torch.float32)
    for i in range(steps):
        out[i] = torch.randn(tuple(shape), generator=generator, dtype=torch.float32)
    return out


@dataclasses.dataclass(eq=False)
class FlowMatchRun(EagerStep):
    """One request's fixed-step sampling state. As with :class:`UniPCRun`: ``load_(i)`` outside the graph, ``step_``
    captured; ``step_`` reads only static buffers (``coeffs``, ``step_index``, ``noise``, ``clean``)."""

    timesteps: torch.Tensor  # [n] fp32, CPU: sigma · num_train_timesteps, unrounded
    sigmas: torch.Tensor  # [n+1] fp32, CPU, ending at 0
    coefficients: torch.Tensor  # [n, 4] fp32, CPU: sigma, 1 - next sigma, next sigma, next sigma - sigma
    coeffs: torch.Tensor  # [4] fp32, device: the row of the current step
    step_index: torch.Tensor  # [1] int64, device: the current step (selects its noise)
    noise: torch.Tensor | None  # [n, *shape] fp32, device: every step's noise, drawn ahead (None: not stochastic)
    clean: torch.Tensor  # [1, C, k, h, w] fp32, device: the clean frames' latents, put back after every step
    clean_frames: tuple[int, ...]  # their latent-frame indices (k of them)
    device_coefficients: torch.Tensor
    device_steps: torch.Tensor  # arange(n) on the device, so load_ never waits on the host
    index: int = 0  # next step of the convenience ``step``

    def load_(self, i: int) -> None:
        """Point the static buffers at step ``i`` (device to device: no host sync)."""
        n = self.coefficients.shape[0]
        if not 0 <= i < n:
            raise IndexError(f"step index {i} is outside the {n}-step schedule.")
        self.coeffs.copy_(self.device_coefficients[i])
        self.step_index.copy_(self.device_steps[i : i + 1])

    def step_(self, velocity: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """Advance ``sample`` in place by the loaded step; traceable, no host sync.

        Stochastic: ``x0 = x - sigma·v``, then ``x = (1 - sigma')·x0 + sigma'·noise_i``; otherwise the Euler step
        ``x = x + (sigma' - sigma)·v``. Then the clean frames get their latents back (the reference re-anchors
        them after every step: the re-noising touches every position)."""
        c = self.coeffs
        if self.noise is None:
            out = sample + c[3] * velocity
        else:
            x0 = sample - c[0] * velocity
            out = c[1] * x0 + c[2] * self.noise.index_select(0, self.step_index)[0]
        sample.copy_(out)
        for j, frame in enumerate(self.clean_frames):
            sample[:, :, frame].copy_(self.clean[:, :, j])
        return sample



@dataclasses.dataclass(frozen=True)
class FlowMatchEulerScheduler:
    """Immutable, like :class:`FlowUniPCScheduler`: :meth:`prepare` makes each request's :class:`FlowMatchRun`.
    Only fixed schedules: the number of steps is the schedule's length (``fixed_steps``)."""

    config: FlowMatchEulerConfig

    @classmethod
    def from_config(cls, config: Mapping, distilled_sigmas: Sequence[float] | None = None) -> FlowMatchEulerScheduler:
        return cls(FlowMatchEulerConfig.from_dict(config, distilled_sigmas))

    @property
    def fixed_steps(self) -> int:
        return len(self.config.t_list)

    def prepare(
        self,
        num_inference_steps: int,
        latents: torch.Tensor,
        clean_frames: Sequence[int] = (),
        generator: torch.Generator | None = None,
    ) -> FlowMatchRun:
        """The schedule (CPU) and the static buffers on the latents' device.

        `latents`: the initial latents ([1, C, T, h, w] fp32), whose `clean_frames` hold the clean latents to keep.
        `generator`: the request's CPU generator where the reference's stands when its loop starts (after the
        initial noise); a stochastic schedule draws every step's noise from it now, in the reference's order."""
        n = self.fixed_steps
        if num_inference_steps != n:
            raise ValueError(f"num_inference_steps={num_inference_steps!r}; this fixed schedule has {n} steps.")
        timesteps, sigmas = build_fixed_schedule(self.config)
        current, following = sigmas[:-1], sigmas[1:]
        coefficients = torch.stack([current, 1.0 - following, following, following - current], dim=1)
        device = latents.device
        noise = None
        if self.config.stochastic:
            if generator is None:
                raise ValueError("a stochastic fixed schedule needs the request's generator for its per-step noise.")
            noise = draw_step_noise(generator, latents.shape, n).to(device)
        frames = tuple(clean_frames)
        return FlowMatchRun(
            timesteps=timesteps,
            sigmas=sigmas,
            coefficients=coefficients,
            coeffs=torch.zeros(coefficients.shape[1], device=device, dtype=torch.float32),
            step_index=torch.zeros(1, device=device, dtype=torch.int64),
            noise=noise,
            clean=latents[:, :, list(frames)].clone(),
            clean_frames=frames,
            device_coefficients=coefficients.to(device),
            device_steps=torch.arange(n, device=device, dtype=torch.int64),
        )
