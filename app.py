"""sd_core's Gradio app: text to image, image to image, VAE round-trip, DiT sampling, and sd_core vs diffusers.

    python app.py                                  # the embedded models, offline, on this machine
    python app.py --models-dir ~/models --share    # also offer the checkpoints found under ~/models

Visitors pick models from a list: the embedded ones, folders and .safetensors files under the
configured model roots (--models-dir / SD_CORE_MODELS_DIR), and hub ids when --allow-hub is given.
A path typed into the API is accepted only if it resolves inside a model root. Where the hub is reachable
(a Hugging Face Space, where SPACE_ID is set, or --allow-hub) the curated hub models of sd_core.checkpoints.catalog are
offered too, fetched from the hub and never looked up on this disk. LoRAs and embeddings: see sd_core.app.parts.

On a Space the app starts unchanged: gradio reads GRADIO_SERVER_NAME / GRADIO_SERVER_PORT itself, and on
ZeroGPU hardware the handlers run inside `spaces.GPU`.
"""
import argparse
import contextlib
import functools
import json
import logging
import os
from pathlib import Path

import gradio as gr
import torch
from PIL import Image

from compare import kinds as comparisons
from sd_core.app.compare_tab import COMPARE_FIELDS, compare_handler, compare_tab  # noqa: F401
from sd_core.checkpoints import catalog
from sd_core.app.inpaint_tab import inpaint_tab, painted_mask
from sd_core.app.share_links import restore, share_link
from sd_core.app.parts import (EMBEDDED, LIMITS, MODEL_DEFAULT, MODELS, PNG_FIELDS, SCHEDULER_CHOICES,  # noqa: F401
                               Settings, advanced_settings, as_float, as_int, bind_embeddings, catalog_entry,
                               dit_labels, drawn_side, extra_path, fast_pipeline, handler, hub_offered, images_gallery,
                               model_choices, model_dropdown, picked, png_info, progress_callback,
                               random_seed, recommended_dit_settings, recommended_settings, refiner_choices,
                               resolve_source, run_bounded, scheduler_dropdown, scheduler_of, seed_of,
                               send_to_image_to_image, timestep_semantics, use_this_seed)
from sd_core.checkpoints.pipeline_classes import DiTPipeline, StableDiffusionPipeline
from sd_core.pipelines.lora import load_lora, loras_applied
from sd_core.pipelines.generate import MAX_SEED, dit_sample, generate, image_seeds, preview, refine, vae_roundtrip
from sd_core.pipelines.previews import fast_preview
from sd_core.schedulers import DISPLAY_NAMES
from sd_core.app.serving import MAX_UPLOAD_BYTES, ResultsJanitor, as_choice, as_text, open_upload, raw_value

PHOTOS = Path(__file__).resolve().parent / "sd_core" / "data" / "photos"
EXAMPLE_SCENE = Path(__file__).resolve().parent / "sd_core" / "data" / "example-scene.png"
MAX_SIZE, MAX_STEPS, MAX_BATCH = 1024, 100, 8
SD_DEFAULTS, DIT_DEFAULTS = catalog.EMBEDDED["embedded: shapes (text to image)"], catalog.EMBEDDED["embedded: shapes (DiT)"]
CSS = ".pixelated img { image-rendering: pixelated; }"  # the embedded models draw 64 px: enlarge without blur


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
        tokens = bind_embeddings(pipe, embeddings)
        with loras_applied(pipe.models, lora_files):
            callback = progress_callback(progress, steps, pipe, trajectory, fast_preview if fast else preview)
            run = fast_pipeline(pipe, deepcache, tome).generate if fast else functools.partial(generate, pipe)
            result = run_bounded(f"text_to_image:{model}", pixels, steps, number_of_images, lambda: run(
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


def example_images() -> list[str]:
    return [str(EXAMPLE_SCENE)] + sorted(str(p) for p in PHOTOS.glob("*.png"))


def sampling_controls() -> tuple:
    """Steps, guidance and scheduler in a row, at the embedded model's settings (a model's pick changes them)."""
    with gr.Row():
        steps = raw_value(gr.Slider(1, MAX_STEPS, SD_DEFAULTS.steps, step=1, label="Steps"))
        guidance = raw_value(gr.Slider(0, 20, SD_DEFAULTS.guidance_scale, step=0.5, label="Guidance scale"))
        return steps, guidance, scheduler_dropdown(SD_DEFAULTS.scheduler)


def build() -> gr.Blocks:
    t2i_models, dit_models = model_choices("text_to_image"), model_choices("dit")
    first_sd = t2i_models[0][1] if t2i_models else None
    first_dit = dit_models[0][1] if dit_models else None
    with gr.Blocks(title="sd_core", delete_cache=(600, 3600)) as demo:
        gr.Markdown("# sd_core\nStable Diffusion and DiT written from scratch in PyTorch, checked number by number "
                    "against diffusers. The embedded models are small, trained here on simple shapes"
                    + (", the hub models are the released checkpoints." if hub_offered() else "."))
        with gr.Tabs() as tabs:
            with gr.Tab("Text to image", id="text_to_image"):
                with gr.Row():
                    with gr.Column():
                        model = model_dropdown(t2i_models)
                        prompt = gr.Textbox("a big red circle on the left on a gray background", label="Prompt")
                        negative = gr.Textbox("", label="Negative prompt")
                        run = gr.Button("Generate", variant="primary")
                        steps, guidance, scheduler = sampling_controls()
                        with gr.Row():
                            width = raw_value(gr.Slider(64, MAX_SIZE, SD_DEFAULTS.size, step=8, label="Width"))
                            height = raw_value(gr.Slider(64, MAX_SIZE, SD_DEFAULTS.size, step=8, label="Height"))
                            batch = raw_value(gr.Slider(1, MAX_BATCH, 4, step=1, label="Number of images"))
                        with gr.Row():
                            seed = raw_value(gr.Number(-1,
                                                       label="Seed (-1: random; image k uses seed + k)", precision=0))
                            dice = gr.Button("🎲", size="sm", min_width=60)
                            trajectory_on = gr.Checkbox(False, label="Show trajectory (the x0 estimate per step)")
                        advanced = advanced_settings(refiners=refiner_choices(), fast=True)
                        png = gr.File(label="PNG Info: drop a PNG made by sd_core or AUTOMATIC1111 to load its settings",
                                      file_types=[".png"], height=90)
                        png_read = gr.Markdown()
                    with gr.Column():
                        gallery = images_gallery()
                        with gr.Row():
                            used_seed = gr.Textbox(label="Seed used (type it above to reproduce)", placeholder="run first",
                                                   interactive=False)
                            reuse = gr.Button("Use this image's seed", size="sm")
                            send = gr.Button("Send to image to image", size="sm")
                        link = gr.Markdown(label="Share link")
                        trajectory = images_gallery("Trajectory", columns=5)
                        parameters = gr.Code(label="Parameters", language="json")
                selected = gr.State(0)
                gallery.select(picked, None, selected, api_name=False)
                dice.click(random_seed, None, seed, api_name=False)
                reuse.click(use_this_seed, [gallery, selected], seed, api_name=False)
                model.input(recommended_settings, model, [steps, guidance, scheduler, width, height],
                            api_name="recommended_settings")
                t2i_inputs = [model, prompt, negative, steps, guidance, scheduler, width, height, seed, batch,
                              trajectory_on] + advanced
                t2i_outputs = [gallery, used_seed, trajectory, parameters, link]
                run.click(generate_images, t2i_inputs, t2i_outputs, api_name="text_to_image")
                png.upload(png_info, png, [model, prompt, negative, steps, guidance, scheduler, width, height, seed]
                           + advanced[:2] + [png_read], api_name="png_info")
                if first_sd:
                    examples = [["a small blue square in the center on a white background", "dpmpp_2m", 1, False],
                                ["a big yellow triangle on the right on a black background", "euler", 7, True]]
                    gr.Examples([[first_sd, text, "", SD_DEFAULTS.steps, SD_DEFAULTS.guidance_scale, sampler, 64, 64,
                                  number, 4, show] for text, sampler, number, show in examples],
                                t2i_inputs[:11], t2i_outputs, cache_examples=False,
                                example_labels=[f"{text} ({DISPLAY_NAMES[sampler]}, seed {number})"
                                                for text, sampler, number, _ in examples])
            with gr.Tab("Image to image", id="image_to_image"):
                with gr.Row():
                    with gr.Column():
                        i2i_model = model_dropdown(t2i_models)
                        i2i_image = gr.Image(type="filepath", image_mode=None, label="Starting image", height=256)
                        i2i_prompt = gr.Textbox("a big blue circle on the left on a gray background", label="Prompt")
                        i2i_negative = gr.Textbox("", label="Negative prompt")
                        i2i_run = gr.Button("Transform", variant="primary")
                        i2i_strength = raw_value(gr.Slider(0, 1, 0.6, step=0.05,
                                                           label="Strength (0: keep the image; 1: ignore it)"))
                        i2i_steps, i2i_guidance, i2i_scheduler = sampling_controls()
                        with gr.Row():
                            i2i_seed = raw_value(gr.Number(-1,
                                                           label="Seed (-1: random; image k uses seed + k)", precision=0))
                            i2i_batch = raw_value(gr.Slider(1, MAX_BATCH, 4, step=1, label="Number of images"))
                        i2i_advanced = advanced_settings()
                    with gr.Column():
                        i2i_gallery = images_gallery()
                        i2i_used_seed = gr.Textbox(label="Seed used", placeholder="run first", interactive=False)
                        i2i_parameters = gr.Code(label="Parameters", language="json")
                i2i_inputs = [i2i_model, i2i_image, i2i_prompt, i2i_negative, i2i_strength, i2i_steps, i2i_guidance,
                              i2i_scheduler, i2i_seed, i2i_batch] + i2i_advanced
                i2i_run.click(transform_image, i2i_inputs, [i2i_gallery, i2i_used_seed, i2i_parameters],
                              api_name="image_to_image")
                send.click(send_to_image_to_image, [gallery, selected, model, prompt, negative, steps, guidance, scheduler],
                           [i2i_image, i2i_model, i2i_prompt, i2i_negative, i2i_steps, i2i_guidance, i2i_scheduler, tabs],
                           api_name=False)
                if first_sd:
                    gr.Examples([[first_sd, str(EXAMPLE_SCENE)]], [i2i_model, i2i_image])
            with gr.Tab("Inpaint", id="inpaint"):
                inpaint_tab(t2i_models, inpaint_image, str(EXAMPLE_SCENE) if first_sd else None, SD_DEFAULTS,
                            MAX_STEPS, MAX_BATCH)
            with gr.Tab("VAE round-trip", id="vae"):
                with gr.Row():
                    with gr.Column():
                        vae_model = model_dropdown(model_choices("any"), "Model (its VAE)")
                        image = gr.Image(type="filepath", image_mode=None, label="Image", height=256)
                        sample_posterior = gr.Checkbox(False, label="Sample posterior (else its mean)")
                        vae_seed = raw_value(gr.Number(0, label="Seed for the sample", precision=0))
                        vae_run = gr.Button("Round-trip", variant="primary")
                    with gr.Column():
                        with gr.Row():
                            reconstruction = gr.Image(label="Reconstruction", format="png", height=256,
                                                      elem_classes="pixelated")
                            difference = gr.Image(label="|difference| x 4", format="png", height=256,
                                                  elem_classes="pixelated")
                        psnr = gr.Number(None, label="PSNR (dB)")
                        channels = images_gallery("Latent channels")
                vae_inputs = [vae_model, image, sample_posterior, vae_seed]
                vae_outputs = [reconstruction, difference, psnr, channels]
                vae_run.click(roundtrip, vae_inputs, vae_outputs, api_name="vae_roundtrip")
                if example_images() and first_sd:
                    gr.Examples([[first_sd, path, False, 0] for path in example_images()], vae_inputs, vae_outputs,
                                roundtrip, cache_examples=False, examples_per_page=8)
            with gr.Tab("DiT", id="dit"):
                with gr.Row():
                    with gr.Column():
                        dit_model = model_dropdown(dit_models)
                        labels = dit_labels(first_dit) if first_dit else []
                        class_label = gr.Dropdown(labels, value=labels[0] if labels else None, allow_custom_value=True,
                                                  label="Class label (name or id)")
                        with gr.Row():
                            dit_guidance = raw_value(gr.Slider(0, 10, DIT_DEFAULTS.guidance_scale, step=0.5,
                                                               label="Guidance scale"))
                            dit_steps = raw_value(gr.Slider(1, MAX_STEPS, DIT_DEFAULTS.steps, step=1, label="Steps"))
                        dit_scheduler = scheduler_dropdown(DIT_DEFAULTS.scheduler)
                        with gr.Row():
                            dit_seed = raw_value(gr.Number(-1,
                                                           label="Seed (-1: random; image k uses seed + k)", precision=0))
                            dit_batch = raw_value(gr.Slider(1, MAX_BATCH, 4, step=1, label="Number of images"))
                        guided_channels = gr.Radio(["all", "first3"], value="all",
                                                   label="Guided channels (all: diffusers; first3: original DiT code)")
                        dit_run = gr.Button("Sample", variant="primary")
                    with gr.Column():
                        dit_gallery = images_gallery()
                        dit_used_seed = gr.Textbox(label="Seed used", placeholder="run first", interactive=False)
                        dit_link = gr.Markdown(label="Share link")
                        dit_semantics = gr.Markdown(label="Timestep semantics")
                dit_model.change(lambda m: gr.Dropdown(choices=dit_labels(m)), dit_model, class_label, api_name=False)
                dit_model.input(recommended_dit_settings, dit_model, [dit_guidance, dit_steps, dit_scheduler],
                                api_name="recommended_dit_settings")
                dit_inputs = [dit_model, class_label, dit_guidance, dit_steps, dit_scheduler, dit_seed, dit_batch,
                              guided_channels]
                dit_outputs = [dit_gallery, dit_used_seed, dit_link, dit_semantics]
                dit_run.click(sample_dit, dit_inputs, dit_outputs, api_name="dit_sample")
                if first_dit:
                    gr.Examples([[first_dit, "red circle", DIT_DEFAULTS.guidance_scale, DIT_DEFAULTS.steps, "dpmpp_2m", 0,
                                  4, "all"],
                                 [first_dit, "blue triangle", DIT_DEFAULTS.guidance_scale, DIT_DEFAULTS.steps, "ddim", 1,
                                  4, "first3"]],
                                dit_inputs, dit_outputs, sample_dit, cache_examples=False,
                                example_labels=["red circle (DPM++ 2M, seed 0)", "blue triangle (DDIM, first3, seed 1)"])
            with gr.Tab("Compare", id="compare"):
                compare_tab(comparisons)
        shareable = {"text_to_image": (generate_images, t2i_inputs, t2i_outputs), "dit": (sample_dit, dit_inputs, dit_outputs)}
        load_outputs = [tabs] + [c for _, inputs, outputs in shareable.values() for c in inputs + outputs]

        def on_load(request: gr.Request):
            return restore(shareable, request)
        demo.load(on_load, None, load_outputs, api_name=False)
    return demo


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models-dir", action="append", default=[], help="a folder of models visitors may pick from")
    parser.add_argument("--allow-hub", action="store_true", help="offer the curated hub models and let visitors "
                        "give any Hugging Face hub id (needs network)")
    parser.add_argument("--host", help="address to listen on (default: GRADIO_SERVER_NAME, else 127.0.0.1; "
                        "0.0.0.0 for other machines)")
    parser.add_argument("--port", type=int, help="port (default: GRADIO_SERVER_PORT, else 7860)")
    parser.add_argument("--share", action="store_true", help="also open a temporary public https://*.gradio.live link "
                        "to this machine (needs network; anyone with the link can use the app)")
    parser.add_argument("--concurrency", type=int, default=2, help="requests computed at once")
    parser.add_argument("--max-queue", type=int, default=32, help="waiting requests before 'queue is full'")
    parser.add_argument("--threads", type=int, help="torch threads per process (default: cores / concurrency; under "
                        "load one thread per request measured 2-5x faster than two on a CPU)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    Settings.model_roots += [Path(p).resolve() for p in args.models_dir]
    Settings.allow_hub = Settings.allow_hub or args.allow_hub
    for name in EMBEDDED:  # warm: the first page shows a picture at once
        MODELS.get(name)
    torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // max(1, args.concurrency)))
    demo = build().queue(max_size=args.max_queue, default_concurrency_limit=args.concurrency)
    ResultsJanitor(every_s=300, max_age_s=3600, max_files=500).keep_existing().start()  # after build(): keeps examples
    where = {key: value for key, value in (("server_name", args.host), ("server_port", args.port)) if value is not None}
    # no host/port given: gradio reads GRADIO_SERVER_NAME/_PORT; larger uploads are refused before they are kept
    demo.launch(share=args.share, css=CSS, max_file_size=MAX_UPLOAD_BYTES, **where)


if __name__ == "__main__":
    main()
