"""PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"): classical ODE
methods (Runge-Kutta, linear multistep) run on the noise, with DDIM's step as the transfer between
timesteps. Its linear multistep form, PLMS, is the sampler Stable Diffusion 1.x/2.x configs name."""
import numpy as np
import torch

from sd_core.schedulers.base import Scheduler, StepOutput, checked_timesteps, predicted_x0_and_eps


def pndm_transfer(x_t, eps, alpha_bar, alpha_bar_prev):
    """PNDM's transfer phi(x_t, eps, t, t_prev) (Liu et al. 2022, eq. 9), DDIM's deterministic step:
    x_prev = sqrt(a' / a) x_t - (a' - a) eps / (a sqrt(1 - a') + sqrt(a (1 - a) a')), a = alpha_bar_t,
    a' = alpha_bar_prev."""
    denominator = alpha_bar * (1 - alpha_bar_prev) ** 0.5 + (alpha_bar * (1 - alpha_bar) * alpha_bar_prev) ** 0.5
    return (alpha_bar_prev / alpha_bar) ** 0.5 * x_t - (alpha_bar_prev - alpha_bar) * eps / denominator


def adams_bashforth(history: list):
    """The linear multistep eps (Liu et al. 2022, eq. 12) from the last 1-4 model outputs, newest last:
    e, (3 e - e_1) / 2, (23 e - 16 e_1 + 5 e_2) / 12, (55 e - 59 e_1 + 37 e_2 - 9 e_3) / 24."""
    e = history[::-1]
    if len(e) == 1:
        return e[0]
    if len(e) == 2:
        return (3 * e[0] - e[1]) / 2
    if len(e) == 3:
        return (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
    return (1 / 24) * (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3])


class PNDM(Scheduler):
    """Pseudo numerical methods: x_prev = phi(x_t, e', t, t_prev) where e' combines model outputs like a
    classical ODE solver. PLMS (skip_prk_steps=True): e' is Adams-Bashforth of the last four outputs; its
    first step is taken twice, the second time with the mean of the outputs at both ends (a pseudo
    improved Euler start; the schedule repeats the second timestep for it, as diffusers' does).
    PRK (skip_prk_steps=False): the first three steps are pseudo Runge-Kutta (four calls each, on half
    steps), then PLMS. Like diffusers, every step moves T // n timesteps whatever the spacing."""
    name = "pndm"
    diffusers_class = "PNDMScheduler"
    display_name = "PLMS"
    defaults = {"set_alpha_to_one": False}
    honours_set_alpha_to_one = True

    def __init__(self, config):
        super().__init__(config)
        config.require(config.prediction_type in ("epsilon", "v_prediction"),
                       f"PNDM supports prediction_type 'epsilon' or 'v_prediction', not {config.prediction_type!r}.")

    def schedule(self, n):
        c = self.config
        steps = checked_timesteps(c, n)[::-1]  # ascending, as diffusers builds them
        if c.skip_prk_steps:  # the second timestep twice: the first step is redone from x_T
            timesteps = np.concatenate([steps[:-1], steps[-2:-1], steps[-1:]])[::-1]
        else:
            if n < 4:
                raise ValueError(f"PNDM's Runge-Kutta start (skip_prk_steps=False) needs at least 4 steps; got {n}.")
            half = c.num_train_timesteps // n // 2  # each Runge-Kutta step's midpoint
            prk = steps[-4:].repeat(2) + np.tile(np.array([0, half]), 4)
            timesteps = np.concatenate([prk[:-1].repeat(2)[1:-1][::-1], steps[:-3][::-1]])
        return torch.from_numpy(timesteps.astype(np.int64)), None, 1.0

    def set_timesteps(self, num_inference_steps, strength=1.0):
        state = super().set_timesteps(num_inference_steps, strength)
        if strength < 1.0 and not self.config.skip_prk_steps:
            raise ValueError("PNDM's Runge-Kutta start (skip_prk_steps=False) runs from the first step only; "
                             "use skip_prk_steps=True (PLMS) for image to image.")
        return state

    def transfer(self, x_t, model_output, t: int, t_prev: int) -> StepOutput:
        """phi from t to t_prev, with the (combined) model output read as eps or v at t."""
        alpha_bar = self.alpha_bar(t)
        x0, eps = predicted_x0_and_eps(model_output, x_t, alpha_bar ** 0.5, (1 - alpha_bar) ** 0.5,
                                       self.config.prediction_type)
        return StepOutput(pndm_transfer(x_t, eps, alpha_bar, self.alpha_bar(t_prev)), x0)

    def runge_kutta_steps(self) -> int:
        return 0 if self.config.skip_prk_steps else 12

    def step(self, state, model_output, sample, generator=None):
        i = state.step_index - state.begin_index  # calls so far in this run
        t = int(state.timesteps[i])
        model_output = self.noise_prediction(model_output, sample)
        state.step_index += 1
        if i < self.runge_kutta_steps():
            return self.runge_kutta_stage(state, i, t, model_output, sample)
        delta = self.config.num_train_timesteps // state.num_inference_steps
        if i == 1:  # redo the first step from x_T with the mean of the outputs at both of its ends
            output = (model_output + state.model_outputs[-1]) / 2
            sample, state.step_start_sample = state.step_start_sample, None
            return self.transfer(sample, output, t + delta, t)
        state.model_outputs = state.model_outputs[-3:] + [model_output]
        if i == 0:
            state.step_start_sample = sample
        return self.transfer(sample, adams_bashforth(state.model_outputs), t, t - delta)

    def runge_kutta_stage(self, state, i, t, model_output, sample):
        """Stage i % 4 of pseudo RK4 (Liu et al. 2022, eq. 13): stages 1-3 transfer x_t by a half, half, whole
        step with their own output; the fourth with e' = (e1 + 2 e2 + 2 e3 + e4) / 6."""
        stage, t_start = i % 4, int(state.timesteps[i // 4 * 4])
        t_prev = t - (0 if i % 2 else self.config.num_train_timesteps // state.num_inference_steps // 2)
        if stage == 0:
            state.stage_sum = 1 / 6 * model_output
            state.model_outputs = state.model_outputs + [model_output]
            state.step_start_sample = sample
        elif stage in (1, 2):
            state.stage_sum = state.stage_sum + 1 / 3 * model_output
        else:
            model_output, state.stage_sum = state.stage_sum + 1 / 6 * model_output, 0.0
        return self.transfer(state.step_start_sample, model_output, t_start, t_prev)
