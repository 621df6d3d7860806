"""The sigma parameterisation the ODE samplers step in: Karras et al.'s sigma = sigma_t / alpha_t."""
import numpy as np

from sd_core.schedulers.base import Scheduler


def alpha_sigma_from_karras_sigma(sigma):
    """alpha_t = 1 / sqrt(sigma^2 + 1) and sigma_t = sigma alpha_t for Karras' sigma = sigma_t / alpha_t."""
    alpha = 1 / ((sigma ** 2 + 1) ** 0.5)
    return alpha, sigma * alpha


class KarrasSigmaScheduler(Scheduler):
    """Samplers that step in Karras' sigma = sqrt((1 - alpha_bar) / alpha_bar) (Euler, LMS, Heun, DPM++, UniPC)."""
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

    def add_noise_at_start(self, state, x0, noise):
        """x = alpha_t x0 + sigma_t noise at the state's first sigma: the sample DPM-Solver++ and UniPC step on
        (Euler's samplers step on x / alpha_t instead)."""
        alpha_t, sigma_t = alpha_sigma_from_karras_sigma(state.sigmas[state.step_index])
        return (alpha_t * x0 + sigma_t * noise).to(x0.dtype)
