"""What every sampling pipeline shares: seeds, checks, classifier-free guidance, the denoising loop, decoding.

The pipelines (sd_core.pipelines.generate, sd_core.pipelines.dit_sampling) prepare their inputs and a `predict(model_input, t)`
closure, then run the one loop here, `denoise`; a pipeline that changes the latents between steps (inpainting
with an ordinary model puts the known region back) passes an `after_step` hook instead of copying the loop.
"""
import copy
import dataclasses
import threading
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

from sd_core.checkpoints import catalog
from sd_core.models.vae import AutoencoderKL
from sd_core.pipelines import settings
from sd_core.pipelines.image_io import to_pil
from sd_core.pipelines.settings import MAX_SEED
from sd_core.schedulers import DIFFUSERS_CLASS_NAMES, Scheduler

DEFAULT_SCHEDULER = "dpmpp_2m"  # for configs written for a sampler sd_core does not implement
# callback(step, timestep, latents, predicted x0): called after every denoising step.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
# after_step(step, latents) -> latents: a pipeline's change to the latents after each step, before the callback.
AfterStep = Callable[[int, torch.Tensor], torch.Tensor]


@dataclasses.dataclass
class GenerationResult:
    images: list  # PIL images, each carrying its parameters in .info["sd_core"]
    latents: torch.Tensor
    parameters: dict


# ---------------------------------------------------------------------------------------------- helpers


def resolve_seed(seed: int | None) -> int:
    """The seed a run uses: the one given (checked), or a random one for None or -1."""
    checked = settings.seed(seed)
    return settings.random_seed() if checked is None else checked


def scheduler_name(config: dict, name: str | None) -> str:
    """The sampler asked for, or the one the model's config names; a config written for a sampler
    sd_core lacks falls back to DPM-Solver++ 2M, with a warning that says so."""
    if name:
        return name
    class_name = config.get("_class_name")
    if class_name and class_name not in DIFFUSERS_CLASS_NAMES:
        warnings.warn(f"The model's scheduler {class_name} is not implemented in sd_core; sampling with "
                      f"{DEFAULT_SCHEDULER} instead (pass scheduler= to choose another).", stacklevel=3)
    return DIFFUSERS_CLASS_NAMES.get(class_name, DEFAULT_SCHEDULER)


def image_seeds(seed: int, count: int, seed_per_image: bool) -> list[int]:
    """A1111's batch rule: image k of a batch with seed S is drawn from seed S + k (wrapping at 2**32), so it is
    the image a single run with that seed gives. Without seed_per_image, one seed draws the whole batch."""
    return [(seed + k) % (MAX_SEED + 1) for k in range(count)] if seed_per_image else [seed]


def display_name(source) -> str:
    """A model's name for metadata, never a server's path: the catalog's name for a model it lists (the embedded
    ones), the repo id for a hub download (its cache folder is models--owner--name/snapshots/<commit>), else the
    folder's or file's name."""
    source = str(source)
    model = catalog.entry_for(source)
    if model is not None:
        return model.name
    parts = Path(source).parts
    for i, part in enumerate(parts):
        if part.startswith("models--") and i + 1 < len(parts) and parts[i + 1] == "snapshots":
            return part.removeprefix("models--").replace("--", "/")
    return Path(source).name if Path(source).exists() else source


def dtype_of(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def check_size(pipe, height: int, width: int):
    factor = pipe.vae_scale_factor
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value < factor or value % factor:
            raise ValueError(f"{name} must be a positive multiple of {factor}; got {value!r}.")
        if value > 4096:
            raise ValueError(f"{name}={value} is too large (at most 4096).")


def decode(vae: AutoencoderKL, latents: torch.Tensor) -> list:
    """Latents (scaled as the diffusion model sees them) -> 8-bit PIL images. A float16 VAE whose config says
    force_upcast (SDXL's overflows in fp16) decodes in float32, as diffusers' SDXL pipelines do, on a private
    fp32 copy so the shared model is never changed under a concurrent request (diffusers' SD 1.x/2.x pipelines
    decode in fp16 regardless: there sd_core is the more accurate)."""
    if dtype_of(vae) == torch.float16 and vae.config.force_upcast:
        vae, latents = converted_copy(vae, torch.float32), latents.float()
    return to_pil(check_finite(vae.decode(latents / vae.config.scaling_factor), "the VAE's decoded image"))


COPIES = weakref.WeakKeyDictionary()  # shared model -> {(dtype, channels_last): its converted copy}
COPIES_LOCK = threading.Lock()


def converted_copy(model: torch.nn.Module, dtype: torch.dtype, channels_last: bool = False) -> torch.nn.Module:
    """A copy of a shared model in `dtype` (its conv weights in channels_last if asked), never a cast of the model
    itself; made once per model and setting, kept as long as the model lives (previews decode every step, and the
    fast path's pipelines share their bf16 copies)."""
    with COPIES_LOCK:
        copies = COPIES.setdefault(model, {})
        if (dtype, channels_last) not in copies:
            converted = copy.deepcopy(model).to(dtype)
            copies[dtype, channels_last] = converted.to(memory_format=torch.channels_last) if channels_last else converted
        return copies[dtype, channels_last]


def check_finite(tensor: torch.Tensor, stage: str) -> torch.Tensor:
    """`tensor`, unless it holds NaN or infinity: then an error naming the stage, instead of a black image."""
    if not torch.isfinite(tensor).all():
        raise FloatingPointError(
            f"NaN or infinity in {stage}: in float16 the model overflowed (try float32 or bfloat16), or its weights "
            f"hold NaN/inf values (check the checkpoint).")
    return tensor


# ------------------------------------------------------------------------------------ guidance and loop


def guide(uncond: torch.Tensor, cond: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): uncond + scale (cond - uncond). With rescale > 0,
    Lin et al. (2023, eq. 15-16): match the guided prediction's std to cond's, blended by `rescale`."""
    guided = uncond + scale * (cond - uncond)
    if rescale > 0:
        dims = list(range(1, cond.ndim))
        rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
        guided = rescale * rescaled + (1 - rescale) * guided
    return guided


def denoise(sampler: Scheduler, states, x: torch.Tensor, predict: Callable, generators,
            callback: StepCallback | None = None, after_step: AfterStep | None = None) -> torch.Tensor:
    """The sampling loop every pipeline shares: scale the input, predict, step; report each step.

    `states` and `generators` are one of each for the whole batch (diffusers), or lists with one per image
    (a seed per image): the model still sees the whole batch, and each image steps with its own sampler state
    and generator, so a stochastic sampler draws the noise a single run with that image's seed would.
    `after_step(i, x)` returns the latents to go on with (inpainting's blend), before `callback` sees them."""
    states = states if isinstance(states, list) else [states]
    generators = generators if isinstance(generators, list) else [generators]
    for i, t in enumerate(states[0].timesteps):
        output = predict(sampler.scale_model_input(states[0], x), t)
        if len(states) == 1:
            x, x0 = sampler.step(states[0], output, x, generators[0])
        else:
            steps = [sampler.step(state, out, xi, generator) for state, out, xi, generator in
                     zip(states, output.chunk(len(states)), x.chunk(len(states)), generators, strict=True)]
            x, x0 = torch.cat([step[0] for step in steps]), torch.cat([step[1] for step in steps])
        if after_step is not None:
            x = after_step(i, x)
        if callback is not None:
            callback(i, t, x, x0)
    return x


def cut_schedule(sampler: Scheduler, state, denoising_start: float | None = None, denoising_end: float | None = None):
    """The part of a schedule between two fractions of the noise levels, as diffusers' SDXL pipelines cut it
    for an "ensemble of expert denoisers": with the cutoff timestep round(T (1 - fraction)), denoising_end keeps
    the steps at timesteps >= cutoff (the base's high-noise steps), denoising_start the steps below it (the
    refiner's; of a second-order sampler an odd count, so a step's two calls stay together)."""
    for name, value in (("denoising_start", denoising_start), ("denoising_end", denoising_end)):
        if value is not None and not (isinstance(value, float) and 0 < value < 1):
            raise ValueError(f"{name} must be a fraction strictly between 0 and 1; got {value!r}.")
    if denoising_start is not None and denoising_end is not None and denoising_start >= denoising_end:
        raise ValueError(f"denoising_start ({denoising_start}) must be below denoising_end ({denoising_end}).")
    T = sampler.config.num_train_timesteps
    cutoff = lambda fraction: round(T - fraction * T)
    if denoising_start is not None:
        count = int((state.timesteps < cutoff(denoising_start)).sum())
        count += 1 if sampler.order == 2 and count % 2 == 0 else 0
        start = len(state.timesteps) - count
        state = dataclasses.replace(state, timesteps=state.timesteps[start:], step_index=state.step_index + start,
                                    begin_index=state.begin_index + start)
    if denoising_end is not None:
        kept = int((state.timesteps >= cutoff(denoising_end)).sum())
        state = dataclasses.replace(state, timesteps=state.timesteps[:kept])
    if len(state.timesteps) == 0:
        raise ValueError(f"denoising_start={denoising_start} / denoising_end={denoising_end} leave no step to run; "
                         f"move them apart or raise the number of steps.")
    return state
