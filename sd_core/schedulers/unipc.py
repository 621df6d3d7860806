"""UniPC (Zhao et al. 2023): a multistep predictor (UniP) and a corrector (UniC) for the diffusion ODE in
lambda = log(alpha_t / sigma_t), data-prediction (x0) form, B(h) = h (bh1) or e^h - 1 (bh2).

With h = lambda_t - lambda_s0 from the current point s0 to the next t, hh = -h, and the earlier points s_m at
r_m = (lambda_{s_m} - lambda_s0) / h, both updates are the DPM-Solver++(1) step plus a correction from the
divided differences D_m = (x0_{s_m} - x0_s0) / r_m (Zhao et al. 2023, alg. 1-2, eqs. 8-9):

    x_t = (sigma_t / sigma_s0) x_s0 - alpha_t (e^hh - 1) x0_s0 - alpha_t B(h) sum_m rho_m D_m

UniP-p uses the p - 1 earlier estimates; UniC-p corrects the previous step once the model has been run at its
result, adding the new estimate x0_t as the point r = 1 (so its order is p + 1 at no extra model call). The
rho solve R_p(h) rho = g_p(h) / B(h), R_p = [r_m^(k-1)], g_k = k! h phi_{k+1}(hh) (phi the exponential
integrator's phi functions) is in `unipc_rhos`.
"""
import numpy as np
import torch

from sd_core.schedulers.base import StepOutput, predicted_x0_and_eps, sigma_schedule, spaced_timesteps
from sd_core.schedulers.dpm_solver import dpm_solver_lambda
from sd_core.schedulers.karras import KarrasSigmaScheduler, alpha_sigma_from_karras_sigma


def unipc_rhos(rks: list, hh, order: int, solver_type: str, corrector: bool):
    """(rho, B(h)): the weights of the divided differences. R[k-1, m] = r_m^(k-1) over the points r_1..r_{p-1}
    and (for UniC) r = 1; b_k = k! h phi_{k+1}(hh) / B(h), with h phi_1 = e^hh - 1 and the recursion
    h phi_{k+1} = h phi_k / hh - 1 / k!. As the paper's code (and diffusers) does, UniP-2 and UniC-1 take
    rho = 1/2 instead of the solve (their B(h) makes the exact weight 1/2 + O(h))."""
    B_h = hh if solver_type == "bh1" else torch.expm1(hh)
    rks = torch.stack(rks + [torch.ones(())])
    h_phi_k, factorial = torch.expm1(hh) / hh - 1, 1
    R, b = [], []
    for k in range(1, order + 1):
        R.append(torch.pow(rks, k - 1))
        b.append(h_phi_k * factorial / B_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    R, b = torch.stack(R), torch.stack(b)
    if corrector:
        return (torch.ones(1) * 0.5 if order == 1 else torch.linalg.solve(R, b)), B_h
    if order == 1:  # DPM-Solver++(1): no earlier estimate to correct with
        return torch.ones(0), B_h
    return (torch.ones(1) * 0.5 if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])), B_h


def unipc_update(x, x0s, sigmas, sigma_next, order: int, solver_type: str, x0_next=None):
    """One UniPC update from sigmas[0] (= s0, with x at s0) to sigma_next, x0s[m] the estimate at sigmas[m]
    (newest first). UniP-order without x0_next; UniC-order with the estimate x0_next at sigma_next."""
    alpha_t, sigma_t = alpha_sigma_from_karras_sigma(sigma_next)
    _, sigma_s0 = alpha_sigma_from_karras_sigma(sigmas[0])
    h = dpm_solver_lambda(sigma_next) - dpm_solver_lambda(sigmas[0])
    hh = -h
    rks = [(dpm_solver_lambda(sigmas[m]) - dpm_solver_lambda(sigmas[0])) / h for m in range(1, order)]
    differences = [(x0s[m] - x0s[0]) / rk for m, rk in zip(range(1, order), rks)]
    rhos, B_h = unipc_rhos(rks, hh, order, solver_type, corrector=x0_next is not None)
    rhos = rhos.to(x.dtype)
    x_next = sigma_t / sigma_s0 * x - alpha_t * torch.expm1(hh) * x0s[0]  # DPM-Solver++(1)
    if order == 1 and x0_next is None:
        # Nothing to correct with. diffusers still adds alpha_t B(h) * 0, which is NaN for bh1 on the last
        # step to sigma = 0 (B(h) = -h = -inf); here that step gives x0, as bh2 does in both.
        return x_next.to(x.dtype)
    correction = sum(rho * d for rho, d in zip(rhos, differences))
    if x0_next is not None:
        correction = correction + rhos[-1] * (x0_next - x0s[0])
    return (x_next - alpha_t * B_h * correction).to(x.dtype)


class UniPCMultistep(KarrasSigmaScheduler):
    """UniPC multistep (predict_x0, bh1/bh2, any solver_order): at each step the model's x0 first corrects the
    previous step's result (UniC, unless that step is in disable_corrector), then UniP steps on from the
    corrected sample. The order warms up (1, 2, ... per step run) and, with lower_order_final, falls to the
    steps left at the end. The model is never run on the corrected sample: its x0 comes from the uncorrected."""
    name = "unipc"
    diffusers_class = "UniPCMultistepScheduler"
    display_name = "UniPC"
    defaults = {**KarrasSigmaScheduler.defaults, "solver_type": "bh2"}

    def __init__(self, config):
        if config.solver_type in ("midpoint", "heun", "logrho"):  # a DPM-Solver config: diffusers maps it so
            config.solver_type = "bh2"
        super().__init__(config)
        config.require(config.solver_type in ("bh1", "bh2"), "solver_type must be 'bh1' or 'bh2' for UniPC.")
        config.require(config.predict_x0, "only predict_x0=True (UniPC's data-prediction form) is supported.")
        config.require(isinstance(config.solver_order, int) and config.solver_order >= 1,
                       "solver_order must be a positive integer.")

    def schedule(self, n):
        c = self.config
        timesteps = spaced_timesteps(c, n, drop_final=True)
        train_sigmas = self.train_sigmas()
        sigmas, timesteps = sigma_schedule(c, timesteps, train_sigmas, self.karras(),
                                           (train_sigmas[0].item(), train_sigmas[-1].item()))
        # Unlike DPM-Solver++, the Karras timesteps are always rounded and sigma_min is the last Karras sigma.
        final = sigmas[-1] if self.karras() and c.final_sigmas_type == "sigma_min" else self.final_sigma()
        timesteps = timesteps.round() if self.karras() else timesteps
        sigmas = torch.from_numpy(np.concatenate([sigmas, [final]]).astype(np.float32))
        return torch.from_numpy(timesteps).to(torch.int64), sigmas, 1.0

    def order_at(self, state, i: int) -> int:
        """The predictor's order at schedule index i: solver_order, capped by the steps left (lower_order_final)
        and by the steps run so far plus one (the warm-up)."""
        c = self.config
        order = min(c.solver_order, len(state.sigmas) - 1 - i) if c.lower_order_final else c.solver_order
        return min(order, min(i - state.begin_index, c.solver_order) + 1)

    def step(self, state, model_output, sample, generator=None):
        c = self.config
        i = state.step_index
        alpha_t, sigma_t = alpha_sigma_from_karras_sigma(state.sigmas[i])
        x0, _ = predicted_x0_and_eps(self.noise_prediction(model_output, sample), sample, alpha_t, sigma_t,
                                     c.prediction_type)
        history = state.model_outputs[::-1]  # newest first
        if i > state.begin_index and i - 1 not in c.disable_corrector:  # UniC on the previous step
            previous = self.order_at(state, i - 1)
            sigmas = [state.sigmas[i - 1 - m] for m in range(previous)]
            sample = unipc_update(state.step_start_sample, history, sigmas, state.sigmas[i], previous, c.solver_type,
                                  x0_next=x0)
        state.model_outputs = (state.model_outputs + [x0])[-c.solver_order:]
        state.step_start_sample = sample
        state.step_index += 1
        order = self.order_at(state, i)
        prev_sample = unipc_update(sample, [x0] + history, [state.sigmas[i - m] for m in range(order)],
                                   state.sigmas[i + 1], order, c.solver_type)
        return StepOutput(prev_sample, x0)
