"""DDPM and DDIM: ancestral and implicit sampling in alpha_bar, through the posterior q(x_prev | x_t, x0)."""
import torch

from sd_core.noise import randn_like
from sd_core.schedulers.base import Scheduler, StepOutput, checked_timesteps, predicted_x0_and_eps


class DDPM(Scheduler):
    """Ho et al. (2020): ancestral sampling from the posterior q(x_{t-1} | x_t, x0_hat)."""
    name = "ddpm"
    diffusers_class = "DDPMScheduler"
    display_name = "DDPM"

    def schedule(self, n):
        return torch.from_numpy(checked_timesteps(self.config, n)), None, 1.0

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
    diffusers_class = "DDIMScheduler"
    display_name = "DDIM"
    options = ("eta",)
    honours_set_alpha_to_one = True

    def __init__(self, config, eta: float = 0.0):
        super().__init__(config)
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"DDIM's eta must lie in [0, 1]; got {eta}.")
        self.eta = eta

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
