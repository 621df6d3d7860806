"""Samplers of the probability-flow ODE in Karras et al.'s sigma = sigma_t / alpha_t: Euler and Euler ancestral."""
import numpy as np
import torch

from sd_core.noise import randn_like
from sd_core.schedulers.base import StepOutput, predicted_x0_and_eps, sigma_schedule, spaced_timesteps
from sd_core.schedulers.karras import KarrasSigmaScheduler, alpha_sigma_from_karras_sigma


def to_d(x, sigma, x0):
    """The probability-flow ODE's derivative dx/dsigma = (x - x0) / sigma (Karras et al. 2022, eq. 4)."""
    return (x - x0) / sigma


def ancestral_step(sigma, sigma_next):
    """Split the move to sigma_next into a deterministic part down to sigma_down and fresh noise of size
    sigma_up, with sigma_down^2 + sigma_up^2 = sigma_next^2 (k-diffusion's get_ancestral_step, eta = 1)."""
    sigma_up = (sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2) ** 0.5
    return (sigma_next ** 2 - sigma_up ** 2) ** 0.5, sigma_up


class EulerDiscrete(KarrasSigmaScheduler):
    """Karras et al. (2022)'s Euler method on the probability-flow ODE dx/dsigma = (x - x0) / sigma."""
    name = "euler"
    diffusers_class = "EulerDiscreteScheduler"
    display_name = "Euler"

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
        """x0 + sigma noise: the sample on the scale x / alpha_t these samplers step on."""
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
    diffusers_class = "EulerAncestralDiscreteScheduler"
    display_name = "Euler a"

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


def lagrange_integrals(points, start: float, end: float) -> list:
    """The integral from start to end of each Lagrange basis polynomial l_j over `points` (l_j(points[j]) = 1,
    0 at the others), exactly: antiderivatives of the polynomials, in float64."""
    integrals = []
    for j, point in enumerate(points):
        others = [p for k, p in enumerate(points) if k != j]
        basis = np.polynomial.Polynomial.fromroots(others) if others else np.polynomial.Polynomial([1.0])
        basis = basis / np.prod([point - p for p in others])
        antiderivative = basis.integ()
        integrals.append(float(antiderivative(end) - antiderivative(start)))
    return integrals


class LMSDiscrete(EulerDiscrete):
    """Linear multistep on the probability-flow ODE (Karras et al. 2022, k-diffusion's sample_lms):
    x_next = x + sum_j c_j d_{i-j}, c_j the integral over [sigma_i, sigma_next] of the Lagrange polynomial
    through sigma_i, ..., sigma_{i-order+1} that is 1 at sigma_{i-j}: up to order 4. diffusers integrates
    numerically (scipy.integrate.quad, epsrel 1e-4, float32 integrand); here the integral is exact.
    Like diffusers, the order follows the step index (min(i + 1, 4)), also when image to image starts
    past step 0 with fewer derivatives in the history."""
    name = "lms"
    diffusers_class = "LMSDiscreteScheduler"
    display_name = "LMS"
    max_order = 4

    def final_sigma(self):
        return 0

    def step(self, state, model_output, sample, generator=None):
        i = state.step_index
        sigma, sigma_next = state.sigmas[i], state.sigmas[i + 1]
        state.step_index += 1
        x0 = self.predict_x0(model_output, sample, sigma)
        state.model_outputs = (state.model_outputs + [to_d(sample, sigma, x0)])[-self.max_order:]
        order = min(i + 1, self.max_order)
        points = [state.sigmas[i - k].item() for k in range(order)]
        coefficients = lagrange_integrals(points, sigma.item(), sigma_next.item())
        prev_sample = sample + sum(c * d for c, d in zip(coefficients, reversed(state.model_outputs)))
        return StepOutput(prev_sample, x0)


class HeunDiscrete(EulerDiscrete):
    """Heun's method on the probability-flow ODE (Karras et al. 2022, alg. 1 with gamma = 0): an Euler step to
    sigma_next, then the model at the result, and the step redone from x with the mean of both slopes.
    As in diffusers, the schedule lists every step after the first twice (two model calls), so the shared
    loop runs it unchanged; the last step, to sigma = 0, is Euler's."""
    name = "heun"
    diffusers_class = "HeunDiscreteScheduler"
    display_name = "Heun"
    order = 2
    defaults = {**EulerDiscrete.defaults, "clip_sample": False}

    def final_sigma(self):
        return 0

    def schedule(self, n):
        timesteps, sigmas, init_noise_sigma = super().schedule(n)
        sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
        return torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)]), sigmas, init_noise_sigma

    def predict_x0(self, model_output, sample, sigma):
        x0 = super().predict_x0(model_output, sample, sigma)
        if self.config.clip_sample:
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x0

    def step(self, state, model_output, sample, generator=None):
        i = state.step_index
        state.step_index += 1
        if state.step_start_sample is None:  # predictor: Euler from sigma to sigma_next, slope kept
            sigma, sigma_next = state.sigmas[i], state.sigmas[i + 1]
            x0 = self.predict_x0(model_output, sample, sigma)
            state.stage_sum, state.step_start_sample = to_d(sample, sigma, x0), sample
            return StepOutput(sample + state.stage_sum * (sigma_next - sigma), x0)
        sigma, sigma_next = state.sigmas[i - 1], state.sigmas[i]  # corrector: the model ran at sigma_next
        x0 = self.predict_x0(model_output, sample, sigma_next)
        slope = (state.stage_sum + to_d(sample, sigma_next, x0)) / 2
        start, state.step_start_sample, state.stage_sum = state.step_start_sample, None, 0.0
        return StepOutput(start + slope * (sigma_next - sigma), x0)
