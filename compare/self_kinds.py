"""The comparisons of sd_core against itself under one changed choice, on the same weights and noise: DiT timestep
frequencies (dit_timestep_semantics), fp32 against bf16 or fp16 (precision), math attention against SDPA (attention),
and the fast path against the parity path (fast_path). Run them through compare.kinds.run_comparison."""
import dataclasses

import numpy as np
import torch
from PIL import Image

from sd_core.models.dit import DiTTransformer2DModel
from sd_core.fast.pipeline import make_fast
from sd_core.models.layers import set_attention_backend
from sd_core.pipelines.generate import dit_sample, image_to_image, text_to_image

from .parity import probe_conditioning
from .common import (OutputRecorder, cast_pipeline, check_family, dit_probe, dit_settings, image_stage_summary, load,
                     sd_settings, step_stages)
from . import measure
from .parity import TOLERANCE, UNetRecorder, compare_images, compare_tensors, difference_caption, difference_map, first_divergence
from .report import Report, standard_plots

@dataclasses.dataclass
class Trace:
    predictions: list  # the denoiser's output at every call
    latents: list  # after every step
    images: np.ndarray  # (batch, H, W, 3) uint8
    context: torch.Tensor | None  # the UNet's text input (None for DiT)


@torch.no_grad()
def sd_core_trace(pipe, s: dict) -> Trace:
    """One sd_core run (text/image to image, or DiT) with every step's prediction and latents recorded."""
    latents = []

    def callback(i, t, x, x0):
        latents.append(x.float().clone())
    if pipe.traits.denoiser == "transformer":
        recorder = OutputRecorder(pipe.transformer)
        try:
            result = dit_sample(pipe, s["class_labels"], guidance_scale=s["guidance_scale"], steps=s["steps"],
                                scheduler=s["scheduler"], seed=s["seed"], guided_channels=s["guided_channels"],
                                callback=callback)
        finally:
            recorder.remove()
        outputs, context = recorder.outputs, None
    else:
        recorder = UNetRecorder(pipe.unet)
        common = dict(steps=s["steps"], guidance_scale=s["guidance_scale"], scheduler=s["scheduler"], seed=s["seed"],
                      callback=callback)
        try:
            if s["image"] is None:
                result = text_to_image(pipe, s["prompt"], s["negative_prompt"], height=s["height"], width=s["width"],
                                       **common)
            else:
                result = image_to_image(pipe, s["image"], s["prompt"], s["negative_prompt"], strength=s["strength"],
                                        **common)
        finally:
            recorder.remove()
        outputs, context = [o.float() for o in recorder.outputs], recorder.context.float()
    return Trace(outputs, latents, np.stack([np.asarray(im) for im in result.images]), context)


def unet_probe(pipe, context: torch.Tensor, height: int, width: int, seed: int):
    """Inputs for the per-module check of a UNet: seeded latents at t=500 with the run's text input."""
    c = pipe.unet.config
    sample = torch.randn((context.shape[0], c.in_channels, height // pipe.vae_scale_factor,
                          width // pipe.vae_scale_factor), generator=torch.Generator().manual_seed(seed))
    return sample, context, probe_conditioning(pipe, sample.shape[0], height, width)


def self_comparison(kind: str, pipe_a, pipe_b, names: tuple, s: dict, tolerance: float):
    """Run two sd_core variants on the same settings; stages, module divergence (b against a) and images."""
    a, b = sd_core_trace(pipe_a, s), sd_core_trace(pipe_b, s)
    stages = [] if a.context is None else [compare_tensors("text embeddings (UNet input)", b.context, a.context,
                                                          tolerance)]
    stages += step_stages(b.predictions, a.predictions, b.latents, a.latents, tolerance)
    stages.append(compare_images(b.images, a.images))
    def device(p):  # a parameter of the pipeline's first model: its dtype and device
        return next(next(iter(p.models.values())).parameters())
    if pipe_a.traits.denoiser == "transformer":
        probe = [dit_probe(p, s["class_labels"], s["seed"], device(p).dtype) for p in (pipe_a, pipe_b)]
        runs = [lambda p=p, x=x: p.transformer(*[t.to(device(p).device) for t in x]) for p, x in
                zip((pipe_a, pipe_b), probe)]
        models = (pipe_a.transformer, pipe_b.transformer)
    else:
        height, width = b.images.shape[1:3]
        sample, context, added = unet_probe(pipe_a, a.context, height, width, s["seed"])

        def run(p, sample=sample, context=context, added=added):
            dt, dev = device(p).dtype, device(p).device
            extra = None if added is None else {k: v.to(dev, dt) for k, v in added.items()}
            return p.unet(sample.to(dev, dt), torch.tensor(500), context.to(dev, dt), extra)
        runs = [lambda p=p: run(p) for p in (pipe_a, pipe_b)]
        models = (pipe_a.unet, pipe_b.unet)
    divergence = first_divergence(models[1], models[0], runs[1], runs[0], tolerance)
    image_a, image_b = Image.fromarray(a.images[0]), Image.fromarray(b.images[0])
    difference, gain = difference_map(image_b, image_a)
    images = {names[0]: image_a, names[1]: image_b, difference_caption(gain): difference}
    return stages, divergence, images


def run_settings(pipe, settings: dict) -> dict:
    return dit_settings(pipe, **settings) if pipe.traits.denoiser == "transformer" else sd_settings(pipe, **settings)


def with_timestep_frequencies(pipe, frequencies: str):
    config = {**pipe.transformer.config.to_dict(), "timestep_frequencies": frequencies}
    transformer = DiTTransformer2DModel.from_config(config)
    transformer.load_state_dict(pipe.transformer.state_dict())
    return dataclasses.replace(pipe, transformer=transformer.eval().to(next(pipe.transformer.parameters()).dtype))


def dit_timestep_semantics_kind(model, **settings) -> Report:
    pipe = load(model)
    check_family(pipe, "dit_timestep_semantics")
    s = dit_settings(pipe, **settings)
    own = pipe.transformer.config.timestep_frequencies
    variants = {f: with_timestep_frequencies(pipe, f) for f in ("diffusers", "original")}
    stages, divergence, images = self_comparison("dit_timestep_semantics", variants["diffusers"], variants["original"],
                                                 ("diffusers frequencies (half - 1)", "original frequencies (half)"),
                                                 s, TOLERANCE)
    image = stages[-1]
    first = divergence.get("first_divergent")
    verdict = (f"dit_timestep_semantics: 'original' vs 'diffusers' frequencies: {image_stage_summary(image)}; final "
               f"latents relative {stages[-2].relative:.3g}; first module that differs: "
               f"{first['name'] if first else 'none'} (this model is configured '{own}')")
    notes = ["sd_core against sd_core: the same weights and noise; only DiTConfig.timestep_frequencies changes. "
             "The original code divides the frequency exponent by half, diffusers by half - 1: the released DiT "
             "weights were trained with 'original', diffusers-trained ones with 'diffusers'."]
    measurements = {"image_max_levels": image.max_abs, "image_psnr_db": image.extra["psnr_db"],
                    "final_latents_relative": stages[-2].relative, "model_timestep_frequencies": own}
    return Report("dit_timestep_semantics", {"model": pipe.source, **s}, stages, verdict, None, images,
                  standard_plots(stages, divergence, "DiT transformer", TOLERANCE), divergence, measurements, notes)


def precision_kind(model, dtype: str = "bf16", device: str | None = None, **settings) -> Report:
    if dtype not in ("bf16", "fp16"):
        raise ValueError(f"precision compares fp32 against 'bf16' or 'fp16'; got {dtype!r}.")
    device = device or measure.device()
    pipe = load(model)
    s = run_settings(pipe, settings)
    low = measure.DTYPES[dtype]
    tolerance = torch.finfo(low).eps  # the threshold drawn and marked: one unit of the low precision
    stages, divergence, images = self_comparison("precision", cast_pipeline(pipe, torch.float32, device),
                                                 cast_pipeline(pipe, low, device), ("fp32", dtype), s, tolerance)
    image, latents = stages[-1], stages[-2]
    first = divergence.get("first_divergent")
    measurements = {f"{dtype}_final_latents_relative": latents.relative,
                    f"{dtype}_final_latents_cosine_distance": 1 - latents.cosine,
                    f"{dtype}_image_psnr_db": image.extra["psnr_db"], f"{dtype}_image_max_levels": image.max_abs}
    for stage in stages:
        stage.extra["cosine_distance"] = 1 - stage.cosine
    verdict = (f"precision: {dtype} vs fp32 on {device}: final latents relative {latents.relative:.3g}, cosine "
               f"distance {1 - latents.cosine:.3g}; image PSNR {image.extra['psnr_db']:.1f} dB (max "
               f"{image.max_abs:.0f} levels); first module beyond {dtype} eps: {first['name'] if first else 'none'}")
    notes = [f"sd_core against sd_core: every model cast to {dtype}; the same seed draws the noise in each dtype, as "
             "diffusers does. The threshold marked is the dtype's machine epsilon: a measurement, not a pass/fail."]
    return Report("precision", {"model": pipe.source, "dtype": dtype, "device": device, **s}, stages, verdict, None,
                  images, standard_plots(stages, divergence, "UNet" if pipe.traits.denoiser != "transformer" else "DiT transformer",
                                         tolerance), divergence, measurements, notes)


def attention_kind(model, dtype: str = "fp32", device: str | None = None, **settings) -> Report:
    device = device or measure.device()
    pipe = load(model)
    s = run_settings(pipe, settings)
    cast = measure.DTYPES[dtype]
    tolerance = TOLERANCE if dtype == "fp32" else torch.finfo(cast).eps
    variants = {backend: cast_pipeline(pipe, cast, device) for backend in ("math", "sdpa")}
    for backend, variant in variants.items():
        for m in variant.models.values():
            set_attention_backend(m, backend)
    stages, divergence, images = self_comparison("attention", variants["math"], variants["sdpa"],
                                                 ("math attention", "SDPA"), s, tolerance)
    passed = all(stage.passed for stage in stages) if dtype == "fp32" else None
    first = divergence.get("first_divergent")
    verdict = (f"attention: SDPA vs math ({dtype}, {device}): {'PASS, ' if passed else 'FAIL, ' if passed is False else ''}"
               f"final latents relative {stages[-2].relative:.3g}; {image_stage_summary(stages[-1])}; first module "
               f"over tolerance: {first['name'] if first else 'none'}").replace(":  ", ": ")
    return Report("attention", {"model": pipe.source, "dtype": dtype, "device": device, **s}, stages, verdict, passed,
                  images, standard_plots(stages, divergence, "UNet" if pipe.traits.denoiser != "transformer" else "DiT transformer",
                                         tolerance), divergence,
                  {"final_latents_relative": stages[-2].relative, "image_max_levels": stages[-1].max_abs},
                  ["sd_core against sd_core: math attention is the parity reference, SDPA the fast path."])


def fast_path_kind(model, deepcache: int = 3, bf16: str | bool = "auto", channels_last: bool = True,
                   tome: float | None = None, **settings) -> Report:
    """The fast path (sd_core.fast.pipeline) against the parity path on the same weights and noise: how far its
    approximations (DeepCache's reused deep features, bf16 copies of the UNet and VAE, ToMe's merged tokens) move
    every step and the image."""
    switch = {"on": True, "off": False}  # the CLI's words
    bf16, channels_last = switch.get(bf16, bf16), switch.get(channels_last, channels_last)
    if not isinstance(deepcache, int) or deepcache < 0:
        raise ValueError(f"deepcache must be a whole number >= 0 (0 or 1: off); got {deepcache!r}.")
    pipe = load(model)
    check_family(pipe, "fast_path")
    s = sd_settings(pipe, **settings)
    fast = make_fast(pipe, deepcache=deepcache, bf16=bf16, channels_last=channels_last, tome=tome)
    fast.reset()
    parity, quick = sd_core_trace(pipe, s), sd_core_trace(fast.pipe, s)
    described = fast.description
    stages = step_stages(quick.predictions, parity.predictions, quick.latents, parity.latents, TOLERANCE)
    stages.append(compare_images(quick.images, parity.images))
    image, latents = stages[-1], stages[-2]
    image_a, image_b = Image.fromarray(parity.images[0]), Image.fromarray(quick.images[0])
    difference, gain = difference_map(image_b, image_a)
    images = {"parity path": image_a, f"fast path ({described})": image_b, difference_caption(gain): difference}
    measurements = {"image_psnr_db": image.extra["psnr_db"], "image_max_levels": image.max_abs,
                    "final_latents_relative": latents.relative, "fast": described}
    verdict = (f"fast_path: a measurement, not parity: the fast path ({described}) against the parity path: image "
               f"PSNR {image.extra['psnr_db']:.1f} dB, max {image.max_abs:.0f} levels; final latents relative "
               f"{latents.relative:.3g}")
    notes = ["sd_core against sd_core on the same weights and noise: the fast path is approximate by design and is "
             "never held to the parity tolerance (the line marked on the plot, for scale only).",
             f"Settings: deepcache={deepcache} (the full UNet every N steps; 0/1 off), bf16={bf16!r} ('auto': by the "
             f"hardware's rule, sd_core.fast.precision), channels_last={channels_last}, tome={tome} (the share of "
             f"top-resolution tokens merged before self-attention; None: off)."]
    settings = {"model": pipe.source, "deepcache": deepcache, "bf16": bf16, "channels_last": channels_last,
                "tome": tome, "fast": described, **s}
    return Report("fast_path", settings, stages, verdict, None, images,
                  standard_plots(stages, {}, "UNet", TOLERANCE), {}, measurements, notes)
