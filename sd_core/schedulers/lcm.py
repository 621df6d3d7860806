"""LCM (Luo et al. 2023, Latent Consistency Models): multistep consistency sampling. At each step the
consistency function maps x_t straight to a clean estimate, and the next step starts from that estimate
noised afresh to the next, lower timestep."""
import numpy as np
import torch

from sd_core.noise import randn_tensor
from sd_core.schedulers.ddpm import DDPM
from sd_core.schedulers.base import StepOutput


def consistency_boundary_scalings(t, timestep_scaling: float, sigma_data: float = 0.5):
    """(c_skip, c_out) of the consistency function f(x, t) = c_skip(t) x + c_out(t) x0(x, t) (Song et al.
    2023, eq. 7; LCM's discrete form on s = timestep_scaling * t): c_skip = sigma_data^2 / (s^2 + sigma_data^2),
    c_out = s / sqrt(s^2 + sigma_data^2), so f(x, 0) = x (the boundary condition)."""
    s = t * timestep_scaling
    return sigma_data ** 2 / (s ** 2 + sigma_data ** 2), s / (s ** 2 + sigma_data ** 2) ** 0.5


class LCM(DDPM):
    """Latent Consistency Model sampling (Luo et al. 2023, alg. 1). The timesteps are n of the distillation
    grid t_j = j (T // original_inference_steps) - 1, j = 1..original_inference_steps, taken at evenly spaced
    indices from the top (timestep_spacing and steps_offset play no part, as in diffusers). Each step:
    x0 from the model (clipped when the config says so), the consistency estimate
    denoised = c_skip x_t + c_out x0, then, except after the last step, x_prev = sqrt(alpha_bar_prev) denoised
    + sqrt(1 - alpha_bar_prev) z with z from the generator. pred_original_sample is `denoised` (what an LCM
    pipeline decodes; after the last step it is the sample)."""
    name = "lcm"
    diffusers_class = "LCMScheduler"
    display_name = "LCM"
    defaults = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False}

    def schedule(self, n):
        c = self.config
        T, original = c.num_train_timesteps, c.original_inference_steps
        if not isinstance(original, int) or not 1 <= original <= T:
            raise ValueError(f"original_inference_steps={original!r} must be a whole number in [1, {T}] "
                             f"(the training timesteps).")
        if n > original:
            raise ValueError(f"LCM takes its steps from a grid of original_inference_steps={original}; "
                             f"{n} steps is too many: use at most {original} (LCMs are made for 2-8).")
        grid = (np.arange(1, original + 1) * (T // original) - 1)[::-1].copy()
        indices = np.floor(np.linspace(0, len(grid), num=n, endpoint=False)).astype(np.int64)
        return torch.from_numpy(grid[indices]).to(torch.long), None, 1.0

    def step(self, state, model_output, sample, generator=None):
        i = state.step_index - state.begin_index
        t = state.timesteps[i]
        is_last = state.step_index == state.num_inference_steps - 1
        state.step_index += 1
        x0, _ = self.predict(self.noise_prediction(model_output, sample), sample, t)
        c_skip, c_out = consistency_boundary_scalings(t, self.config.timestep_scaling)
        denoised = c_out * x0 + c_skip * sample
        if is_last:
            return StepOutput(denoised, denoised)
        alpha_bar_prev = self.alpha_bar(state.timesteps[i + 1])
        noise = randn_tensor(x0.shape, generator, denoised.dtype, model_output.device)
        return StepOutput(alpha_bar_prev.sqrt() * denoised + (1 - alpha_bar_prev).sqrt() * noise, denoised)
