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
from sd_core.schedulers.base import (PREDICTION_TYPES, TIMESTEP_SPACINGS, SamplingState, Scheduler, SchedulerConfig, StepOutput,
                   karras_sigmas, make_betas, predicted_x0_and_eps, sigma_schedule, spaced_timesteps)
from sd_core.schedulers.ddpm import DDIM, DDPM
from sd_core.schedulers.dpm_solver import DPMSolverMultistep
from sd_core.schedulers.euler import EulerAncestral, EulerDiscrete, HeunDiscrete, LMSDiscrete
from sd_core.schedulers.lcm import LCM
from sd_core.schedulers.pndm import PNDM
from sd_core.schedulers.unipc import UniPCMultistep

__all__ = ["PREDICTION_TYPES", "TIMESTEP_SPACINGS", "SamplingState", "Scheduler", "SchedulerConfig", "StepOutput",
           "karras_sigmas", "make_betas", "predicted_x0_and_eps", "sigma_schedule", "spaced_timesteps", "DDIM", "DDPM",
           "DPMSolverMultistep", "EulerAncestral", "EulerDiscrete", "HeunDiscrete", "LMSDiscrete", "PNDM",
           "UniPCMultistep", "LCM", "SAMPLERS", "SCHEDULERS", "DIFFUSERS_CLASS_NAMES", "VARIANTS",
           "SCHEDULER_NAMES", "DISPLAY_NAMES", "make_scheduler"]

SAMPLERS = (DDPM, DDIM, EulerDiscrete, EulerAncestral, DPMSolverMultistep, PNDM, LMSDiscrete, HeunDiscrete,
            UniPCMultistep, LCM)  # a new sampler: a Scheduler subclass with its three names, listed here
SCHEDULERS = {cls.name: cls for cls in SAMPLERS}
DIFFUSERS_CLASS_NAMES = {cls.diffusers_class: cls.name for cls in SAMPLERS}
# Named variants of a sampler (the names A1111/ComfyUI users know): name -> (sampler, config overrides, display).
VARIANTS = {"dpmpp_2m_karras": ("dpmpp_2m", {"use_karras_sigmas": True}, "DPM++ 2M Karras"),
            "euler_karras": ("euler", {"use_karras_sigmas": True}, "Euler Karras"),
            "dpmpp_2m_sde": ("dpmpp_2m", {"algorithm_type": "sde-dpmsolver++"}, "DPM++ 2M SDE"),
            "dpmpp_2m_sde_karras": ("dpmpp_2m", {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
                                    "DPM++ 2M SDE Karras")}
SCHEDULER_NAMES = sorted([*SCHEDULERS, *VARIANTS])
DISPLAY_NAMES = {**{cls.name: cls.display_name for cls in SAMPLERS},
                 **{name: display for name, (_, _, display) in VARIANTS.items()}}


def make_scheduler(name: str, config: dict | None = None, **options) -> Scheduler:
    """A sampler by name (see SCHEDULER_NAMES) from a diffusers scheduler config (e.g. a model's
    scheduler_config.json, whatever scheduler class it was written for); `options` are sampler inputs
    beyond the config (DDIM's eta), ignored by samplers that have no such input."""
    config = dict(config or {})
    name, overrides, _ = VARIANTS.get(name, (name, {}, None))
    if name not in SCHEDULERS:
        raise ValueError(f"Unknown scheduler {name!r}; choose one of {SCHEDULER_NAMES}.")
    return SCHEDULERS[name].from_config({**config, **overrides}, **options)
