"""Pipelines: the functions that generate with a model's components.

Each follows diffusers' pipeline step for step (same noise order, same CFG batch order, same casts), so
the same seed gives the same 8-bit image in both stacks. Every pipeline prepares its inputs and a
`predict(model_input, t)` closure, then runs the one shared loop, `sd_core.pipelines.sampling.denoise`:

    pipe = load_pipeline("sd_core/weights/shapes-sd")
    result = text_to_image(pipe, "a big red circle on the left on a gray background", steps=20, seed=7)
    save_image(result.images[0], "out.png")      # PNG text metadata reproduces it

Text conditioning lives in sd_core.pipelines.conditioning, the loop and its helpers in sd_core.pipelines.sampling, inpainting's
inputs in sd_core.pipelines.inpainting, DiT sampling in sd_core.pipelines.dit_sampling; their public names are importable from here.
"""
import dataclasses
import itertools
import math

import numpy as np
import torch
from PIL import Image

from sd_core.checkpoints.pipeline_classes import StableDiffusionPipeline
from sd_core.models.vae import AutoencoderKL
from sd_core.noise import randn_tensor
from sd_core.pipelines import inpainting
from sd_core.pipelines.controlnet import prepare_control
from sd_core.pipelines.conditioning import (  # noqa: F401
    PROMPT_SYNTAXES,
    added_conditioning,
    as_list,
    embed_text,
    embed_weighted_text,
    encode_prompt,
    encode_text,
)
from sd_core.pipelines.dit_sampling import GUIDED_CHANNELS, class_ids, dit_sample  # noqa: F401
from sd_core.pipelines.image_io import crop_to_multiple, image_to_tensor, load_image, psnr, to_pil
from sd_core.pipelines.lora import apply_loras, load_lora
from sd_core.pipelines.metadata import tag
from sd_core.pipelines.offload import execution_device
from sd_core.pipelines.sampling import (GenerationResult, StepCallback, check_finite, check_size, cut_schedule,
                                        decode, denoise, display_name, dtype_of, guide, image_seeds, resolve_seed,
                                        scheduler_name)
from sd_core.pipelines.settings import FAST_FIELDS, GenerationSettings, split_settings
from sd_core.pipelines.textual_inversion import add_embedding, load_embedding
from sd_core.schedulers import make_scheduler

OUTPUT_TYPES = ("pil", "latent")
SDXL_ONLY = ("original_size", "crops_coords_top_left", "target_size", "aesthetic_score", "negative_aesthetic_score",
             "denoising_start", "denoising_end", "high_noise_frac")
APP_ONLY = ("loras", "embeddings", "refiner", "fast") + FAST_FIELDS  # recorded only when used
CONTROL_ONLY = ("controlnets", "guess_mode")  # recorded only with a ControlNet


def customize(pipe, loras=(), embeddings=(), allow_pickle: bool = False) -> list[str]:
    """Apply LoRA files [(path, scale), ...] (merged into the weights, sd_core.pipelines.lora) and bind textual-inversion
    files [path, ...] to their tokens (sd_core.pipelines.textual_inversion); returns the tokens to write in prompts.
    The CLI and the app both customize a loaded pipeline through this."""
    for path, scale in loras:
        if not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"The LoRA scale for {path} must be a finite number; got {scale!r}.")
    if loras:
        apply_loras(pipe.models, [(load_lora(path, allow_pickle), float(scale)) for path, scale in loras])
    return [add_embedding(pipe, load_embedding(path, allow_pickle)) for path in embeddings]




# ------------------------------------------------------------------------------ text / image to image


def prompt_lists(prompt, negative_prompt) -> tuple[list[str], list[str] | None]:
    prompts = as_list(prompt, "prompt")
    negatives = None if negative_prompt is None else as_list(negative_prompt, "negative_prompt")
    if negatives is not None and len(negatives) == 1 and len(prompts) > 1:
        negatives = negatives * len(prompts)
    if negatives is not None and len(negatives) != len(prompts):
        raise ValueError(f"Got {len(negatives)} negative prompts for {len(prompts)} prompts.")
    return prompts, negatives


def start_image(pipe, image, mask):
    """(image, mask, height, width): a PIL image cropped to the VAE's multiple (and its mask, cropped alike), or
    latents given as the image (a base model's output for the refiner), whose size they imply."""
    if isinstance(image, torch.Tensor):
        if mask is not None:
            raise ValueError("Inpainting needs the image itself, not latents.")
        return image, None, image.shape[-2] * pipe.vae_scale_factor, image.shape[-1] * pipe.vae_scale_factor
    pil = load_image(image)
    if mask is not None:
        mask = crop_to_multiple(inpainting.load_mask(mask, pil.size), pipe.vae_scale_factor)
    pil = crop_to_multiple(pil, pipe.vae_scale_factor)
    return pil, mask, pil.height, pil.width


@torch.no_grad()
def generate(pipe: StableDiffusionPipeline, settings: GenerationSettings, *, image=None, mask=None,
             latents: torch.Tensor | None = None, output_type: str = "pil", callback: StepCallback | None = None,
             control=None) -> GenerationResult:
    """Text to image; image to image when `image` is given (then `settings.strength` in [0, 1] says how much to
    change); inpainting when a `mask` is given too (white: paint, black: keep; see `inpaint`). The settings'
    LoRAs and embeddings are the caller's to apply (they are recorded in the metadata); the rest decide the run.

    prompt_syntax "plain" encodes as diffusers does (one 77-token window, brackets are text); "a1111" reads
    AUTOMATIC1111's weights, BREAK and long prompts (sd_core.pipelines.prompt_syntax). clip_skip counts as
    diffusers counts it (0: the family's usual layer; 1: one layer earlier), for the negative prompt as well.

    seed_per_image=False (diffusers' rule, which the parity tests pin) draws the whole batch's noise from one
    generator; True is A1111's rule: image k uses seed + k and is the image a single run with that seed makes.
    Each image's metadata carries its own seed; `result.parameters` carries the first.

    SDXL's ensemble of experts (see `refine`): denoising_end stops at that fraction of the noise schedule, and
    output_type="latent" returns the latents undecoded (no images); `image` may then be those latents, and
    denoising_start resumes there, adding no noise.

    `control`: one (ControlNetModel, image) pair per `settings.controlnets` entry (sd_core.pipelines.controlnet);
    each image is stretched to the output size as diffusers does."""
    s = settings if settings.strength is not None or image is None else settings.replace(strength=0.8)
    prompts, negatives = prompt_lists(s.prompt, s.negative_prompt)
    batch = len(prompts) * s.images_per_prompt
    check_inputs(pipe, image, mask, output_type)
    height, width = s.height, s.width
    if image is not None:
        image, mask, height, width = start_image(pipe, image, mask)
    height, width = height or pipe.default_size, width or pipe.default_size
    check_size(pipe, height, width)
    seed = resolve_seed(s.seed)
    seeds = image_seeds(seed, batch, s.seed_per_image)
    generators = [torch.Generator("cpu").manual_seed(one) for one in seeds]
    name = scheduler_name(pipe.scheduler_config, s.scheduler)
    sampler = make_scheduler(name, pipe.scheduler_config, eta=s.eta)
    cut_strength = s.strength if image is not None and s.denoising_start is None else 1.0
    states = [cut_schedule(sampler, sampler.set_timesteps(s.steps, cut_strength), s.denoising_start,
                           s.denoising_end) for _ in seeds]
    guided = s.guidance_scale > 1
    dtype = dtype_of(pipe.unet)
    control = prepare_control(pipe, s, control, len(prompts), (height, width), guided, len(states[0].timesteps))

    embeddings, pooled = encode_prompt(pipe, prompts, negatives, guided, s.prompt_syntax, s.clip_skip)
    embeddings = embeddings.repeat_interleave(s.images_per_prompt, dim=0).to(dtype)
    pooled = None if pooled is None else pooled.repeat_interleave(s.images_per_prompt, dim=0).to(dtype)
    added = added_conditioning(pipe, pooled, embeddings.shape[0], guided, (height, width), s.original_size,
                               s.crops_coords_top_left, s.target_size, s.aesthetic_score, s.negative_aesthetic_score)
    x, painting = initial_latents(pipe, s, sampler, states, generators, batch, (height, width), image, mask, latents)

    predict = predictor(pipe, s, guided, embeddings, added, painting, control)
    blend = None if painting is None or painting.image_latents is None else \
        lambda i, latents: painting.blend(sampler, states[0], i, latents)
    x = denoise(sampler, states if s.seed_per_image else states[0], x, predict,
                generators if s.seed_per_image else generators[0], callback, blend)
    check_finite(x, "the latents after denoising (UNet)")
    ran = s.replace(prompt=prompts, negative_prompt=negatives, seed=seed, scheduler=name, height=height, width=width,
                    strength=s.strength if image is not None and s.denoising_start is None else None)
    parameters = run_parameters(pipe, ran, inpaint=mask is not None)
    images = tag(decode(pipe.vae, x), parameters, seeds) if output_type == "pil" else []
    return GenerationResult(images, x, parameters)


def predictor(pipe, s: GenerationSettings, guided: bool, embeddings, added, painting, control):
    """The loop's `predict(model_input, t)`: the UNet's prediction, guided, with inpainting's extra channels and
    the ControlNets' residuals for the step (one call per step, so the calls count the steps)."""
    step = itertools.count()

    def predict(model_input, t):
        residuals = {} if control is None else control.residuals(model_input, t, next(step), embeddings, added)
        if painting is not None:
            model_input = painting.model_input(model_input)
        if not guided:
            return pipe.unet(model_input, t, embeddings, added, **residuals)
        uncond, cond = pipe.unet(torch.cat([model_input] * 2), t, embeddings, added, **residuals).chunk(2)
        return guide(uncond, cond, s.guidance_scale, s.guidance_rescale)
    return predict


def check_inputs(pipe, image, mask, output_type: str):
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {OUTPUT_TYPES}; got {output_type!r}.")
    if mask is not None and image is None:
        raise ValueError("A mask needs an image to paint into: give image= (or use inpaint()).")
    if mask is None and pipe.unet.config.in_channels == inpainting.INPAINT_CHANNELS:
        raise ValueError("This is an inpainting model (a 9-channel UNet): give it an image and a mask (inpaint(), "
                         "or --init-image and --mask).")


def initial_latents(pipe, s: GenerationSettings, sampler, states, generators, batch: int, size: tuple, image, mask,
                    latents):
    """The latents the loop starts from (and inpainting's state, else None), each generator drawing as diffusers
    draws: pure noise; given latents; an image encoded (posterior sampled) then noised to the first step; a base
    model's latents for the refiner (noised unless resuming at denoising_start); or inpainting's start."""
    device, dtype = execution_device(pipe.unet), dtype_of(pipe.unet)
    rows = batch // len(generators)
    factor = pipe.vae_scale_factor
    shape = (rows, pipe.vae.config.latent_channels, size[0] // factor, size[1] // factor)
    resume = s.denoising_start is not None
    if mask is not None:  # encoded once; each generator draws as diffusers' inpainting does
        return inpainting.prepare(pipe, sampler, states, image, mask, rows, s.strength, generators, dtype, device)
    if isinstance(image, torch.Tensor):  # latents (a base model's, for the refiner)
        given = image.to(device=device, dtype=dtype)
        given = given if given.shape[0] == batch else given.repeat(batch // given.shape[0], 1, 1, 1)
        return torch.cat([x0 if resume else sampler.add_noise_at_start(state, x0, randn_tensor(shape, g, dtype, device))
                          for x0, g, state in zip(given.chunk(len(generators)), generators, states)]), None
    if image is not None:
        posterior = pipe.vae.encode(image_to_tensor(image, dtype_of(pipe.vae), device))
        x = []
        for generator, state in zip(generators, states):
            x0 = (pipe.vae.config.scaling_factor * posterior.sample(generator)).to(dtype).repeat(rows, 1, 1, 1)
            x.append(x0 if resume else
                     sampler.add_noise_at_start(state, x0, randn_tensor(shape, generator, dtype, device)))
        return torch.cat(x), None
    if latents is not None:
        if tuple(latents.shape) != (batch, *shape[1:]):
            raise ValueError(f"latents must have shape {(batch, *shape[1:])}; got {tuple(latents.shape)}.")
        return latents.to(device=device, dtype=dtype) * states[0].init_noise_sigma, None
    x = torch.cat([randn_tensor(shape, generator, dtype, device) for generator in generators])
    return x * states[0].init_noise_sigma, None


def run_parameters(pipe, ran: GenerationSettings, inpaint: bool = False) -> dict:
    """What a finished run records (PNG metadata, the API's JSON): the settings as they ran (seed drawn, scheduler
    and size resolved), the model's display name and family; SDXL-only fields only where they applied."""
    parameters = {key: value for key, value in ran.to_dict().items()
                  if key not in SDXL_ONLY + APP_ONLY + CONTROL_ONLY}
    parameters.update(model=display_name(pipe.source), family=pipe.family)
    for key in ("loras", "embeddings", "refiner"):
        if getattr(ran, key):
            parameters[key] = ran.to_dict()[key]
    parameters.update(ran.fast_options())  # so PNG Info and share links give the same fast path back
    if ran.controlnets:  # named as the model is, never by a server's path
        parameters.update(controlnets=[[display_name(name), *rest] for name, *rest in ran.controlnets],
                          guess_mode=ran.guess_mode)
    if inpaint:
        parameters["inpaint"] = True
    for key in ("denoising_start", "denoising_end"):
        if getattr(ran, key) is not None:
            parameters[key] = getattr(ran, key)
    if pipe.traits.requires_aesthetics_score:
        parameters.update(aesthetic_score=ran.aesthetic_score, negative_aesthetic_score=ran.negative_aesthetic_score)
    return parameters


def settings_and_inputs(prompt, negative_prompt, options: dict) -> tuple[GenerationSettings, dict]:
    """The keyword API (text_to_image(pipe, prompt, steps=20, ...)) as a record and the inputs beside it."""
    fields, inputs = split_settings(GenerationSettings, options)
    unknown = set(inputs) - {"image", "mask", "latents", "output_type", "callback", "control"}
    if unknown:
        raise TypeError(f"Unknown argument{'s' * (len(unknown) > 1)} {', '.join(sorted(unknown))}.")
    return GenerationSettings(prompt=prompt, negative_prompt=negative_prompt, **fields), inputs


def text_to_image(pipe: StableDiffusionPipeline, prompt, negative_prompt=None, **options) -> GenerationResult:
    """generate() with the settings as keywords (steps=20, seed=7, ...)."""
    if "image" in options:
        raise TypeError("text_to_image takes no image; use image_to_image.")
    settings, inputs = settings_and_inputs(prompt, negative_prompt, options)
    return generate(pipe, settings, **inputs)


def image_to_image(pipe: StableDiffusionPipeline, image, prompt, negative_prompt=None, strength: float = 0.8,
                   **options) -> GenerationResult:
    settings, inputs = settings_and_inputs(prompt, negative_prompt, dict(options, strength=strength))
    return generate(pipe, settings, image=image, **inputs)


def inpaint(pipe: StableDiffusionPipeline, image, mask, prompt, negative_prompt=None, strength: float = 1.0,
            **options) -> GenerationResult:
    """Repaint the white region of `mask` (a grayscale image, binarized at 0.5, of the image's size or resized to
    it) and keep the black one, as diffusers' StableDiffusionInpaintPipeline does: an inpainting model (9-channel
    UNet) sees the mask and the masked image's latents; an ordinary model gets the known region put back, noised
    to the current level, after every step (sd_core.pipelines.inpainting). strength < 1 starts from the noised
    image."""
    settings, inputs = settings_and_inputs(prompt, negative_prompt, dict(options, strength=strength))
    return generate(pipe, settings, image=image, mask=mask, **inputs)


@torch.no_grad()
def refine_run(base: StableDiffusionPipeline, refiner: StableDiffusionPipeline, settings: GenerationSettings,
               callback: StepCallback | None = None) -> GenerationResult:
    """SDXL's ensemble of expert denoisers: the base runs the first `high_noise_frac` of the noise schedule
    (denoising_end) and hands its latents to the refiner, which runs the rest (denoising_start) with its own
    conditioning (aesthetic scores). Both sample `steps` over the whole schedule and each draws from a generator
    seeded with `seed`, as two diffusers calls given `torch.Generator().manual_seed(seed)` each do."""
    if not refiner.traits.requires_aesthetics_score and refiner.family != base.family:
        raise ValueError(f"The refiner must be an SDXL refiner or a model of the base's family; got {refiner.family}.")
    settings = settings.replace(seed=resolve_seed(settings.seed))
    first = generate(base, settings.replace(denoising_end=settings.high_noise_frac), output_type="latent",
                     callback=callback)
    second = generate(refiner, settings.replace(denoising_start=settings.high_noise_frac, height=None, width=None),
                      image=first.latents, output_type="latent", callback=callback)
    parameters = {**second.parameters, "model": first.parameters["model"], "refiner": second.parameters["model"],
                  "high_noise_frac": settings.high_noise_frac}
    seeds = image_seeds(settings.seed, len(second.latents), settings.seed_per_image)
    return GenerationResult(tag(decode(refiner.vae, second.latents), parameters, seeds), second.latents, parameters)


def refine(base: StableDiffusionPipeline, refiner: StableDiffusionPipeline, prompt, negative_prompt=None, *,
           high_noise_frac: float = 0.8, steps: int = 40, **options) -> GenerationResult:
    """refine_run() with the settings as keywords."""
    settings, inputs = settings_and_inputs(prompt, negative_prompt,
                                           dict(options, high_noise_frac=high_noise_frac, steps=steps))
    if set(inputs) - {"callback"}:
        raise TypeError(f"refine takes no {', '.join(sorted(set(inputs) - {'callback'}))}.")
    return refine_run(base, refiner, settings, **inputs)


def preview(pipe, x0: torch.Tensor, size: int = 128) -> Image.Image:
    """A small picture of a predicted x0 (latents), decoded by the VAE, for progress and trajectory views."""
    with torch.no_grad():
        image = decode(pipe.vae, x0[:1].to(dtype_of(pipe.vae)))[0]
    image.thumbnail((size, size))
    return image


# ----------------------------------------------------------------------------------------------- VAE


@dataclasses.dataclass
class RoundTrip:
    original: Image.Image  # the input after conversion and cropping
    reconstruction: Image.Image
    difference: Image.Image  # |original - reconstruction|, amplified
    psnr: float  # dB, on the 8-bit images
    latents: torch.Tensor  # the (scaled) latents that were decoded
    latent_channels: list  # one grayscale image per latent channel
    mean: torch.Tensor
    std: torch.Tensor


@torch.no_grad()
def vae_roundtrip(vae: AutoencoderKL, image, sample: bool = False, seed: int | None = None,
                  difference_gain: float = 4.0) -> RoundTrip:
    """image -> posterior (mean/std) -> mode or a sample -> decoded image. Any input size: centre-cropped
    to a multiple of the VAE's downscale factor; RGBA/grayscale/palette converted, EXIF orientation applied."""
    image = crop_to_multiple(load_image(image), vae.downscale_factor)
    device = execution_device(vae)
    posterior = vae.encode(image_to_tensor(image, dtype_of(vae), device))
    z = posterior.sample(torch.Generator("cpu").manual_seed(resolve_seed(seed))) if sample else posterior.mode()
    reconstruction = to_pil(vae.decode(z))[0]
    difference = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(reconstruction, dtype=np.int16))
    difference = Image.fromarray(np.clip(difference * difference_gain, 0, 255).astype(np.uint8))
    channels = []
    for channel in z[0].float().cpu():
        low, high = channel.min(), channel.max()
        scaled = ((channel - low) / (high - low).clamp_min(1e-8) * 255).round().byte().numpy()
        channels.append(Image.fromarray(scaled, mode="L"))
    return RoundTrip(image, reconstruction, difference, psnr(image, reconstruction), z * vae.config.scaling_factor,
                     channels, posterior.mean, posterior.std)


