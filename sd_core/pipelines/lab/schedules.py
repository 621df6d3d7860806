"""Noise schedules side by side: for each sampler, timestep spacing, Karras on or off and a step count, the noise
level of every model call (Karras et al.'s sigma = sigma_t / alpha_t, and log-SNR = -2 log sigma), read from
sd_core's own samplers (make_scheduler + set_timesteps) and drawn on one plot.

    rows = schedules(pipe.scheduler_config, [Schedule("euler", 20), Schedule("euler", 20, karras=True)])
    plot(rows, "log_snr")
    marked_trajectory(pipe, GenerationSettings(prompt="a big red circle ...", steps=10)).image   # x0, each sigma
"""
import dataclasses

import numpy as np

from sd_core.pipelines.generate import generate, preview
from sd_core.pipelines.lab.drawing import labelled_grid, line_plot, strip
from sd_core.pipelines.sampling import scheduler_name
from sd_core.pipelines.settings import GenerationSettings, one_of, whole_number
from sd_core.schedulers import SCHEDULER_NAMES, TIMESTEP_SPACINGS, make_scheduler

MAX_SCHEDULES, MAX_STEPS = 8, 1000
MAX_TRAJECTORY_STEPS, TRAJECTORY_COLUMNS = 50, 5  # five to a row: legible in the app's column
QUANTITIES = {"sigma": "sigma (= sigma_t / alpha_t)", "log_snr": "log-SNR (= -2 log sigma)"}


@dataclasses.dataclass(frozen=True)
class Schedule:
    sampler: str
    steps: int
    spacing: str | None = None  # None: the config's own
    karras: bool = False

    def __post_init__(self):
        one_of(self.sampler, "sampler", SCHEDULER_NAMES)
        whole_number(self.steps, "steps", 1, MAX_STEPS)
        if self.spacing is not None:
            one_of(self.spacing, "spacing", TIMESTEP_SPACINGS)

    @property
    def name(self) -> str:
        parts = [self.sampler, f"{self.steps} steps"] + ([self.spacing] if self.spacing else []) + \
            (["Karras"] if self.karras else [])
        return ", ".join(parts)


@dataclasses.dataclass
class NoiseLevels:
    schedule: Schedule
    timesteps: np.ndarray  # the model's timestep at each call
    sigma: np.ndarray  # the noise level at each call

    @property
    def log_snr(self) -> np.ndarray:
        return -2 * np.log(self.sigma)


def noise_levels(scheduler_config: dict, schedule: Schedule) -> NoiseLevels:
    """The noise level of every model call of one schedule: the sampler's own sigmas where it walks in sigma
    (Euler, DPM-Solver++, Heun, LMS), else sigma of each timestep's alpha_bar (DDIM, DDPM, PNDM, UniPC, LCM)."""
    options = {"use_karras_sigmas": schedule.karras}
    if schedule.spacing is not None:
        options["timestep_spacing"] = schedule.spacing
    sampler = make_scheduler(schedule.sampler, {**scheduler_config, **options})
    state = sampler.set_timesteps(schedule.steps)
    if schedule.karras and state.sigmas is None:
        raise ValueError(f"{schedule.sampler} steps through timesteps, not sigmas, so it has no Karras schedule; "
                         f"Karras applies to the sigma samplers (euler, dpmpp_2m, heun, lms).")
    timesteps = state.timesteps.double().numpy()
    if state.sigmas is not None:
        sigma = state.sigmas.double().numpy()[:len(timesteps)]
    else:
        alpha_bar = sampler.alphas_cumprod.double().numpy()[timesteps.round().astype(int)]
        sigma = np.sqrt((1 - alpha_bar) / alpha_bar)
    return NoiseLevels(schedule, timesteps, sigma)


def schedules(scheduler_config: dict, wanted: list[Schedule]) -> list[NoiseLevels]:
    if not 1 <= len(wanted) <= MAX_SCHEDULES:
        raise ValueError(f"Plot 1 to {MAX_SCHEDULES} schedules; got {len(wanted)}.")
    return [noise_levels(scheduler_config, schedule) for schedule in wanted]


def plot(rows: list[NoiseLevels], quantity: str = "log_snr"):
    """One line per schedule: `quantity` ("sigma" on a log10 scale, or "log_snr") against the model call."""
    one_of(quantity, "quantity", list(QUANTITIES))
    series = {row.schedule.name: (np.log10(row.sigma) if quantity == "sigma" else row.log_snr).tolist()
              for row in rows}
    label = "log10 sigma" if quantity == "sigma" else "log-SNR"
    return line_plot(series, f"{QUANTITIES[quantity]} at each model call", "model call", label)


@dataclasses.dataclass
class Trajectory:
    frames: list  # the x0 estimate (PIL) after each model call
    levels: NoiseLevels  # the noise level each call ran at

    @property
    def captions(self) -> list[str]:
        return [f"call {i + 1}: sigma {sigma:.3g}, log-SNR {log_snr:.2f}"
                for i, (sigma, log_snr) in enumerate(zip(self.levels.sigma, self.levels.log_snr))]

    @property
    def image(self):
        """The frames TRAJECTORY_COLUMNS to a row, each captioned with its noise level."""
        cells = [strip([frame], [caption]) for frame, caption in zip(self.frames, self.captions)]
        schedule = self.levels.schedule
        return labelled_grid(cells, min(TRAJECTORY_COLUMNS, len(cells)), [], [], f"{schedule.sampler}, "
                             f"{schedule.steps} steps: the x0 estimate after each model call and the noise level "
                             f"it ran at")


def marked_trajectory(pipe, settings: GenerationSettings, callback=None) -> Trajectory:
    """One picture's denoising trajectory: the x0 estimate after every model call, each marked with the noise level
    that call ran at (its point on the schedules plot: noise_levels of the same sampler and steps)."""
    whole_number(settings.steps, "steps", 1, MAX_TRAJECTORY_STEPS)
    if settings.strength is not None:
        raise ValueError("The trajectory view follows text to image from pure noise: leave strength unset.")
    sampler = scheduler_name(pipe.scheduler_config, settings.scheduler)
    levels = noise_levels(pipe.scheduler_config, Schedule(sampler, settings.steps))
    frames = []

    def collect(step, timestep, latents, x0):
        frames.append(preview(pipe, x0))
        if callback is not None:
            callback(step, timestep, latents, x0)
    generate(pipe, settings.replace(images_per_prompt=1), callback=collect)
    if len(frames) != len(levels.sigma):
        raise ValueError(f"{sampler} made {len(frames)} model calls but its schedule lists {len(levels.sigma)}.")
    return Trajectory(frames, levels)
