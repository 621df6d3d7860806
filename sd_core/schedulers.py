"""Noise schedules and samplers, step for step equal to diffusers' schedulers.

The forward process is fixed by the betas: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.
A sampler walks it backwards. The schedulers here hold only what their config determines; what
changes between steps (step index, DPM-Solver's history) lives in a `SamplingState` the caller owns:

    scheduler = make_scheduler("euler", scheduler_config)
    state = scheduler.set_timesteps(25)
    x = noise * state.init_noise_sigma
    for t in state.timesteps:
        model_output = unet(scheduler.scale_model_input(state, x), t, text)
        x = scheduler.step(state, model_output, x, generator).prev_sample

Timesteps and sigmas are computed with the same numpy/torch operations as diffusers so that they
are equal to the last bit, quirks included (each is named where it happens).
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


def spaced_timesteps(c: SchedulerConfig, n: int, dtype=np.int64, round_linspace: bool = True) -> np.ndarray:
    """n timesteps from high to low: `linspace` over [0, T-1], `leading` multiples of T//n plus
    `steps_offset`, or `trailing` back from T-1."""
    T = c.num_train_timesteps
    if c.timestep_spacing == "linspace":
        steps = np.linspace(0, T - 1, n, dtype=None if round_linspace else np.float32)
        return (steps.round() if round_linspace else steps)[::-1].copy().astype(dtype)
    if c.timestep_spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(dtype) + c.steps_offset
    return np.round(np.arange(T, 0, -T / n)).astype(dtype) - 1


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022): n sigmas evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def sigma_to_timestep(sigma: float, log_sigmas: np.ndarray) -> float:
    """The (fractional) training timestep whose sigma is `sigma`, by linear interpolation in log sigma."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    distances = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(distances >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigma))


def sigma_range(c: SchedulerConfig, default_min: float, default_max: float) -> tuple[float, float]:
    return (default_min if c.sigma_min is None else c.sigma_min,
            default_max if c.sigma_max is None else c.sigma_max)


def broadcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *([1] * (like.ndim - 1)))


class Scheduler:
    """Shared by every sampler: the betas, alpha_bar, the closed-form forward process, step bookkeeping."""
    name = ""
    defaults: dict = {}  # this sampler's diffusers defaults where they differ from SchedulerConfig's
    uses_sigmas = False

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.betas = make_betas(config)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()

    @classmethod
    def from_config(cls, config: dict | SchedulerConfig):
        if isinstance(config, SchedulerConfig):
            config = config.to_dict()
        # As diffusers does: values the source scheduler took by default give way to this sampler's defaults.
        defaulted = set(config.get("_use_default_values", ()))
        config = {k: v for k, v in config.items() if not k.startswith("_") and k not in defaulted}
        return cls(SchedulerConfig.from_dict({**cls.defaults, **config}))

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

    def final_sigma(self):
        """The sigma after the last step: 0 (a clean sample), or the smallest training sigma."""
        if self.config.final_sigmas_type == "sigma_min":
            return (((1 - self.alphas_cumprod[0]) / self.alphas_cumprod[0]) ** 0.5).item()
        return 0

    def _check_steps(self, num_inference_steps: int, strength: float):
        T = self.config.num_train_timesteps
        if not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer; got {num_inference_steps!r}.")
        if num_inference_steps > T:
            raise ValueError(f"num_inference_steps={num_inference_steps} exceeds the {T} training timesteps.")
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must lie in [0, 1]; got {strength}.")

    def _schedule(self, n: int) -> tuple[torch.Tensor, torch.Tensor | None, float | torch.Tensor]:
        raise NotImplementedError

    def set_timesteps(self, num_inference_steps: int, strength: float = 1.0) -> SamplingState:
        """A fresh state for `num_inference_steps` steps. strength < 1 (image to image) skips the first
        steps the way diffusers' img2img pipelines do: only the last int(n * strength) are run."""
        self._check_steps(num_inference_steps, strength)
        timesteps, sigmas, init_noise_sigma = self._schedule(num_inference_steps)
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

    def predict_x0(self, model_output, sample, alpha_bar):
        """x0 from the model output in alpha_bar form (DDPM, DDIM)."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            return (sample - (1 - alpha_bar) ** 0.5 * model_output) / alpha_bar ** 0.5
        if kind == "v_prediction":
            return alpha_bar ** 0.5 * sample - (1 - alpha_bar) ** 0.5 * model_output
        return model_output

    def step(self, state: SamplingState, model_output, sample, generator=None) -> StepOutput:
        raise NotImplementedError


class DDPM(Scheduler):
    """Ho et al. (2020): ancestral sampling from the posterior q(x_{t-1} | x_t, x0_hat)."""
    name = "ddpm"

    def _schedule(self, n):
        timesteps = spaced_timesteps(self.config, n)
        if timesteps.max() >= self.config.num_train_timesteps:
            raise ValueError(f"{n} '{self.config.timestep_spacing}' steps with steps_offset="
                             f"{self.config.steps_offset} reach timestep {timesteps.max()}, beyond the "
                             f"{self.config.num_train_timesteps} training timesteps; use fewer steps or 'trailing'.")
        return torch.from_numpy(timesteps), None, 1.0

    def posterior_variance(self, t: int, prev_t: int, predicted_variance=None) -> torch.Tensor:
        """Variance of the reverse step (a log-variance for learned_range)."""
        alpha_bar = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
        beta = 1 - alpha_bar / alpha_bar_prev
        posterior = torch.clamp((1 - alpha_bar_prev) / (1 - alpha_bar) * beta, min=1e-20)  # beta tilde
        kind = self.config.variance_type
        if kind == "fixed_small":
            return posterior
        if kind == "fixed_large":
            return beta
        if kind == "learned_range":  # the model interpolates between log(beta tilde) and log(beta)
            fraction = (predicted_variance + 1) / 2
            return fraction * torch.log(beta) + (1 - fraction) * torch.log(posterior)
        raise ValueError(f"variance_type {kind!r} is not supported; choose fixed_small, fixed_large or learned_range.")

    def sample_prev_timestep(self, xt, model_output, t: int, prev_t: int | None = None, generator=None) -> StepOutput:
        """One reverse step from t to prev_t (default t - 1): x0 estimate, posterior mean, plus noise unless t = 0."""
        t, prev_t = int(t), int(t) - 1 if prev_t is None else int(prev_t)
        predicted_variance = None
        if self.config.variance_type == "learned_range":
            if model_output.shape[1] != 2 * xt.shape[1]:
                raise ValueError("variance_type='learned_range' needs a model output with 2x the sample's channels.")
            model_output, predicted_variance = model_output.split(xt.shape[1], dim=1)
        alpha_bar = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
        alpha = alpha_bar / alpha_bar_prev
        x0 = self.predict_x0(model_output, xt, alpha_bar)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        mean = (alpha_bar_prev ** 0.5 * (1 - alpha)) / (1 - alpha_bar) * x0 \
            + alpha ** 0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar) * xt
        if t > 0:
            noise = randn_like(model_output, generator)
            variance = self.posterior_variance(t, prev_t, predicted_variance)
            std = torch.exp(0.5 * variance) if self.config.variance_type == "learned_range" else variance ** 0.5
            mean = mean + std * noise
        return StepOutput(mean, x0)

    def step(self, state, model_output, sample, generator=None):
        i = state.step_index - state.begin_index
        t = state.timesteps[i]
        prev_t = state.timesteps[i + 1] if i + 1 < len(state.timesteps) else -1
        state.step_index += 1
        return self.sample_prev_timestep(sample, model_output, t, prev_t, generator)


class DDIM(DDPM):
    """Song et al. (2021): deterministic (eta = 0) or partially stochastic steps along the same marginals."""
    name = "ddim"

    def step(self, state, model_output, sample, generator=None, eta: float = 0.0):
        c = self.config
        t = int(state.timestep)
        # diffusers' DDIM steps back by T // n whatever the spacing (so not always to the next listed timestep).
        prev_t = t - c.num_train_timesteps // state.num_inference_steps
        state.step_index += 1
        alpha_bar = self.alphas_cumprod[t]
        final_alpha_bar = torch.tensor(1.0) if c.set_alpha_to_one else self.alphas_cumprod[0]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else final_alpha_bar
        beta_bar = 1 - alpha_bar
        x0 = self.predict_x0(model_output, sample, alpha_bar)
        if c.prediction_type == "epsilon":
            eps = model_output
        elif c.prediction_type == "v_prediction":
            eps = alpha_bar ** 0.5 * model_output + beta_bar ** 0.5 * sample
        else:
            eps = (sample - alpha_bar ** 0.5 * x0) / beta_bar ** 0.5
        if c.clip_sample:
            x0 = x0.clamp(-c.clip_sample_range, c.clip_sample_range)
        variance = ((1 - alpha_bar_prev) / beta_bar) * (1 - alpha_bar / alpha_bar_prev)
        std = eta * variance ** 0.5
        prev_sample = alpha_bar_prev ** 0.5 * x0 + (1 - alpha_bar_prev - std ** 2) ** 0.5 * eps
        if eta > 0:
            prev_sample = prev_sample + std * randn_like(model_output, generator)
        return StepOutput(prev_sample, x0)


class EulerDiscrete(Scheduler):
    """Karras et al. (2022)'s Euler method on the probability-flow ODE in sigma = sqrt((1 - alpha_bar) / alpha_bar)."""
    name = "euler"
    defaults = {"timestep_spacing": "linspace"}
    uses_sigmas = True
    honours_sigma_options = True  # use_karras_sigmas, sigma_min/max, final_sigmas_type

    def _schedule(self, n):
        c = self.config
        timesteps = spaced_timesteps(c, n, dtype=np.float32, round_linspace=False)
        train_sigmas = np.array(((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5)
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        if c.use_karras_sigmas and self.honours_sigma_options:
            sigmas = karras_sigmas(*sigma_range(c, sigmas[-1].item(), sigmas[0].item()), n)
            timesteps = np.array([sigma_to_timestep(s, np.log(train_sigmas)) for s in sigmas])
        last = self.final_sigma() if self.honours_sigma_options else 0
        sigmas = torch.from_numpy(np.concatenate([sigmas, [last]]).astype(np.float32))
        max_sigma = sigmas.max()
        init_noise_sigma = max_sigma if c.timestep_spacing in ("linspace", "trailing") else (max_sigma ** 2 + 1) ** 0.5
        return torch.from_numpy(timesteps.astype(np.float32)), sigmas, init_noise_sigma

    def add_noise_at_start(self, state, x0, noise):
        return x0 + noise * state.sigmas[state.step_index].to(x0.dtype)

    def scale_model_input(self, state, sample):
        return sample / ((state.sigmas[state.step_index] ** 2 + 1) ** 0.5)

    def predict_x0_from_sigma(self, model_output, sample, sigma):
        kind = self.config.prediction_type
        if kind == "epsilon":
            return sample - sigma * model_output
        if kind == "v_prediction":
            return model_output * (-sigma / (sigma ** 2 + 1) ** 0.5) + (sample / (sigma ** 2 + 1))
        return model_output

    def step(self, state, model_output, sample, generator=None):
        sigma, sigma_next = state.sigmas[state.step_index], state.sigmas[state.step_index + 1]
        state.step_index += 1
        sample = sample.to(torch.float32)
        x0 = self.predict_x0_from_sigma(model_output, sample, sigma)
        derivative = (sample - x0) / sigma
        return StepOutput((sample + derivative * (sigma_next - sigma)).to(model_output.dtype), x0)


class EulerAncestral(EulerDiscrete):
    """Euler down to sigma_down, then fresh noise of size sigma_up (so the marginal at sigma_next is right).
    Like diffusers' EulerAncestralDiscreteScheduler, it ignores use_karras_sigmas and final_sigmas_type."""
    name = "euler_ancestral"
    honours_sigma_options = False

    def step(self, state, model_output, sample, generator=None):
        sigma, sigma_next = state.sigmas[state.step_index], state.sigmas[state.step_index + 1]
        state.step_index += 1
        sample = sample.to(torch.float32)
        x0 = self.predict_x0_from_sigma(model_output, sample, sigma)
        sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
        sigma_down = (sigma_next ** 2 - sigma_up ** 2) ** 0.5
        derivative = (sample - x0) / sigma
        prev_sample = sample + derivative * (sigma_down - sigma)
        prev_sample = prev_sample + randn_like(model_output, generator) * sigma_up
        return StepOutput(prev_sample.to(model_output.dtype), x0)


class DPMSolverMultistep(Scheduler):
    """DPM-Solver++ (Lu et al. 2022), data-prediction form, first or second order multistep.
    Works in lambda = log(alpha / sigma); the second-order update extrapolates from the last two x0s."""
    name = "dpmpp_2m"
    defaults = {"timestep_spacing": "linspace"}
    uses_sigmas = True

    def __init__(self, config):
        super().__init__(config)
        config.require(config.algorithm_type == "dpmsolver++", "only algorithm_type='dpmsolver++' is supported.")
        config.require(config.solver_order in (1, 2), "only solver_order 1 or 2 is supported (DPM-Solver++ 2M).")
        config.require(config.solver_type in ("midpoint", "heun"), "solver_type must be 'midpoint' or 'heun'.")
        self.lambda_t = torch.log(self.alphas_cumprod.sqrt()) - torch.log((1 - self.alphas_cumprod).sqrt())

    def _schedule(self, n):
        c = self.config
        clipped = torch.searchsorted(torch.flip(self.lambda_t, [0]), c.lambda_min_clipped)
        last_timestep = (c.num_train_timesteps - clipped).numpy().item()
        # n + 1 points, dropping the last (t = 0), as diffusers does.
        if c.timestep_spacing == "linspace":
            timesteps = np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif c.timestep_spacing == "leading":
            ratio = last_timestep // (n + 1)
            timesteps = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + c.steps_offset
        else:
            timesteps = np.arange(last_timestep, 0, -c.num_train_timesteps / n).round().copy().astype(np.int64) - 1
        train_sigmas = np.array(((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5)
        if c.use_karras_sigmas:
            flipped = np.flip(train_sigmas).copy()
            sigmas = karras_sigmas(*sigma_range(c, flipped[-1].item(), flipped[0].item()), n)
            timesteps = np.array([sigma_to_timestep(s, np.log(train_sigmas)) for s in sigmas])
            if c.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        sigmas = torch.from_numpy(np.concatenate([sigmas, [self.final_sigma()]]).astype(np.float32))
        return torch.from_numpy(timesteps).to(torch.int64), sigmas, 1.0

    def add_noise_at_start(self, state, x0, noise):
        sigma = state.sigmas[state.step_index]
        alpha, sigma = self.alpha_sigma(sigma)
        return (alpha * x0 + sigma * noise).to(x0.dtype)

    @staticmethod
    def alpha_sigma(sigma):
        alpha = 1 / ((sigma ** 2 + 1) ** 0.5)
        return alpha, sigma * alpha

    def step(self, state, model_output, sample, generator=None):
        c = self.config
        i, n = state.step_index, len(state.sigmas) - 1
        alpha_s, sigma_s = self.alpha_sigma(state.sigmas[i])
        if c.prediction_type == "epsilon":
            x0 = (sample - sigma_s * model_output) / alpha_s
        elif c.prediction_type == "v_prediction":
            x0 = alpha_s * sample - sigma_s * model_output
        else:
            x0 = model_output
        is_last = i == n - 1
        first_order = (c.solver_order == 1 or not state.model_outputs
                       or (is_last and (c.euler_at_final or (c.lower_order_final and n < 15)
                                        or c.final_sigmas_type == "zero")))
        state.model_outputs = (state.model_outputs + [x0])[-2:]
        state.step_index += 1
        sample = sample.to(torch.float32)
        alpha_t, sigma_t = self.alpha_sigma(state.sigmas[i + 1])
        lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
        lambda_s = torch.log(alpha_s) - torch.log(sigma_s)
        h = lambda_t - lambda_s
        if first_order:  # DPM-Solver++(1) = DDIM in x0 form
            prev = (sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * x0
        else:
            alpha_s1, sigma_s1 = self.alpha_sigma(state.sigmas[i - 1])
            h_0 = lambda_s - (torch.log(alpha_s1) - torch.log(sigma_s1))
            m0, m1 = state.model_outputs[-1], state.model_outputs[-2]
            d0, d1 = m0, (1.0 / (h_0 / h)) * (m0 - m1)
            if c.solver_type == "midpoint":
                prev = ((sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * d0
                        - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1)
            else:
                prev = ((sigma_t / sigma_s) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * d0
                        + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * d1)
        return StepOutput(prev.to(model_output.dtype), x0)


SCHEDULERS = {cls.name: cls for cls in (DDPM, DDIM, EulerDiscrete, EulerAncestral, DPMSolverMultistep)}
DIFFUSERS_CLASS_NAMES = {"DDPMScheduler": "ddpm", "DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler",
                         "EulerAncestralDiscreteScheduler": "euler_ancestral",
                         "DPMSolverMultistepScheduler": "dpmpp_2m"}


def make_scheduler(name: str, config: dict | None = None) -> Scheduler:
    """A sampler by name (ddpm, ddim, euler, euler_ancestral, dpmpp_2m, dpmpp_2m_karras) from a diffusers
    scheduler config (e.g. a model's scheduler_config.json, whatever scheduler class it was written for)."""
    config = dict(config or {})
    if name == "dpmpp_2m_karras":
        name, config["use_karras_sigmas"] = "dpmpp_2m", True
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; choose one of {sorted([*SCHEDULERS, 'dpmpp_2m_karras'])}.")
    return SCHEDULERS[name].from_config(config)
