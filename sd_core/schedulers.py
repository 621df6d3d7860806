"""Noise schedules and samplers, each step written as its equation, step for step equal to diffusers.

The forward process is fixed by the betas: x_t = alpha_t x0 + sigma_t eps with alpha_t = sqrt(alpha_bar_t)
and sigma_t = sqrt(1 - alpha_bar_t) (variance preserving). The sigma-parameterised samplers (Euler,
DPM-Solver++) walk the same process in Karras et al.'s variable sigma = sigma_t / alpha_t, on
x / alpha_t. A sampler holds only what its config determines; what changes between steps (step index,
DPM-Solver's history) lives in a `SamplingState` the caller owns:

    scheduler = make_scheduler("euler", scheduler_config)
    state = scheduler.set_timesteps(25)
    x = noise * state.init_noise_sigma
    for t in state.timesteps:
        model_output = unet(scheduler.scale_model_input(state, x), t, text)
        x = scheduler.step(state, model_output, x, generator).prev_sample

Every sampler turns the model output into (x0, eps) with one function, `predicted_x0_and_eps`.
Timesteps and sigmas are computed with the same numpy/torch operations as diffusers so that they are
equal to the last bit, quirks included (each is named where it happens).
"""
import dataclasses
import math
from typing import NamedTuple

import numpy as np
import torch

from .config import ModelConfig
from .layers import randn_like

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
    set_alpha_to_one: bool = True  # DDIM: alpha_bar before t=0 is 1 (else alpha_bar_0)
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
    # Other diffusers schedulers' knobs that do not change these samplers (e.g. PNDM's in SD1.5's config).
    inert_keys = frozenset({"skip_prk_steps", "dynamic_thresholding_ratio", "sample_max_value", "flow_shift",
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


@dataclasses.dataclass
class SamplingState:
    """Everything a sampling loop carries from one step to the next; owned by the caller."""
    timesteps: torch.Tensor  # the model's timestep at each remaining step
    sigmas: torch.Tensor | None  # sigma-parameterised samplers: one per step plus the final one
    init_noise_sigma: float | torch.Tensor
    num_inference_steps: int
    step_index: int = 0  # index into the full schedule (sigmas); image to image starts past 0
    begin_index: int = 0  # where this run started in the full schedule
    model_outputs: list = dataclasses.field(default_factory=list)  # DPM-Solver++'s x0 history

    @property
    def timestep(self):
        """The model timestep of the current step."""
        return self.timesteps[self.step_index - self.begin_index]


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor  # the current x0 estimate (previews, trajectories)


# ------------------------------------------------------------------------------------ the equations


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


def alpha_sigma_from_karras_sigma(sigma):
    """alpha_t = 1 / sqrt(sigma^2 + 1) and sigma_t = sigma alpha_t for Karras' sigma = sigma_t / alpha_t."""
    alpha = 1 / ((sigma ** 2 + 1) ** 0.5)
    return alpha, sigma * alpha


def to_d(x, sigma, x0):
    """The probability-flow ODE's derivative dx/dsigma = (x - x0) / sigma (Karras et al. 2022, eq. 4)."""
    return (x - x0) / sigma


def ancestral_step(sigma, sigma_next):
    """Split the move to sigma_next into a deterministic part down to sigma_down and fresh noise of size
    sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2 (k-diffusion's get_ancestral_step, eta = 1)."""
    sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
    return (sigma_next ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def dpm_solver_lambda(sigma):
    """lambda = log(alpha_t / sigma_t), the half log-SNR DPM-Solver integrates over (= -log sigma)."""
    alpha_t, sigma_t = alpha_sigma_from_karras_sigma(sigma)
    return torch.log(alpha_t) - torch.log(sigma_t)


def dpm_solver_x0_blend(x0, previous_x0, h, h_previous, solver_type: str):
    """DPM-Solver++(2M)'s second-order x0 (Lu et al. 2022, alg. 2): extrapolate along lambda from the
    last two estimates, D = x0 + c (x0 - previous_x0) / r with r = h_previous / h; c = 1/2 (midpoint),
    or -(1/h + 1/(e^-h - 1)) (the 'heun' variant)."""
    slope = (1.0 / (h_previous / h)) * (x0 - previous_x0)
    c = 0.5 if solver_type == "midpoint" else -(1.0 / h + 1.0 / (torch.exp(-h) - 1.0))
    return x0 + c * slope


def dpm_solver_update(x, x0, sigma, sigma_next):
    """The exponential-integrator step in x0 form (Lu et al. 2022, eq. 9): with h = lambda_next - lambda,
    x_next = (sigma_t' / sigma_t) x - alpha_t' (e^-h - 1) x0 (DPM-Solver++(1) is DDIM)."""
    alpha_next, sigma_t_next = alpha_sigma_from_karras_sigma(sigma_next)
    _, sigma_t = alpha_sigma_from_karras_sigma(sigma)
    h = dpm_solver_lambda(sigma_next) - dpm_solver_lambda(sigma)
    return (sigma_t_next / sigma_t) * x - (alpha_next * (torch.exp(-h) - 1.0)) * x0


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


# ------------------------------------------------------------------------------------------- samplers


class Scheduler:
    """Shared by every sampler: the betas, alpha_bar, the closed-form forward process, step bookkeeping."""
    name = ""
    defaults: dict = {}  # this sampler's diffusers defaults where they differ from SchedulerConfig's
    options: tuple = ()  # the sampler's own inputs beyond the config (DDIM's eta)
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
        steps the way diffusers' img2img pipelines do: only the last int(n * strength) are run."""
        self.check_steps(num_inference_steps, strength)
        timesteps, sigmas, init_noise_sigma = self.schedule(num_inference_steps)
        start = num_inference_steps - min(int(num_inference_steps * strength), num_inference_steps)
        if start >= len(timesteps):
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


class DDPM(Scheduler):
    """Ho et al. (2020): ancestral sampling from the posterior q(x_{t-1} | x_t, x0_hat)."""
    name = "ddpm"

    def schedule(self, n):
        timesteps = spaced_timesteps(self.config, n)
        if timesteps.max() >= self.config.num_train_timesteps:
            raise ValueError(f"{n} '{self.config.timestep_spacing}' steps with steps_offset="
                             f"{self.config.steps_offset} reach timestep {timesteps.max()}, beyond the "
                             f"{self.config.num_train_timesteps} training timesteps; use fewer steps or 'trailing'.")
        return torch.from_numpy(timesteps), None, 1.0

    def alpha_bar(self, t: int) -> torch.Tensor:
        """alpha_bar_t, with alpha_bar = 1 before the first training step (t < 0)."""
        return self.alphas_cumprod[t] if t >= 0 else torch.tensor(1.0)

    def predict(self, model_output, x_t, t: int):
        """(x0, eps) at timestep t, x0 clipped when the config says so."""
        alpha_bar = self.alpha_bar(t)
        x0, eps = predicted_x0_and_eps(model_output, x_t, alpha_bar ** 0.5, (1 - alpha_bar) ** 0.5,
                                       self.config.prediction_type)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x0, eps

    def posterior_variance(self, t: int, t_prev: int) -> torch.Tensor:
        """beta tilde = (1 - alpha_bar_prev) / (1 - alpha_bar_t) beta_t (Ho et al. 2020, eq. 7)."""
        alpha_bar, alpha_bar_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        return (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)

    def posterior(self, x0, x_t, t: int, t_prev: int):
        """q(x_{t_prev} | x_t, x0) = N(mean, variance) (Ho et al. 2020, eqs. 6-7), with alpha_t = alpha_bar_t /
        alpha_bar_{t_prev} and beta_t = 1 - alpha_t:
        mean = sqrt(alpha_bar_prev) beta_t / (1 - alpha_bar_t) x0 + sqrt(alpha_t) (1 - alpha_bar_prev) / (1 - alpha_bar_t) x_t,
        variance = beta tilde."""
        alpha_bar, alpha_bar_prev = self.alpha_bar(t), self.alpha_bar(t_prev)
        alpha = alpha_bar / alpha_bar_prev
        mean = (alpha_bar_prev ** 0.5 * (1 - alpha)) / (1 - alpha_bar) * x0 \
            + alpha ** 0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar) * x_t
        return mean, self.posterior_variance(t, t_prev)

    def reverse_std(self, t: int, t_prev: int, predicted_variance=None) -> torch.Tensor:
        """The reverse step's standard deviation: sqrt(beta tilde) (fixed_small), sqrt(beta) (fixed_large),
        or the model's interpolation between log beta tilde and log beta (learned range, Nichol & Dhariwal
        2021, eq. 15)."""
        beta = 1 - self.alpha_bar(t) / self.alpha_bar(t_prev)
        beta_tilde = torch.clamp(self.posterior_variance(t, t_prev), min=1e-20)
        if predicted_variance is not None:
            fraction = (predicted_variance + 1) / 2
            return torch.exp(0.5 * (fraction * torch.log(beta) + (1 - fraction) * torch.log(beta_tilde)))
        if self.config.variance_type == "fixed_small":
            return beta_tilde ** 0.5
        if self.config.variance_type == "fixed_large":
            return beta ** 0.5
        raise ValueError(f"variance_type {self.config.variance_type!r} needs a model that outputs its variance "
                         f"(2x the sample's channels); choose fixed_small or fixed_large.")

    def sample_prev_timestep(self, x_t, model_output, t: int, t_prev: int | None = None, generator=None) -> StepOutput:
        """One reverse step from t to t_prev (default t - 1): the posterior mean, plus noise unless t = 0.
        A model output with twice the sample's channels carries its learned-range variance."""
        t, t_prev = int(t), int(t) - 1 if t_prev is None else int(t_prev)
        predicted_variance = model_output[:, x_t.shape[1]:] if model_output.shape[1] == 2 * x_t.shape[1] else None
        x0, _ = self.predict(self.noise_prediction(model_output, x_t), x_t, t)
        mean, _ = self.posterior(x0, x_t, t, t_prev)
        if t > 0:
            mean = mean + self.reverse_std(t, t_prev, predicted_variance) * randn_like(x0, generator)
        return StepOutput(mean, x0)

    def step(self, state, model_output, sample, generator=None):
        i = state.step_index - state.begin_index
        t_prev = state.timesteps[i + 1] if i + 1 < len(state.timesteps) else -1
        state.step_index += 1
        return self.sample_prev_timestep(sample, model_output, state.timesteps[i], t_prev, generator)


class DDIM(DDPM):
    """Song et al. (2021): x_prev = sqrt(alpha_bar_prev) x0 + sqrt(1 - alpha_bar_prev - s^2) eps + s z, with
    s = eta sqrt(posterior variance): deterministic for eta = 0, DDPM's ancestral step for eta = 1."""
    name = "ddim"
    options = ("eta",)

    def __init__(self, config, eta: float = 0.0):
        super().__init__(config)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"DDIM's eta must lie in [0, 1]; got {eta}.")
        self.eta = eta

    def alpha_bar(self, t: int) -> torch.Tensor:
        """Before t = 0 DDIM steps to alpha_bar = 1 (set_alpha_to_one) or to alpha_bar_0."""
        if t >= 0:
            return self.alphas_cumprod[t]
        return torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def step(self, state, model_output, sample, generator=None):
        t = int(state.timestep)
        # diffusers' DDIM steps back by T // n whatever the spacing (so not always to the next listed timestep).
        t_prev = t - self.config.num_train_timesteps // state.num_inference_steps
        state.step_index += 1
        x0, eps = self.predict(self.noise_prediction(model_output, sample), sample, t)
        alpha_bar_prev = self.alpha_bar(t_prev)
        std = self.eta * self.posterior_variance(t, t_prev) ** 0.5
        prev_sample = alpha_bar_prev ** 0.5 * x0 + (1 - alpha_bar_prev - std ** 2) ** 0.5 * eps
        if self.eta > 0:
            prev_sample = prev_sample + std * randn_like(x0, generator)
        return StepOutput(prev_sample, x0)


class KarrasSigmaScheduler(Scheduler):
    """Samplers that step in Karras' sigma = sqrt((1 - alpha_bar) / alpha_bar) (Euler, DPM-Solver++)."""
    defaults = {"timestep_spacing": "linspace"}
    uses_sigmas = True

    def train_sigmas(self) -> np.ndarray:
        return np.array(((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5)

    def karras(self) -> bool:
        return self.config.use_karras_sigmas

    def final_sigma(self):
        """The sigma after the last step: 0 (a clean sample), or the smallest training sigma."""
        if self.config.final_sigmas_type == "sigma_min":
            return (((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5).item()
        return 0


class EulerDiscrete(KarrasSigmaScheduler):
    """Karras et al. (2022)'s Euler method on the probability-flow ODE dx/dsigma = (x - x0) / sigma."""
    name = "euler"

    def schedule(self, n):
        c = self.config
        timesteps = spaced_timesteps(c, n, dtype=np.float32, round_linspace=False)
        train_sigmas = self.train_sigmas()
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        sigmas, timesteps = sigma_schedule(c, timesteps, train_sigmas, self.karras(),
                                           (sigmas[-1].item(), sigmas[0].item()))
        sigmas = torch.from_numpy(np.concatenate([sigmas, [self.final_sigma()]]).astype(np.float32))
        max_sigma = sigmas.max()
        init_noise_sigma = max_sigma if c.timestep_spacing in ("linspace", "trailing") else (max_sigma ** 2 + 1) ** 0.5
        return torch.from_numpy(timesteps.astype(np.float32)), sigmas, init_noise_sigma

    def add_noise_at_start(self, state, x0, noise):
        return x0 + noise * state.sigmas[state.step_index].to(x0.dtype)

    def scale_model_input(self, state, sample):
        return sample / ((state.sigmas[state.step_index] ** 2 + 1) ** 0.5)

    def predict_x0(self, model_output, sample, sigma):
        """x0 from the model output at Karras sigma (the sample is x0 + sigma eps)."""
        alpha_t, sigma_t = alpha_sigma_from_karras_sigma(sigma)
        return predicted_x0_and_eps(self.noise_prediction(model_output, sample), sample * alpha_t, alpha_t, sigma_t,
                                    self.config.prediction_type)[0]

    def step(self, state, model_output, sample, generator=None):
        sigma, sigma_next = state.sigmas[state.step_index], state.sigmas[state.step_index + 1]
        state.step_index += 1
        sample = sample.to(torch.float32)
        x0 = self.predict_x0(model_output, sample, sigma)
        return StepOutput((sample + to_d(sample, sigma, x0) * (sigma_next - sigma)).to(model_output.dtype), x0)


class EulerAncestral(EulerDiscrete):
    """Euler down to sigma_down, then fresh noise of size sigma_up (so the marginal at sigma_next is right).
    Like diffusers' EulerAncestralDiscreteScheduler, it ignores use_karras_sigmas and final_sigmas_type."""
    name = "euler_ancestral"

    def karras(self) -> bool:
        return False

    def final_sigma(self):
        return 0

    def step(self, state, model_output, sample, generator=None):
        sigma, sigma_next = state.sigmas[state.step_index], state.sigmas[state.step_index + 1]
        state.step_index += 1
        sample = sample.to(torch.float32)
        x0 = self.predict_x0(model_output, sample, sigma)
        sigma_down, sigma_up = ancestral_step(sigma, sigma_next)
        prev_sample = sample + to_d(sample, sigma, x0) * (sigma_down - sigma)
        prev_sample = prev_sample + randn_like(x0, generator) * sigma_up
        return StepOutput(prev_sample.to(model_output.dtype), x0)


class DPMSolverMultistep(KarrasSigmaScheduler):
    """DPM-Solver++ (Lu et al. 2022), data-prediction form, first or second order multistep (2M): one
    exponential-integrator step per model call, on an x0 extrapolated from the last two estimates."""
    name = "dpmpp_2m"

    def __init__(self, config):
        super().__init__(config)
        config.require(config.algorithm_type == "dpmsolver++", "only algorithm_type='dpmsolver++' is supported.")
        config.require(config.solver_order in (1, 2), "only solver_order 1 or 2 is supported (DPM-Solver++ 2M).")
        config.require(config.solver_type in ("midpoint", "heun"), "solver_type must be 'midpoint' or 'heun'.")

    def schedule(self, n):
        c = self.config
        lambdas = torch.log(self.alphas_cumprod.sqrt()) - torch.log((1 - self.alphas_cumprod).sqrt())
        clipped = torch.searchsorted(torch.flip(lambdas, [0]), c.lambda_min_clipped)
        last_timestep = (c.num_train_timesteps - clipped).numpy().item()
        timesteps = spaced_timesteps(c, n, last_timestep=last_timestep, drop_final=True)
        train_sigmas = self.train_sigmas()
        sigmas, timesteps = sigma_schedule(c, timesteps, train_sigmas, self.karras(),
                                           (train_sigmas[0].item(), train_sigmas[-1].item()))
        if self.karras() and c.beta_schedule != "squaredcos_cap_v2":
            timesteps = timesteps.round()
        sigmas = torch.from_numpy(np.concatenate([sigmas, [self.final_sigma()]]).astype(np.float32))
        return torch.from_numpy(timesteps).to(torch.int64), sigmas, 1.0

    def add_noise_at_start(self, state, x0, noise):
        alpha_t, sigma_t = alpha_sigma_from_karras_sigma(state.sigmas[state.step_index])
        return (alpha_t * x0 + sigma_t * noise).to(x0.dtype)

    def first_order_step(self, state: SamplingState) -> bool:
        """DPM-Solver++(1) when there is no previous x0 yet, or (lower_order_final / euler_at_final) at the
        last step, where a second-order step is unstable for few steps or when stepping to sigma = 0."""
        c = self.config
        n = len(state.sigmas) - 1
        is_last = state.step_index == n - 1
        return (c.solver_order == 1 or not state.model_outputs
                or (is_last and (c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero")))

    def step(self, state, model_output, sample, generator=None):
        i = state.step_index
        sigma, sigma_next = state.sigmas[i], state.sigmas[i + 1]
        alpha_t, sigma_t = alpha_sigma_from_karras_sigma(sigma)
        x0, _ = predicted_x0_and_eps(self.noise_prediction(model_output, sample), sample, alpha_t, sigma_t,
                                     self.config.prediction_type)
        x0_used = x0
        if not self.first_order_step(state):
            h = dpm_solver_lambda(sigma_next) - dpm_solver_lambda(sigma)
            h_previous = dpm_solver_lambda(sigma) - dpm_solver_lambda(state.sigmas[i - 1])
            x0_used = dpm_solver_x0_blend(x0, state.model_outputs[-1], h, h_previous, self.config.solver_type)
        state.model_outputs = (state.model_outputs + [x0])[-2:]
        state.step_index += 1
        prev_sample = dpm_solver_update(sample.to(torch.float32), x0_used, sigma, sigma_next)
        return StepOutput(prev_sample.to(model_output.dtype), x0)


SCHEDULERS = {cls.name: cls for cls in (DDPM, DDIM, EulerDiscrete, EulerAncestral, DPMSolverMultistep)}
# The same samplers under their diffusers class names and under the names A1111/ComfyUI users know.
DIFFUSERS_CLASS_NAMES = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler",
                         "EulerAncestralDiscreteScheduler": "euler_ancestral",
                         "DPMSolverMultistepScheduler": "dpmpp_2m"}
VARIANTS = {"dpmpp_2m_karras": ("dpmpp_2m", {"use_karras_sigmas": True}),
            "euler_karras": ("euler", {"use_karras_sigmas": True})}
SCHEDULER_NAMES = sorted([*SCHEDULERS, *VARIANTS])
DISPLAY_NAMES = {"ddpm": "DDPM", "ddim": "DDIM", "euler": "Euler", "euler_karras": "Euler Karras",
                 "euler_ancestral": "Euler a", "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_karras": "DPM++ 2M Karras"}


def make_scheduler(name: str, config: dict | None = None, **options) -> Scheduler:
    """A sampler by name (see SCHEDULER_NAMES) from a diffusers scheduler config (e.g. a model's
    scheduler_config.json, whatever scheduler class it was written for); `options` are sampler inputs
    beyond the config (DDIM's eta), ignored by samplers that have no such input."""
    config = dict(config or {})
    name, overrides = VARIANTS.get(name, (name, {}))
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; choose one of {SCHEDULER_NAMES}.")
    return SCHEDULERS[name].from_config({**config, **overrides}, **options)
