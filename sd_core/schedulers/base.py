"""What every sampler shares: the scheduler config, the noise schedule (betas, timestep spacing, sigmas),
the caller-owned sampling state, and the one conversion of a model output into (x0, eps)."""
import dataclasses
import math
from typing import NamedTuple

import numpy as np
import torch

from sd_core.config import ModelConfig

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


@dataclasses.dataclass
class SchedulerConfig(ModelConfig):
    """The union of the diffusers scheduler fields sd_core honours (a real scheduler_config.json loads)."""
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: list | None = None
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    clip_sample: bool = True  # DDPM/DDIM: clamp the x0 estimate to [-clip_sample_range, clip_sample_range]
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True  # DDIM, PNDM: alpha_bar before t=0 is 1 (else alpha_bar_0)
    skip_prk_steps: bool = False  # PNDM: start with pseudo linear multistep (PLMS) instead of 3 Runge-Kutta steps
    variance_type: str | None = "fixed_small"  # DDPM: fixed_small, fixed_large, learned_range
    use_karras_sigmas: bool = False  # Euler, DPM-Solver++
    sigma_min: float | None = None
    sigma_max: float | None = None
    final_sigmas_type: str = "zero"
    interpolation_type: str = "linear"
    timestep_type: str = "discrete"
    solver_order: int = 2  # DPM-Solver++
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    lambda_min_clipped: float = -math.inf
    thresholding: bool = False
    rescale_betas_zero_snr: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    use_lu_lambdas: bool = False
    use_flow_sigmas: bool = False
    use_dynamic_shifting: bool = False
    predict_x0: bool = True  # UniPC: the data-prediction (x0) form
    disable_corrector: list = dataclasses.field(default_factory=list)  # UniPC: steps whose corrector is skipped
    solver_p: None = None  # UniPC: another scheduler as predictor (not supported)
    shift_terminal: float | None = None  # UniPC: flow sigmas only (not supported)
    original_inference_steps: int = 50  # LCM: the distillation grid the steps are taken from
    timestep_scaling: float = 10.0  # LCM: t scale in the boundary-condition scalings c_skip, c_out
    # Other diffusers schedulers' knobs that do not change these samplers (e.g. PNDM's in SD1.5's config).
    inert_keys = frozenset({"dynamic_thresholding_ratio", "sample_max_value", "flow_shift",
                            "time_shift_type", "shift", "base_shift", "max_shift"})

    def __post_init__(self):
        self.require(self.beta_schedule in BETA_SCHEDULES or self.trained_betas is not None,
                     f"unknown beta_schedule {self.beta_schedule!r}; choose one of {BETA_SCHEDULES}.")
        self.require(self.prediction_type in PREDICTION_TYPES,
                     f"unknown prediction_type {self.prediction_type!r}; choose one of {PREDICTION_TYPES}.")
        self.require(self.timestep_spacing in TIMESTEP_SPACINGS,
                     f"unknown timestep_spacing {self.timestep_spacing!r}; choose one of {TIMESTEP_SPACINGS}.")
        for name in ("thresholding", "rescale_betas_zero_snr", "use_exponential_sigmas", "use_beta_sigmas",
                     "use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting"):
            self.require(not getattr(self, name), f"{name}=True is not supported by sd_core.")
        self.require(self.final_sigmas_type in ("zero", "sigma_min"), "final_sigmas_type must be 'zero' or 'sigma_min'.")
        self.require(self.interpolation_type == "linear" and self.timestep_type == "discrete",
                     "only interpolation_type='linear' and timestep_type='discrete' are supported.")
        self.require(self.solver_p is None and self.shift_terminal is None,
                     "solver_p and shift_terminal are not supported by sd_core; remove them from the config.")


@dataclasses.dataclass
class SamplingState:
    """Everything a sampling loop carries from one step to the next; owned by the caller."""
    timesteps: torch.Tensor  # the model's timestep at each remaining step
    sigmas: torch.Tensor | None  # sigma-parameterised samplers: one per step plus the final one
    init_noise_sigma: float | torch.Tensor
    num_inference_steps: int
    step_index: int = 0  # index into the full schedule (sigmas); image to image starts past 0
    begin_index: int = 0  # where this run started in the full schedule
    model_outputs: list = dataclasses.field(default_factory=list)  # multistep history (DPM-Solver++'s x0, PNDM's eps)
    step_start_sample: torch.Tensor | None = None  # a multi-stage step's starting sample (PNDM, Heun)
    stage_sum: torch.Tensor | float = 0.0  # a multi-stage step's weighted stage outputs so far (PRK, Heun)

    @property
    def timestep(self):
        """The model timestep of the current step."""
        return self.timesteps[self.step_index - self.begin_index]


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor  # the current x0 estimate (previews, trajectories)


# ------------------------------------------------------------------------------------ the schedules


def make_betas(c: SchedulerConfig) -> torch.Tensor:
    n = c.num_train_timesteps
    if c.trained_betas is not None:
        return torch.tensor(c.trained_betas, dtype=torch.float32)
    if c.beta_schedule == "linear":
        return torch.linspace(c.beta_start, c.beta_end, n, dtype=torch.float32)
    if c.beta_schedule == "scaled_linear":  # Stable Diffusion's: linear in sqrt(beta)
        return torch.linspace(c.beta_start ** 0.5, c.beta_end ** 0.5, n, dtype=torch.float32) ** 2
    # squaredcos_cap_v2: alpha_bar(t) = cos^2((t + 0.008) / 1.008 * pi / 2), betas capped at 0.999
    alpha_bar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    return torch.tensor([min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), 0.999) for i in range(n)],
                        dtype=torch.float32)


def spaced_timesteps(c: SchedulerConfig, n: int, dtype=np.int64, round_linspace: bool = True,
                     last_timestep: int | None = None, drop_final: bool = False) -> np.ndarray:
    """n timesteps from high to low over [0, last_timestep) (default the T training steps): `linspace` over
    [0, last - 1], `leading` multiples of last // n plus `steps_offset`, or `trailing` back from T - 1.
    drop_final (DPM-Solver++'s way) spaces n + 1 points for linspace/leading and drops the last."""
    T = c.num_train_timesteps
    last = T if last_timestep is None else last_timestep
    points = n + 1 if drop_final else n
    if c.timestep_spacing == "linspace":
        steps = np.linspace(0, last - 1, points, dtype=None if round_linspace else np.float32)
        steps = (steps.round() if round_linspace else steps)[::-1]
    elif c.timestep_spacing == "leading":
        steps = (np.arange(0, points) * (last // points)).round()[::-1]
    else:
        return np.round(np.arange(last, 0, -T / n)).astype(dtype) - 1
    steps = steps[:-1] if drop_final else steps
    return steps.copy().astype(dtype) + (c.steps_offset if c.timestep_spacing == "leading" else 0)


def checked_timesteps(c: SchedulerConfig, n: int) -> np.ndarray:
    """spaced_timesteps(c, n), refused where 'leading' steps plus steps_offset reach past the last training
    timestep (the samplers that index alpha_bar with them: DDPM, DDIM, PNDM)."""
    timesteps = spaced_timesteps(c, n)
    if timesteps.max() >= c.num_train_timesteps:
        raise ValueError(f"{n} '{c.timestep_spacing}' steps with steps_offset={c.steps_offset} reach timestep "
                         f"{timesteps.max()}, beyond the {c.num_train_timesteps} training timesteps; use fewer steps "
                         f"or 'trailing'.")
    return timesteps


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022), eq. 5: n sigmas evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def sigma_to_timestep(sigma: float, log_sigmas: np.ndarray) -> float:
    """The (fractional) training timestep whose sigma is `sigma`, by linear interpolation in log sigma."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    distances = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(distances >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigma))


def sigma_schedule(c: SchedulerConfig, timesteps: np.ndarray, train_sigmas: np.ndarray, karras: bool,
                   karras_bounds: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas, timesteps): the training sigmas interpolated at the timesteps, or (karras) Karras sigmas
    between `karras_bounds` (or the config's sigma_min/max) with the timesteps read back from them."""
    if not karras:
        return np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas), timesteps
    sigma_min = karras_bounds[0] if c.sigma_min is None else c.sigma_min
    sigma_max = karras_bounds[1] if c.sigma_max is None else c.sigma_max
    sigmas = karras_sigmas(sigma_min, sigma_max, len(timesteps))
    return sigmas, np.array([sigma_to_timestep(s, np.log(train_sigmas)) for s in sigmas])


def broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1)))


# ------------------------------------------------------------------------------------ the model output


def predicted_x0_and_eps(model_output, x_t, alpha_t, sigma_t, prediction_type: str):
    """(x0, eps) from what the model predicts, where x_t = alpha_t x0 + sigma_t eps, alpha_t^2 + sigma_t^2 = 1:
    epsilon: x0 = (x_t - sigma_t eps) / alpha_t;
    v_prediction (Salimans & Ho 2022, v = alpha_t eps - sigma_t x0): x0 = alpha_t x_t - sigma_t v,
        eps = alpha_t v + sigma_t x_t;
    sample: eps = (x_t - alpha_t x0) / sigma_t."""
    if prediction_type == "epsilon":
        return (x_t - sigma_t * model_output) / alpha_t, model_output
    if prediction_type == "v_prediction":
        return alpha_t * x_t - sigma_t * model_output, alpha_t * model_output + sigma_t * x_t
    return model_output, (x_t - alpha_t * model_output) / sigma_t


class Scheduler:
    """Shared by every sampler: the betas, alpha_bar, the closed-form forward process, step bookkeeping."""
    name = ""  # sd_core's name (make_scheduler("euler"))
    diffusers_class = ""  # the diffusers scheduler class it equals, which model folders' configs name
    display_name = ""  # what A1111/ComfyUI users call it (and PNG infotext writes)
    defaults: dict = {}  # this sampler's diffusers defaults where they differ from SchedulerConfig's
    options: tuple = ()  # the sampler's own inputs beyond the config (DDIM's eta)
    honours_set_alpha_to_one = False  # DDIM, PNDM: alpha_bar before t = 0 follows set_alpha_to_one
    order = 1  # model calls per step: the schedule lists each step's timesteps `order` times (Heun: 2)
    uses_sigmas = False

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.betas = make_betas(config)
        self.alphas_cumprod = torch.cumprod(1.0 - self.betas, dim=0)

    @classmethod
    def from_config(cls, config: dict | SchedulerConfig, **options):
        """A sampler from any diffusers scheduler config. `options` are sampler inputs beyond the config;
        each sampler takes those it has (DDIM's eta) and has no use for the others."""
        if isinstance(config, SchedulerConfig):
            config = config.to_dict()
        # As diffusers does: values the source scheduler took by default give way to this sampler's defaults.
        defaulted = set(config.get("_use_default_values", ()))
        config = {k: v for k, v in config.items() if not k.startswith("_") and k not in defaulted}
        return cls(SchedulerConfig.from_dict({**cls.defaults, **config}),
                   **{k: v for k, v in options.items() if k in cls.options})

    def alpha_bar(self, t: int) -> torch.Tensor:
        """alpha_bar_t; before the first training step (t < 0) 1, or alpha_bar_0 where the sampler honours
        set_alpha_to_one=False (diffusers' "final alpha_cumprod" of DDIM and PNDM)."""
        if t >= 0:
            return self.alphas_cumprod[t]
        one = self.config.set_alpha_to_one or not self.honours_set_alpha_to_one
        return torch.tensor(1.0) if one else self.alphas_cumprod[0]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """Sample q(x_t | x_0) in closed form: sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        t = torch.as_tensor(t, device=self.alphas_cumprod.device).reshape(-1).long()
        alpha_bar = self.alphas_cumprod.to(x0.dtype)[t]
        return broadcast(alpha_bar ** 0.5, x0) * x0 + broadcast((1 - alpha_bar) ** 0.5, x0) * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, t) -> torch.Tensor:
        """v = sqrt(alpha_bar) noise - sqrt(1 - alpha_bar) x0: the v-prediction training target."""
        t = torch.as_tensor(t).reshape(-1).long()
        alpha_bar = self.alphas_cumprod.to(x0.dtype)[t]
        return broadcast(alpha_bar ** 0.5, x0) * noise - broadcast((1 - alpha_bar) ** 0.5, x0) * x0

    def check_steps(self, num_inference_steps: int, strength: float):
        T = self.config.num_train_timesteps
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer; got {num_inference_steps!r}.")
        if num_inference_steps > T:
            raise ValueError(f"num_inference_steps={num_inference_steps} exceeds the {T} training timesteps.")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must lie in [0, 1]; got {strength}.")

    def schedule(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None, float | torch.Tensor]:
        """(timesteps, sigmas or None, init_noise_sigma) for n steps."""
        raise NotImplementedError

    def set_timesteps(self, num_inference_steps: int, strength: float = 1.0) -> SamplingState:
        """A fresh state for `num_inference_steps` steps. strength < 1 (image to image) skips the first
        steps the way diffusers' img2img pipelines do: only the last int(n * strength) are run (of a
        sampler with `order` model calls per step, the schedule from entry order * first step on)."""
        self.check_steps(num_inference_steps, strength)
        timesteps, sigmas, init_noise_sigma = self.schedule(num_inference_steps)
        start = self.order * (num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps))
        if start >= self.order * num_inference_steps:
            raise ValueError(f"strength={strength} leaves no step to run out of {num_inference_steps}; "
                             f"raise the strength or the number of steps.")
        return SamplingState(timesteps[start:], sigmas, init_noise_sigma, num_inference_steps, step_index=start,
                             begin_index=start)

    def add_noise_at_start(self, state: SamplingState, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Noise clean latents to the state's first timestep (image to image)."""
        return self.add_noise(x0, noise, state.timesteps[0])

    def scale_model_input(self, state: SamplingState, sample: torch.Tensor) -> torch.Tensor:
        return sample

    @staticmethod
    def noise_prediction(model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        """The model's prediction for the sample's channels (a learned-sigma model, like DiT's, also
        outputs a variance per channel, which only DDPM uses)."""
        return model_output[:, :sample.shape[1]]

    def step(self, state: SamplingState, model_output, sample, generator=None) -> StepOutput:
        raise NotImplementedError
