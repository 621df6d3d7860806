"""DPM-Solver++ 2M (Lu et al. 2022): exponential-integrator steps in lambda = log(alpha_t / sigma_t), and its
stochastic form, DPM++ 2M SDE."""
import numpy as np
import torch

from sd_core.noise import randn_tensor
from sd_core.schedulers.base import SamplingState, StepOutput, predicted_x0_and_eps, sigma_schedule, spaced_timesteps
from sd_core.schedulers.karras import KarrasSigmaScheduler, alpha_sigma_from_karras_sigma


def dpm_solver_lambda(sigma):
    """lambda = log(alpha_t / sigma_t), the half log-SNR DPM-Solver integrates over (= -log sigma)."""
    alpha_t, sigma_t = alpha_sigma_from_karras_sigma(sigma)
    return torch.log(alpha_t) - torch.log(sigma_t)


def dpm_solver_x0_blend(x0, previous_x0, h, h_previous, solver_type: str, stochastic: bool = False):
    """DPM-Solver++(2M)'s second-order x0 (Lu et al. 2022, alg. 2): extrapolate along lambda from the
    last two estimates, D = x0 + c (x0 - previous_x0) / r with r = h_previous / h; c = 1/2 (midpoint),
    or -(1/h + 1/(e^-h - 1)) (the 'heun' variant; for the SDE, ((1 - e^-2h) / (-2h) + 1) / (1 - e^-2h))."""
    slope = (1.0 / (h_previous / h)) * (x0 - previous_x0)
    if solver_type == "midpoint":
        c = 0.5
    elif stochastic:
        c = ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0) / (1.0 - torch.exp(-2.0 * h))
    else:
        c = -(1.0 / h + 1.0 / (torch.exp(-h) - 1.0))
    return x0 + c * slope


def dpm_solver_update(x, x0, sigma, sigma_next):
    """The exponential-integrator step in x0 form (Lu et al. 2022, eq. 9): with h = lambda_next - lambda,
    x_next = (sigma_t' / sigma_t) x - alpha_t' (e^-h - 1) x0 (DPM-Solver++(1) is DDIM)."""
    alpha_next, sigma_t_next = alpha_sigma_from_karras_sigma(sigma_next)
    _, sigma_t = alpha_sigma_from_karras_sigma(sigma)
    h = dpm_solver_lambda(sigma_next) - dpm_solver_lambda(sigma)
    return (sigma_t_next / sigma_t) * x - (alpha_next * (torch.exp(-h) - 1.0)) * x0


def dpm_solver_sde_update(x, x0, sigma, sigma_next, noise):
    """SDE-DPM-Solver++ (Lu et al. 2022, sec. 5; k-diffusion's sample_dpmpp_2m_sde): the exact solution of
    the linear part of the reverse SDE, x_next = (sigma_t' / sigma_t) e^-h x + alpha_t' (1 - e^-2h) x0
    + sigma_t' sqrt(1 - e^-2h) z, z ~ N(0, I)."""
    alpha_next, sigma_t_next = alpha_sigma_from_karras_sigma(sigma_next)
    _, sigma_t = alpha_sigma_from_karras_sigma(sigma)
    h = dpm_solver_lambda(sigma_next) - dpm_solver_lambda(sigma)
    return ((sigma_t_next / sigma_t * torch.exp(-h)) * x + (alpha_next * (1 - torch.exp(-2.0 * h))) * x0
            + sigma_t_next * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise)


class DPMSolverMultistep(KarrasSigmaScheduler):
    """DPM-Solver++ (Lu et al. 2022), data-prediction form, first or second order multistep (2M): one
    exponential-integrator step per model call, on an x0 extrapolated from the last two estimates.
    algorithm_type='sde-dpmsolver++' (DPM++ 2M SDE) takes the stochastic step instead, with fresh noise from
    the generator at every step, drawn as diffusers draws it (float32, on the generator's device)."""
    name = "dpmpp_2m"
    diffusers_class = "DPMSolverMultistepScheduler"
    display_name = "DPM++ 2M"

    def __init__(self, config):
        if config.solver_type in ("logrho", "bh1", "bh2"):  # a UniPC config: diffusers maps it so
            config.solver_type = "midpoint"
        super().__init__(config)
        config.require(config.algorithm_type in ("dpmsolver++", "sde-dpmsolver++"),
                       "only algorithm_type 'dpmsolver++' or 'sde-dpmsolver++' is supported.")
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
        stochastic = self.config.algorithm_type == "sde-dpmsolver++"
        x0_used = x0
        if not self.first_order_step(state):
            h = dpm_solver_lambda(sigma_next) - dpm_solver_lambda(sigma)
            h_previous = dpm_solver_lambda(sigma) - dpm_solver_lambda(state.sigmas[i - 1])
            x0_used = dpm_solver_x0_blend(x0, state.model_outputs[-1], h, h_previous, self.config.solver_type,
                                          stochastic)
        state.model_outputs = (state.model_outputs + [x0])[-2:]
        state.step_index += 1
        sample = sample.to(torch.float32)
        if stochastic:
            noise = randn_tensor(x0.shape, generator, torch.float32, model_output.device)
            prev_sample = dpm_solver_sde_update(sample, x0_used, sigma, sigma_next, noise)
        else:
            prev_sample = dpm_solver_update(sample, x0_used, sigma, sigma_next)
        return StepOutput(prev_sample.to(model_output.dtype), x0)
