"""Every comparison the app and `python -m compare` offer, behind one call:

    report = run_comparison("image_to_image", "sd_core/weights/shapes-sd", strength=0.6, steps=10)
    report.verdict, report.images, report.plots, report.stages, report.write("out")

Kinds (KINDS): sd_core against diffusers on the same weights and noise (text_to_image, image_to_image, vae,
dit), and sd_core against itself under one changed choice (dit_timestep_semantics, precision, attention, fast_path).
"""
import dataclasses
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from sd_core.catalog import EMBEDDED_DIT, EMBEDDED_TEXT_TO_IMAGE
from sd_core.dit import DiTTransformer2DModel
from sd_core.fast import describe, make_fast
from sd_core.images import crop_to_multiple, image_to_tensor, load_image, psnr, to_pil
from sd_core.layers import set_attention_backend
from sd_core.pipelines import dit_sample, image_to_image, text_to_image, vae_roundtrip
from sd_core.schedulers import VARIANTS

from .common import (DIT_KINDS, OutputRecorder, cast_pipeline, check_family, dit_probe, dit_settings,
                     image_stage_summary, load, sd_settings, step_stages)
from .common import SD_KINDS  # noqa: F401  (compare.kinds.SD_KINDS, beside KINDS: the Compare tab's SD kinds)
from .parity import (REFERENCE_SCHEDULERS, TOLERANCE, UNetRecorder, compare_images, compare_tensors,
                     difference_map, first_divergence, reference_model, reference_pipeline, run_parity)
from .report import Report, standard_plots

KINDS = {
    "text_to_image": "sd_core vs diffusers' text-to-image pipeline: every step, every UNet module, the images",
    "image_to_image": "sd_core vs diffusers' Img2Img pipeline (SD or XL) at a given strength",
    "vae": "VAE round trip, sd_core vs diffusers' AutoencoderKL: posterior mean, latents, decoded image",
    "dit": "DiT sampling vs diffusers' DiTPipeline (guided_channels='all') or the original code's rule ('first3')",
    "dit_timestep_semantics": "sd_core vs sd_core: DiT timestep frequencies 'original' vs 'diffusers'",
    "precision": "sd_core vs sd_core: fp32 against bf16 (or fp16) on the same weights and noise",
    "attention": "sd_core vs sd_core: math attention (the parity reference) against PyTorch SDPA",
    "fast_path": "sd_core fast path (DeepCache, bf16, channels_last) vs the parity path: a measurement, not parity",
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def default_model(kind: str) -> Path:
    return EMBEDDED_DIT if kind in DIT_KINDS else EMBEDDED_TEXT_TO_IMAGE


def default_image(size: int) -> Image.Image:
    """A deterministic picture to start from: a red disc and a blue square on gray."""
    image = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    draw.ellipse([size * 0.1, size * 0.2, size * 0.5, size * 0.6], fill=(220, 30, 30))
    draw.rectangle([size * 0.55, size * 0.45, size * 0.9, size * 0.8], fill=(30, 60, 220))
    return image


def run_comparison(kind: str, model_or_pipe=None, **settings) -> Report:
    """Run comparison `kind` (see KINDS) on a model (folder, single file, hub id or a loaded sd_core pipeline;
    default: the embedded model of the right family). Settings are the kind's options: prompt, negative_prompt,
    class_labels, seed, steps, scheduler, guidance_scale, height, width, image, strength, sample (vae),
    guided_channels (dit), dtype (precision: 'bf16' or 'fp16'; attention: the dtype both run in), device."""
    if kind not in KINDS:
        raise ValueError(f"Unknown comparison {kind!r}; choose one of {sorted(KINDS)}.")
    model = default_model(kind) if model_or_pipe is None else model_or_pipe
    return RUNNERS[kind](model, **settings)


def parity_verdict(kind: str, stages: list, divergence: dict, extra: str = "") -> tuple[bool, str]:
    passed = all(s.passed for s in stages)
    failed = [s.name for s in stages if not s.passed]
    image = next((s for s in stages if s.name.startswith("decoded images")), None)
    first = (divergence or {}).get("first_divergent")
    text = f"{kind}: {'PASS' if passed else 'FAIL'} vs diffusers"
    text += f", {len(stages)} stages" + (f", first off: {failed[0]}" if failed else " within tolerance")
    if image is not None:
        text += "; " + image_stage_summary(image)
    if divergence:
        text += f"; first module over tolerance: {first['name'] if first else 'none'}"
    return passed, text + extra


# --------------------------------------------------------------------- text and image to image vs diffusers


def from_parity(kind: str, model, image, **settings) -> Report:
    pipe = load(model)
    check_family(pipe, kind)
    s = sd_settings(pipe, **settings)
    if kind == "image_to_image":
        s["image"] = image if image is not None else default_image(s["height"] or pipe.default_size)
    parity = run_parity(pipe, s["prompt"], s["negative_prompt"], s["seed"], s["steps"], s["scheduler"],
                        s["guidance_scale"], s["height"], s["width"], image=s["image"], strength=s["strength"])
    passed, verdict = parity_verdict(kind, parity.stages, parity.divergence)
    images = {} if kind == "text_to_image" else {"input": crop_to_multiple(load_image(s["image"]),
                                                                           pipe.vae_scale_factor)}
    images.update({"sd_core": parity.images["sd_core"], "diffusers": parity.images["diffusers"],
                   f"|difference| x{parity.images['difference_scale']:g}": parity.images["difference"]})
    settings = {k: v for k, v in parity.settings.items()}
    notes = [f"diffusers ran {'StableDiffusion(XL)Img2ImgPipeline' if kind == 'image_to_image' else 'its pipeline'}"
             " on sd_core's very tensors (shared, not copied).",
             "Per-module check: the UNet at step 1's inputs (t=500)."]
    return Report(kind, settings, parity.stages, verdict, passed, images,
                  standard_plots(parity.stages, parity.divergence, "UNet", TOLERANCE), parity.divergence,
                  {"image_psnr_db": parity.stages[-1].extra.get("psnr_db")}, notes)


def text_to_image_kind(model, **settings) -> Report:
    return from_parity("text_to_image", model, None, **settings)


def image_to_image_kind(model, image=None, **settings) -> Report:
    return from_parity("image_to_image", model, image, **settings)


# ---------------------------------------------------------------------------------------------------- VAE


@torch.no_grad()
def vae_kind(model, image=None, sample: bool = False, seed: int = 0, size: int | None = None) -> Report:
    import diffusers  # noqa: F401  (reference_model imports it too; fail early with the real message)
    pipe = load(model)
    vae = pipe.vae
    image = crop_to_multiple(load_image(image if image is not None else default_image(size or 64)),
                             vae.downscale_factor)
    reference = reference_model(vae)
    ours = vae_roundtrip(vae, image, sample=sample, seed=seed)
    x = image_to_tensor(image, torch.float32, "cpu")
    posterior = reference.encode(x).latent_dist
    z = posterior.sample(torch.Generator().manual_seed(seed)) if sample else posterior.mode()
    their_decoded = reference.decode(z).sample
    our_decoded = vae.decode(ours.latents / vae.config.scaling_factor)
    theirs = to_pil(their_decoded)[0]
    stages = [compare_tensors("encoder mean", ours.mean, posterior.mean),
              compare_tensors("encoder std", ours.std, posterior.std),
              compare_tensors("latents (scaled)", ours.latents, z * reference.config.scaling_factor),
              compare_tensors("decoded (float)", our_decoded, their_decoded),
              compare_images(np.asarray(ours.reconstruction)[None], np.asarray(theirs)[None])]
    psnr_ours, psnr_theirs = psnr(image, ours.reconstruction), psnr(image, theirs)
    divergence = first_divergence(vae, reference, lambda: vae.decode(vae.encode(x).mode()),
                                  lambda: reference.decode(reference.encode(x).latent_dist.mode()).sample)
    passed, verdict = parity_verdict("vae", stages, divergence,
                                     f"; PSNR vs input: sd_core {psnr_ours:.2f} dB, diffusers {psnr_theirs:.2f} dB")
    difference, gain = difference_map(ours.reconstruction, theirs)
    images = {"input": image, "sd_core": ours.reconstruction, "diffusers": theirs,
              f"|difference| x{gain:g}": difference}
    settings = {"model": pipe.source, "family": pipe.family, "size": list(image.size), "sample": sample, "seed": seed}
    return Report("vae", settings, stages, verdict, passed, images, standard_plots(stages, divergence, "VAE", TOLERANCE),
                  divergence, {"psnr_sd_core_db": psnr_ours, "psnr_diffusers_db": psnr_theirs},
                  ["Per-module check: encode (mode) then decode of the input."])


# ------------------------------------------------------------------------------------------- DiT sampling


def reference_scheduler(pipe, name: str):
    import diffusers
    sampler, overrides = VARIANTS.get(name, (name, {}))
    return getattr(diffusers, REFERENCE_SCHEDULERS[sampler]).from_config(pipe.scheduler_config, **overrides)


def decode_like_diffusers(vae, latents) -> np.ndarray:
    """DiTPipeline's decode: latents / scaling factor, decode, [-1, 1] -> [0, 1] -> 8-bit (rounded, as the tests)."""
    samples = (vae.decode(latents / vae.config.scaling_factor).sample / 2 + 0.5).clamp(0, 1)
    return (samples.permute(0, 2, 3, 1).float().numpy() * 255).round().astype("uint8")


@torch.no_grad()
def original_cfg_sample(transformer, scheduler, labels: list, guidance_scale: float, steps: int, seed: int,
                        null_class: int, on_step=None) -> torch.Tensor:
    """facebookresearch/DiT's sampling rule, written here on diffusers' transformer and scheduler: the batch is
    [cond, uncond] and `forward_with_cfg` guides only the first three channels ("for reproducibility"), the
    fourth and any variance channels are the conditional prediction's."""
    c = transformer.config
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(steps)
    n = len(labels)
    x = torch.randn((n, c.in_channels, c.sample_size, c.sample_size), generator=generator) * scheduler.init_noise_sigma
    guided = guidance_scale > 1
    y = torch.tensor(labels + [null_class] * n if guided else labels)
    learned_variance = scheduler.config.get("variance_type") in ("learned", "learned_range")
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([x, x]) if guided else x, t)
        out = transformer(model_input, timestep=t.reshape(1).expand(len(y)), class_labels=y).sample
        if guided:  # models.py, forward_with_cfg
            eps, rest = out[:, :3], out[:, 3:]
            cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
            half_eps = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
            out = torch.cat([torch.cat([half_eps, half_eps], dim=0), rest], dim=1)[:n]
        model_output = out if learned_variance and out.shape[1] == 2 * c.in_channels else out[:, :c.in_channels]
        x = scheduler.step(model_output, t, x, generator=generator).prev_sample
        if on_step is not None:
            on_step(x)
    return x


@torch.no_grad()
def dit_kind(model, **settings) -> Report:
    pipe = load(model)
    check_family(pipe, "dit")
    s = dit_settings(pipe, **settings)
    if s["guided_channels"] not in ("all", "first3"):
        raise ValueError(f"guided_channels must be 'all' or 'first3'; got {s['guided_channels']!r}.")
    reference = reference_pipeline(pipe)
    reference.scheduler = reference_scheduler(pipe, s["scheduler"])
    labels, n = s["class_labels"], len(s["class_labels"])

    ours_predictions, ours_latents = OutputRecorder(pipe.transformer), []
    try:
        result = dit_sample(pipe, labels, guidance_scale=s["guidance_scale"], steps=s["steps"],
                            scheduler=s["scheduler"], seed=s["seed"], guided_channels=s["guided_channels"],
                            callback=lambda i, t, x, x0: ours_latents.append(x.float().clone()))
    finally:
        ours_predictions.remove()

    def diffusers_all_channels():
        """diffusers' DiTPipeline, its latents caught at every scheduler step (it has no step callback)."""
        latents, predictions = [], OutputRecorder(reference.transformer)
        step = reference.scheduler.step

        def recording_step(*args, **kwargs):
            out = step(*args, **kwargs)
            latents.append(out.prev_sample[:n].float().clone())
            return out
        reference.scheduler.step = recording_step
        try:
            images = reference(labels, guidance_scale=s["guidance_scale"], num_inference_steps=s["steps"],
                               generator=torch.Generator().manual_seed(s["seed"]), output_type="np").images
        finally:
            reference.scheduler.step = step
            predictions.remove()
        return predictions.outputs, latents, (images * 255).round().astype("uint8")

    notes = []
    all_predictions, all_latents, all_images = diffusers_all_channels()
    if s["guided_channels"] == "all":
        their_predictions, their_latents, their_images = all_predictions, all_latents, all_images
        what = "diffusers' DiTPipeline"
        if reference.scheduler.init_noise_sigma != 1:
            notes.append("diffusers' DiTPipeline never scales its initial noise by init_noise_sigma, which this "
                         "sampler needs; sd_core does (a deliberate difference: expect the images to differ).")
    else:
        recorder, their_latents = OutputRecorder(reference.transformer), []
        try:
            final = original_cfg_sample(reference.transformer, reference_scheduler(pipe, s["scheduler"]), labels,
                                        s["guidance_scale"], s["steps"], s["seed"], pipe.transformer.config.null_class,
                                        lambda x: their_latents.append(x.float().clone()))
        finally:
            recorder.remove()
        their_predictions, their_images = recorder.outputs, decode_like_diffusers(reference.vae, final)
        what = "the original code's guidance rule (compare.kinds.original_cfg_sample) on diffusers' transformer"
        notes.append("'first3' follows facebookresearch/DiT's forward_with_cfg, which diffusers' DiTPipeline does "
                     "not offer: the reference is that rule written in compare/ on diffusers' transformer and "
                     "scheduler. Its distance from diffusers' all-channel guidance is measured below.")
    stages = step_stages(ours_predictions.outputs, their_predictions, ours_latents, their_latents, TOLERANCE)
    stages.append(compare_images(np.stack([np.asarray(im) for im in result.images]), their_images))
    sample, t, probe_labels = dit_probe(pipe, labels, s["seed"])
    divergence = first_divergence(pipe.transformer, reference.transformer,
                                  lambda: pipe.transformer(sample, t, probe_labels),
                                  lambda: reference.transformer(sample, timestep=t, class_labels=probe_labels))
    passed, verdict = parity_verdict(f"dit ({s['guided_channels']})", stages, divergence)
    if s["guided_channels"] == "all" and reference.scheduler.init_noise_sigma != 1:
        verdict += f" (expected with {s['scheduler']}: diffusers' DiTPipeline skips init_noise_sigma)"
    verdict = verdict.replace("vs diffusers", f"vs {'diffusers' if s['guided_channels'] == 'all' else 'original rule'}")
    ours_image, their_image = result.images[0], Image.fromarray(their_images[0])
    difference, gain = difference_map(ours_image, their_image)
    images = {"sd_core": ours_image, "reference": their_image, f"|difference| x{gain:g}": difference}
    measurements = {"image_psnr_db": stages[-1].extra.get("psnr_db")}
    if s["guided_channels"] == "first3":
        deviation = compare_images(np.stack([np.asarray(im) for im in result.images]), all_images)
        latent_deviation = compare_tensors("first3 vs all: final latents", ours_latents[-1], all_latents[-1])
        measurements.update({"first3_vs_all_max_levels": deviation.max_abs,
                             "first3_vs_all_psnr_db": deviation.extra["psnr_db"],
                             "first3_vs_all_latents_relative": latent_deviation.relative})
        images["diffusers (all channels)"] = Image.fromarray(all_images[0])
        verdict += (f"; deliberate deviation from diffusers' all-channel guidance: up to {deviation.max_abs:.0f} "
                    f"levels, PSNR {deviation.extra['psnr_db']:.1f} dB")
    settings = {"model": pipe.source, **s, "reference": what}
    return Report("dit", settings, stages, verdict, passed, images,
                  standard_plots(stages, divergence, "DiT transformer", TOLERANCE), divergence, measurements, notes)


# ------------------------------------------------------------------------------- sd_core against itself


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
    if pipe.family == "dit":
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
    added = None
    if c.addition_embed_type == "text_time":
        pooled_dim = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
        added = {"text_embeds": torch.randn(sample.shape[0], pooled_dim, generator=torch.Generator().manual_seed(1)),
                 "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * sample.shape[0],
                                          dtype=torch.float32)}
    return sample, context, added


def self_comparison(kind: str, pipe_a, pipe_b, names: tuple, s: dict, tolerance: float):
    """Run two sd_core variants on the same settings; stages, module divergence (b against a) and images."""
    a, b = sd_core_trace(pipe_a, s), sd_core_trace(pipe_b, s)
    stages = [] if a.context is None else [compare_tensors("text embeddings (UNet input)", b.context, a.context,
                                                          tolerance)]
    stages += step_stages(b.predictions, a.predictions, b.latents, a.latents, tolerance)
    stages.append(compare_images(b.images, a.images))
    def device(p):  # a parameter of the pipeline's first model: its dtype and device
        return next(next(iter(p.models.values())).parameters())
    if pipe_a.family == "dit":
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
    images = {names[0]: image_a, names[1]: image_b, f"|difference| x{gain:g}": difference}
    return stages, divergence, images


def run_settings(pipe, settings: dict) -> dict:
    return dit_settings(pipe, **settings) if pipe.family == "dit" else sd_settings(pipe, **settings)


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


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def precision_kind(model, dtype: str = "bf16", device: str | None = None, **settings) -> Report:
    if dtype not in ("bf16", "fp16"):
        raise ValueError(f"precision compares fp32 against 'bf16' or 'fp16'; got {dtype!r}.")
    device = device or default_device()
    pipe = load(model)
    s = run_settings(pipe, settings)
    low = DTYPES[dtype]
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
                  images, standard_plots(stages, divergence, "UNet" if pipe.family != "dit" else "DiT transformer",
                                         tolerance), divergence, measurements, notes)


def attention_kind(model, dtype: str = "fp32", device: str | None = None, **settings) -> Report:
    device = device or default_device()
    pipe = load(model)
    s = run_settings(pipe, settings)
    cast = DTYPES[dtype]
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
                  images, standard_plots(stages, divergence, "UNet" if pipe.family != "dit" else "DiT transformer",
                                         tolerance), divergence,
                  {"final_latents_relative": stages[-2].relative, "image_max_levels": stages[-1].max_abs},
                  ["sd_core against sd_core: math attention is the parity reference, SDPA the fast path."])


def fast_path_kind(model, deepcache: int = 3, bf16: str | bool = "auto", channels_last: bool = True,
                   tome: float | None = None, **settings) -> Report:
    """The fast path (sd_core.fast) against the parity path on the same weights and noise: how far its
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
    described = describe(fast.options, fast.dtype)
    stages = step_stages(quick.predictions, parity.predictions, quick.latents, parity.latents, TOLERANCE)
    stages.append(compare_images(quick.images, parity.images))
    image, latents = stages[-1], stages[-2]
    image_a, image_b = Image.fromarray(parity.images[0]), Image.fromarray(quick.images[0])
    difference, gain = difference_map(image_b, image_a)
    images = {"parity path": image_a, f"fast path ({described})": image_b, f"|difference| x{gain:g}": difference}
    measurements = {"image_psnr_db": image.extra["psnr_db"], "image_max_levels": image.max_abs,
                    "final_latents_relative": latents.relative, "fast": described}
    verdict = (f"fast_path: a measurement, not parity: the fast path ({described}) against the parity path: image "
               f"PSNR {image.extra['psnr_db']:.1f} dB, max {image.max_abs:.0f} levels; final latents relative "
               f"{latents.relative:.3g}")
    notes = ["sd_core against sd_core on the same weights and noise: the fast path is approximate by design and is "
             "never held to the parity tolerance (the line marked on the plot, for scale only).",
             f"Settings: deepcache={deepcache} (the full UNet every N steps; 0/1 off), bf16={bf16!r} ('auto': only "
             f"where bf16 is measured faster here), channels_last={channels_last}, tome={tome} (the share of "
             f"top-resolution tokens merged before self-attention; None: off)."]
    settings = {"model": pipe.source, "deepcache": deepcache, "bf16": bf16, "channels_last": channels_last,
                "tome": tome, "fast": described, **s}
    return Report("fast_path", settings, stages, verdict, None, images,
                  standard_plots(stages, {}, "UNet", TOLERANCE), {}, measurements, notes)


RUNNERS = {"text_to_image": text_to_image_kind, "image_to_image": image_to_image_kind, "vae": vae_kind,
           "dit": dit_kind, "dit_timestep_semantics": dit_timestep_semantics_kind, "precision": precision_kind,
           "attention": attention_kind, "fast_path": fast_path_kind}
