"""Every comparison the app and `python -m compare` offer, behind one call:

    report = run_comparison("image_to_image", "sd_core/weights/shapes-sd", strength=0.6, steps=10)
    report.verdict, report.images, report.plots, report.stages, report.write("out")

Kinds (KINDS): sd_core against diffusers on the same weights and noise (text_to_image, image_to_image, vae,
dit), written here, and controlnet, in compare.controlnet_kind; sd_core against itself under one changed choice
(dit_timestep_semantics, precision, attention, fast_path), in compare.self_kinds; what all share is in
compare.common.
"""
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from sd_core.checkpoints.catalog import EMBEDDED_DIT, EMBEDDED_TEXT_TO_IMAGE
from sd_core.pipelines.image_io import crop_to_multiple, image_to_tensor, load_image, psnr, to_pil
from sd_core.pipelines.generate import dit_sample, vae_roundtrip

from .common import (DIT_KINDS, default_image, parity_verdict, reference_scheduler, OutputRecorder, check_family, dit_probe, dit_settings, load,
                     sd_settings, step_stages)
from .common import SD_KINDS  # noqa: F401  (compare.kinds.SD_KINDS, beside KINDS: the Compare tab's SD kinds)
from .controlnet_kind import controlnet_kind
from .parity import (TOLERANCE, compare_images, compare_tensors, difference_caption, difference_map,
                     first_divergence, reference_model, reference_pipeline, run_parity)
from .report import Report, standard_plots
from .self_kinds import attention_kind, dit_timestep_semantics_kind, fast_path_kind, precision_kind

KINDS = {
    "text_to_image": "sd_core vs diffusers' text-to-image pipeline: every step, every UNet module, the images",
    "image_to_image": "sd_core vs diffusers' Img2Img pipeline (SD or XL) at a given strength",
    "vae": "VAE round trip, sd_core vs diffusers' AutoencoderKL: posterior mean, latents, decoded image",
    "controlnet": "sd_core vs diffusers' (SDXL) ControlNet pipeline: control image, residuals, every step, the images",
    "dit": "DiT sampling vs diffusers' DiTPipeline (guided_channels='all') or the original code's rule ('first3')",
    "dit_timestep_semantics": "sd_core vs sd_core: DiT timestep frequencies 'original' vs 'diffusers'",
    "precision": "sd_core vs sd_core: fp32 against bf16 (or fp16) on the same weights and noise",
    "attention": "sd_core vs sd_core: math attention (the parity reference) against PyTorch SDPA",
    "fast_path": "sd_core fast path (DeepCache, bf16, channels_last) vs the parity path: a measurement, not parity",
}


def default_model(kind: str) -> Path:
    return EMBEDDED_DIT if kind in DIT_KINDS else EMBEDDED_TEXT_TO_IMAGE


def run_comparison(kind: str, model_or_pipe=None, **settings) -> Report:
    """Run comparison `kind` (see KINDS) on a model (folder, single file, hub id or a loaded sd_core pipeline;
    default: the embedded model of the right family). Settings are the kind's options: prompt, negative_prompt,
    class_labels, seed, steps, scheduler, guidance_scale, height, width, image, strength, sample (vae),
    guided_channels (dit), dtype (precision: 'bf16' or 'fp16'; attention: the dtype both run in), device;
    controlnet, control_image, preprocessor, conditioning_scale, control_start, control_end, guess_mode
    (controlnet)."""
    if kind not in KINDS:
        raise ValueError(f"Unknown comparison {kind!r}; choose one of {sorted(KINDS)}.")
    model = default_model(kind) if model_or_pipe is None else model_or_pipe
    return RUNNERS[kind](model, **settings)


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
                   difference_caption(parity.images["difference_scale"]): parity.images["difference"]})
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
              difference_caption(gain): difference}
    settings = {"model": pipe.source, "family": pipe.family, "size": list(image.size), "sample": sample, "seed": seed}
    return Report("vae", settings, stages, verdict, passed, images, standard_plots(stages, divergence, "VAE", TOLERANCE),
                  divergence, {"psnr_sd_core_db": psnr_ours, "psnr_diffusers_db": psnr_theirs},
                  ["Per-module check: encode (mode) then decode of the input."])


# ------------------------------------------------------------------------------------------- DiT sampling


@torch.no_grad()
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
def diffusers_dit_run(reference, labels: list, s: dict) -> tuple:
    """diffusers' DiTPipeline, its latents caught at every scheduler step (it has no step callback): (transformer
    outputs, latents per step, 8-bit images)."""
    latents, predictions = [], OutputRecorder(reference.transformer)
    step = reference.scheduler.step

    def recording_step(*args, **kwargs):
        out = step(*args, **kwargs)
        latents.append(out.prev_sample[:len(labels)].float().clone())
        return out
    reference.scheduler.step = recording_step
    try:
        images = reference(labels, guidance_scale=s["guidance_scale"], num_inference_steps=s["steps"],
                           generator=torch.Generator().manual_seed(s["seed"]), output_type="np").images
    finally:
        reference.scheduler.step = step
        predictions.remove()
    return predictions.outputs, latents, (images * 255).round().astype("uint8")


def original_rule_run(pipe, reference, labels: list, s: dict) -> tuple:
    """The original DiT code's first-3-channel guidance on diffusers' transformer and scheduler: (transformer
    outputs, latents per step, 8-bit images)."""
    recorder, latents = OutputRecorder(reference.transformer), []
    try:
        final = original_cfg_sample(reference.transformer, reference_scheduler(pipe, s["scheduler"]), labels,
                                    s["guidance_scale"], s["steps"], s["seed"], pipe.transformer.config.null_class,
                                    lambda x: latents.append(x.float().clone()))
    finally:
        recorder.remove()
    return recorder.outputs, latents, decode_like_diffusers(reference.vae, final)


def first3_deviation(result, ours_latents: list, all_images, all_latents: list) -> tuple[dict, str]:
    """How far the original code's guidance lands from diffusers' all-channel guidance: measurements, verdict."""
    deviation = compare_images(np.stack([np.asarray(im) for im in result.images]), all_images)
    latent_deviation = compare_tensors("first3 vs all: final latents", ours_latents[-1], all_latents[-1])
    measurements = {"first3_vs_all_max_levels": deviation.max_abs, "first3_vs_all_psnr_db": deviation.extra["psnr_db"],
                    "first3_vs_all_latents_relative": latent_deviation.relative}
    return measurements, (f"; deliberate deviation from diffusers' all-channel guidance: up to "
                          f"{deviation.max_abs:.0f} levels, PSNR {deviation.extra['psnr_db']:.1f} dB")


def dit_kind(model, **settings) -> Report:
    pipe = load(model)
    check_family(pipe, "dit")
    s = dit_settings(pipe, **settings)
    if s["guided_channels"] not in ("all", "first3"):
        raise ValueError(f"guided_channels must be 'all' or 'first3'; got {s['guided_channels']!r}.")
    reference = reference_pipeline(pipe)
    reference.scheduler = reference_scheduler(pipe, s["scheduler"])
    labels, all_channels = s["class_labels"], s["guided_channels"] == "all"
    ours_predictions, ours_latents = OutputRecorder(pipe.transformer), []
    try:
        result = dit_sample(pipe, labels, guidance_scale=s["guidance_scale"], steps=s["steps"],
                            scheduler=s["scheduler"], seed=s["seed"], guided_channels=s["guided_channels"],
                            callback=lambda i, t, x, x0: ours_latents.append(x.float().clone()))
    finally:
        ours_predictions.remove()
    notes, unscaled = [], reference.scheduler.init_noise_sigma != 1
    all_predictions, all_latents, all_images = diffusers_dit_run(reference, labels, s)
    if all_channels:
        their_predictions, their_latents, their_images = all_predictions, all_latents, all_images
        what = "diffusers' DiTPipeline"
        if unscaled:
            notes.append("diffusers' DiTPipeline never scales its initial noise by init_noise_sigma, which this "
                         "sampler needs; sd_core does (a deliberate difference: expect the images to differ).")
    else:
        their_predictions, their_latents, their_images = original_rule_run(pipe, reference, labels, s)
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
    if all_channels and unscaled:
        verdict += f" (expected with {s['scheduler']}: diffusers' DiTPipeline skips init_noise_sigma)"
    verdict = verdict.replace("vs diffusers", f"vs {'diffusers' if all_channels else 'original rule'}")
    ours_image, their_image = result.images[0], Image.fromarray(their_images[0])
    difference, gain = difference_map(ours_image, their_image)
    images = {"sd_core": ours_image, "reference": their_image, difference_caption(gain): difference}
    measurements = {"image_psnr_db": stages[-1].extra.get("psnr_db")}
    if not all_channels:
        deviation, said = first3_deviation(result, ours_latents, all_images, all_latents)
        measurements.update(deviation)
        images["diffusers (all channels)"] = Image.fromarray(all_images[0])
        verdict += said
    settings = {"model": pipe.source, **s, "reference": what}
    return Report("dit", settings, stages, verdict, passed, images,
                  standard_plots(stages, divergence, "DiT transformer", TOLERANCE), divergence, measurements, notes)


RUNNERS = {"text_to_image": text_to_image_kind, "image_to_image": image_to_image_kind, "vae": vae_kind,
           "controlnet": controlnet_kind, "dit": dit_kind, "dit_timestep_semantics": dit_timestep_semantics_kind,
           "precision": precision_kind, "attention": attention_kind, "fast_path": fast_path_kind}
