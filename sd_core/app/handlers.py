"""The app's request handlers: each checks a visitor's values, runs sd_core on a cached model within the work
bound, and answers what the tab shows. Gradio calls them; so can a test or a script."""
import contextlib
import functools
import json

import gradio as gr
from PIL import Image

from sd_core.app.inpaint_tab import painted_mask
from sd_core.app.parts import (
    LIMITS,
    MODELS,
    as_float,
    as_int,
    bind_embeddings,
    drawn_side,
    extra_path,
    fast_pipeline,
    handler,
    progress_callback,
    prompt_chunks,
    run_bounded,
    scheduler_of,
    seed_of,
    timestep_semantics,
)
from sd_core.app.serving import as_choice, as_text, open_upload
from sd_core.app.share_links import share_link
from sd_core.checkpoints import catalog
from sd_core.checkpoints.pipeline_classes import DiTPipeline, StableDiffusionPipeline
from sd_core.pipelines.generate import MAX_SEED, dit_sample, generate, image_seeds, preview, refine, vae_roundtrip
from sd_core.pipelines.lora import load_lora, loras_applied
from sd_core.pipelines.previews import fast_preview

MAX_SIZE, MAX_STEPS, MAX_BATCH = 1024, 100, 8
SD_DEFAULTS, DIT_DEFAULTS = catalog.EMBEDDED["embedded: shapes (text to image)"], catalog.EMBEDDED["embedded: shapes (DiT)"]


def run_sd(model, prompt, negative_prompt, steps, guidance_scale, scheduler, seed, number_of_images, prompt_syntax,
           clip_skip, loras, embeddings, progress, trajectory=None, refiner=None, high_noise_frac=0.8, fast=False,
           deepcache=0, tome=0.0, **size_or_image):
    """Text or image to image (or inpainting, or SDXL base + refiner) on cached pipelines, LoRAs merged for this
    request only, A1111's seed per image, the work bounded; `fast`: through sd_core.fast.pipeline (approximate, DeepCache
    every `deepcache` steps, ToMe merging the `tome` share of tokens). Returns (result, seed, [(image, "seed N")])."""
    pipe = MODELS.get(model, progress)
    if not isinstance(pipe, StableDiffusionPipeline):
        raise gr.Error(f"{model} is a DiT model: use the DiT tab.")
    steps = as_int(steps, "steps", 1, MAX_STEPS)
    number_of_images = as_int(number_of_images, "number_of_images", 1, MAX_BATCH)
    clip_skip = as_int(clip_skip or 0, "clip_skip", 0, 10)
    guidance_scale = as_float(guidance_scale, "guidance_scale", 0, 50)
    prompt, negative_prompt = as_text(prompt, "prompt"), as_text(negative_prompt, "negative_prompt")
    prompt_syntax = as_choice(prompt_syntax, "prompt_syntax", ["plain", "a1111"])
    scheduler, seed = scheduler_of(scheduler), seed_of(seed)
    second = None
    if refiner:
        if pipe.family != "sdxl":
            raise gr.Error(f"A refiner follows an SDXL base model; {model} is {pipe.family}. Set Refiner to none.")
        high_noise_frac = as_float(high_noise_frac, "high_noise_frac", 0.05, 0.95)
        second = MODELS.get(refiner, progress)
    if fast and (refiner or any(name for name, _ in loras)):
        raise gr.Error("The fast path does not combine with LoRAs or a refiner: set them to none, or turn the fast "
                       "path off.")
    lora_files = [(load_lora(extra_path("loras", name)), as_float(scale, f"the scale of {name}", -4, 4))
                  for name, scale in loras if name]
    image = size_or_image.get("image")
    pixels = image.width * image.height if image is not None else size_or_image["width"] * size_or_image["height"]
    options = dict(guidance_scale=guidance_scale, scheduler=scheduler, seed=seed, images_per_prompt=number_of_images,
                   prompt_syntax=prompt_syntax, clip_skip=clip_skip, seed_per_image=True, **size_or_image)
    with contextlib.ExitStack() as held:  # the weights are this request's while a LoRA is merged into them
        for locked in sorted({id(p): p for p in (pipe, second) if p is not None}.items()):
            held.enter_context(MODELS.using(locked[1]))
        tokens = held.enter_context(bind_embeddings(pipe, embeddings))
        with loras_applied(pipe.models, lora_files):
            callback = progress_callback(progress, steps, pipe, trajectory, fast_preview if fast else preview)
            run = fast_pipeline(pipe, deepcache, tome).generate if fast else functools.partial(generate, pipe)
            chunks = prompt_chunks(pipe, prompt_syntax, prompt, negative_prompt)  # priced too: BREAKs cost
            result = run_bounded(f"text_to_image:{model}", pixels, steps, number_of_images, chunks=chunks, work=lambda: run(
                prompt, negative_prompt or None, steps=steps, callback=callback, **options) if second is None
                else refine(pipe, second, prompt, negative_prompt or None, high_noise_frac=high_noise_frac,
                            steps=steps, **{k: v for k, v in options.items() if k != "seed"}, seed=seed))
    # shown beside the images (their PNG metadata was written before and does not name them)
    result.parameters.update(loras=[[name, scale] for name, scale in loras if name], embeddings=tokens)
    seeds = image_seeds(seed, len(result.images), True)
    return result, seed, [(image, f"seed {s}") for image, s in zip(result.images, seeds)]


@handler
def generate_images(model, prompt, negative_prompt, steps, guidance_scale, scheduler, width, height, seed,
                    number_of_images, show_trajectory=False, prompt_syntax="plain", clip_skip=0, lora_1=None,
                    lora_1_scale=1.0, lora_2=None, lora_2_scale=1.0, embeddings=None, refiner="",
                    high_noise_frac=0.8, fast=False, deepcache=0, tome=0.0, progress=gr.Progress(),
                    request: gr.Request = None):
    """Text to image (an SDXL base model may hand its last steps to a refiner; `fast`: the approximate fast path,
    its images' metadata says "fast", with DeepCache every `deepcache` steps, 0 off, and ToMe merging the `tome`
    share of the top-resolution tokens, 0 off). Returns (images captioned with
    their seeds, seed used, trajectory of x0 previews, parameters as JSON, share link). Image k of a batch is
    drawn from seed + k."""
    width, height = as_int(width, "width", 8, MAX_SIZE), as_int(height, "height", 8, MAX_SIZE)
    trajectory = [] if show_trajectory else None
    loras = [(lora_1, lora_1_scale), (lora_2, lora_2_scale)]
    result, seed, images = run_sd(model, prompt, negative_prompt, steps, guidance_scale, scheduler, seed,
                                  number_of_images, prompt_syntax, clip_skip, loras, embeddings, progress, trajectory,
                                  refiner, high_noise_frac, bool(fast), deepcache, tome, width=width, height=height)
    settings = dict(model=model, prompt=prompt, negative_prompt=negative_prompt, steps=steps,
                    guidance_scale=guidance_scale, scheduler=scheduler, width=width, height=height, seed=seed,
                    number_of_images=number_of_images, prompt_syntax=prompt_syntax, clip_skip=clip_skip,
                    lora_1=lora_1 or None, lora_1_scale=lora_1_scale if lora_1 else None, lora_2=lora_2 or None,
                    lora_2_scale=lora_2_scale if lora_2 else None, refiner=refiner or None,
                    high_noise_frac=high_noise_frac if refiner else None, fast=bool(fast) or None,
                    deepcache=deepcache if fast else None, tome=tome if fast and tome else None)
    link = share_link("text_to_image", settings, request)
    return images, str(seed), trajectory or [], json.dumps(result.parameters, indent=2), link


@handler
def transform_image(model, image, prompt, negative_prompt, strength, steps, guidance_scale, scheduler, seed,
                    number_of_images, prompt_syntax="plain", clip_skip=0, lora_1=None, lora_1_scale=1.0, lora_2=None,
                    lora_2_scale=1.0, embeddings=None, progress=gr.Progress()):
    """Image to image. Returns (images captioned with their seeds, seed used, parameters as JSON)."""
    if image is None:
        raise gr.Error("Upload a starting image first (or send one here from Text to image).")
    image = open_upload(image, max_pixels=LIMITS.max_upload_pixels)  # a bomb is refused from its header
    strength = as_float(strength, "strength", 0.0, 1.0)
    loras = [(lora_1, lora_1_scale), (lora_2, lora_2_scale)]
    result, seed, images = run_sd(model, prompt, negative_prompt, steps, guidance_scale, scheduler, seed,
                                  number_of_images, prompt_syntax, clip_skip, loras, embeddings, progress,
                                  image=image, strength=strength)
    return images, str(seed), json.dumps(result.parameters, indent=2)


@handler
def inpaint_image(model, image_and_mask, prompt, negative_prompt, strength, steps, guidance_scale, scheduler, seed,
                  number_of_images, progress=gr.Progress()):
    """Inpainting: repaint the painted region of the image (the editor's layers are the mask), keep the rest.
    Returns (images captioned with their seeds, seed used, the mask used, parameters as JSON)."""
    image, mask = painted_mask(image_and_mask, LIMITS.max_upload_pixels)
    strength = as_float(strength, "strength", 0.0, 1.0)
    result, seed, images = run_sd(model, prompt, negative_prompt, steps, guidance_scale, scheduler, seed,
                                  number_of_images, "plain", 0, [], [], progress, image=image, mask=mask,
                                  strength=strength)
    return images, str(seed), mask, json.dumps(result.parameters, indent=2)


@handler
def roundtrip(model, image, sample_posterior=False, seed=0):
    """VAE round trip. Returns (reconstruction, difference x4, PSNR dB, latent channels)."""
    image = open_upload(image, max_pixels=LIMITS.max_upload_pixels)  # a bomb is refused from its header
    seed = as_int(0 if seed is None else seed, "seed", 0, MAX_SEED)
    pipe = MODELS.get(model)
    result = run_bounded(f"vae_roundtrip:{model}", image.width * image.height, 1, 1,
                         lambda: vae_roundtrip(pipe.vae, image, sample=bool(sample_posterior), seed=seed))
    channels = [(channel.resize((channel.width * 4, channel.height * 4), Image.NEAREST), f"channel {i}")
                for i, channel in enumerate(result.latent_channels)]
    return result.reconstruction, result.difference, round(result.psnr, 2), channels


@handler
def sample_dit(model, class_label, guidance_scale, steps, scheduler, seed, number_of_images, guided_channels="all",
               progress=gr.Progress(), request: gr.Request = None):
    """DiT class-conditional sampling. Returns (images captioned with their seeds, seed used, share link,
    the timestep semantics that ran)."""
    pipe = MODELS.get(model, progress)
    if not isinstance(pipe, DiTPipeline):
        raise gr.Error(f"{model} is not a DiT model.")
    steps = as_int(steps, "steps", 1, MAX_STEPS)
    number_of_images = as_int(number_of_images, "number_of_images", 1, MAX_BATCH)
    guidance_scale = as_float(guidance_scale, "guidance_scale", 0, 50)
    class_label = as_text(str(class_label), "class_label", max_chars=200)
    guided_channels = as_choice(guided_channels, "guided_channels", ["all", "first3"])
    scheduler_name, seed = scheduler_of(scheduler), seed_of(seed)
    side = drawn_side(pipe)
    result = run_bounded(f"dit:{model}", side * side, steps, number_of_images, lambda: dit_sample(
        pipe, [class_label] * number_of_images, guidance_scale=guidance_scale, steps=steps, scheduler=scheduler_name,
        seed=seed, guided_channels=guided_channels, seed_per_image=True, callback=progress_callback(progress, steps)))
    link = share_link("dit", dict(model=model, class_label=class_label, guidance_scale=guidance_scale, steps=steps,
                                  scheduler=scheduler, seed=seed, number_of_images=number_of_images,
                                  guided_channels=guided_channels), request)
    images = [(image, f"seed {s}") for image, s in zip(result.images, image_seeds(seed, number_of_images, True))]
    return images, str(seed), link, timestep_semantics(pipe)
