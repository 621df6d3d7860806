"""Samplers of the probability-flow ODE in Karras et al.'s sigma = sigma_t / alpha_t: Euler and Euler ancestral."""
import numpy as np
import torch

from ..layers import randn_like
from .base import Scheduler, StepOutput, predicted_x0_and_eps, sigma_schedule, spaced_timesteps


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
