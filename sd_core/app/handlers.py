"""The app's request handlers: each checks a visitor's values, runs sd_core on a cached model within the work
bound, and answers what the tab shows. Gradio calls them; so can a test or a script."""
import contextlib
import functools
import json

import gradio as gr
from PIL import Image

from sd_core.app.forms import (
    FORM_LIMITS,
    dit_form_from_settings,
    dit_settings_from_form,
    form_from_settings,
    settings_from_form,
)
from sd_core.app.controlnet_section import control_pictures, loaded_control
from sd_core.app.inpaint_tab import mask_overlay, painted_mask
from sd_core.app.parts import (
    as_page_text,
    LIMITS,
    MODELS,
    bind_embeddings,
    drawn_side,
    extra_path,
    handler,
    progress_callback,
    prompt_chunks,
    run_bounded,
    timestep_semantics,
)
from sd_core.app.serving import open_upload
from sd_core.app.share_links import share_link
from sd_core.checkpoints import catalog
from sd_core.checkpoints.pipeline_classes import DiTPipeline, StableDiffusionPipeline
from sd_core.fast.pipeline import fast_for  # run it under MODELS.using(pipe): it keeps state between steps
from sd_core.pipelines.conditioning import dropped_text
from sd_core.pipelines.dit_sampling import generate_dit
from sd_core.pipelines.generate import generate, image_seeds, preview, refine_run, vae_roundtrip
from sd_core.pipelines.lora import load_lora, loras_applied
from sd_core.pipelines.previews import fast_preview
from sd_core.pipelines.sampling import resolve_seed
from sd_core.pipelines.settings import MAX_SEED, GenerationSettings, flag, whole_number

MAX_SIZE, MAX_STEPS, MAX_BATCH = FORM_LIMITS.max_side, FORM_LIMITS.max_steps, FORM_LIMITS.max_batch
SD_DEFAULTS, DIT_DEFAULTS = catalog.EMBEDDED["embedded: shapes (text to image)"], catalog.EMBEDDED["embedded: shapes (DiT)"]


def form_of(arguments: dict) -> dict:
    """A handler's form values (its named parameters), without gradio's progress and request."""
    return {key: value for key, value in arguments.items() if key not in ("progress", "request")}


def run_sd(settings: GenerationSettings, progress, trajectory=None, image=None, mask=None, pictures=()):
    """Text or image to image (or inpainting, or SDXL base + refiner) on cached pipelines, LoRAs merged and
    embeddings bound for this request only, the ControlNets of settings.controlnets steering it with `pictures`
    (one control image each), the work bounded; settings.fast: through sd_core.fast (approximate).
    Returns (result, the settings as they ran, [(image, "seed N")])."""
    pipe = MODELS.get(settings.model, progress)
    if not isinstance(pipe, StableDiffusionPipeline):
        raise gr.Error(f"{settings.model} is a DiT model: use the DiT tab.")
    settings = settings.replace(seed=resolve_seed(settings.seed))
    second = None
    if settings.refiner:
        if pipe.family != "sdxl":
            raise gr.Error(f"A refiner follows an SDXL base model; {settings.model} is {pipe.family}. Set Refiner "
                           f"to none.")
        second = MODELS.get(settings.refiner, progress)
    if settings.fast and (settings.refiner or settings.loras):
        raise gr.Error("The fast path does not combine with LoRAs or a refiner: set them to none, or turn the fast "
                       "path off.")
    if settings.controlnets and (settings.fast or settings.refiner):
        raise gr.Error("ControlNets run on the parity path without a refiner: turn the fast path off and set Refiner "
                       "to none, or set the ControlNets to none.")
    control = loaded_control(pipe, settings.controlnets, pictures)
    lora_files = [(load_lora(extra_path("loras", name)), scale) for name, scale in settings.loras]
    pixels = image.width * image.height if image is not None else (settings.width or 0) * (settings.height or 0)
    with contextlib.ExitStack() as held:  # the weights are this request's while a LoRA is merged into them
        for _, locked in sorted({id(p): p for p in (pipe, second) if p is not None}.items()):
            held.enter_context(MODELS.using(locked))
        tokens = held.enter_context(bind_embeddings(pipe, settings.embeddings))
        with loras_applied(pipe.models, lora_files):
            callback = progress_callback(progress, settings.steps, pipe, trajectory,
                                         fast_preview if settings.fast else preview)
            if second is not None:
                work = functools.partial(refine_run, pipe, second, settings, callback)
            else:
                run = fast_for(pipe, settings).generate if settings.fast else \
                    functools.partial(generate, pipe)
                work = functools.partial(run, settings, image=image, mask=mask, callback=callback,
                                         **({"control": control} if control else {}))
            chunks = prompt_chunks(pipe, settings.prompt_syntax, settings.prompt, settings.negative_prompt)
            kind = f"text_to_image:{settings.model}" + (f"+{len(control)} controlnets" if control else "")
            result = run_bounded(kind, pixels, settings.steps,
                                 settings.images_per_prompt, work, chunks)  # a prompt's chunks are priced too
    result.parameters.update(embeddings=tokens)  # shown beside the images: the tokens to write in a prompt
    note = truncation_note(pipe, settings)
    if note:
        gr.Warning(as_page_text(note))
        result.parameters["note"] = note
    seeds = image_seeds(settings.seed, len(result.images), True)
    return result, settings, [(picture, f"seed {one}") for picture, one in zip(result.images, seeds)]


def truncation_note(pipe, settings: GenerationSettings) -> str:
    """What a visitor is told when plain syntax cut the prompt at CLIP's window (A1111 syntax reads it all)."""
    if settings.prompt_syntax != "plain":
        return ""
    tokenizer = pipe.tokenizer or pipe.tokenizer_2
    dropped = [dropped_text(tokenizer, text) for text in (settings.prompt, settings.negative_prompt or "")]
    if not any(dropped):
        return ""
    ignored = " / ".join(filter(None, dropped))
    return (f"The prompt is longer than CLIP's 77 tokens; plain syntax (as diffusers) ignored: {ignored!r}. "
            f"Choose the A1111 prompt syntax (Advanced) to use all of it.")


@handler
def generate_images(model, prompt, negative_prompt, steps, guidance_scale, scheduler, width, height, seed,
                    number_of_images, show_trajectory=False, prompt_syntax="plain", clip_skip=0, lora_1=None,
                    lora_1_scale=1.0, lora_2=None, lora_2_scale=1.0, embeddings=None, refiner="",
                    high_noise_frac=0.8, fast=False, deepcache=0, tome=0.0, guidance_until=1.0, tgate=1.0,
                    controlnet_1="", controlnet_1_image=None, controlnet_1_preprocessor="none", controlnet_1_scale=1.0,
                    controlnet_1_start=0.0, controlnet_1_end=1.0, controlnet_2="", controlnet_2_image=None,
                    controlnet_2_preprocessor="none", controlnet_2_scale=1.0, controlnet_2_start=0.0,
                    controlnet_2_end=1.0, guess_mode=False, progress=gr.Progress(), request: gr.Request = None):
    """Text to image (an SDXL base model may hand its last steps to a refiner; `fast`: the approximate fast path,
    its images' metadata says "fast", with DeepCache every `deepcache` steps, 0 off, ToMe merging the `tome`
    share of the top-resolution tokens, 0 off, guidance only for the `guidance_until` share of the schedule and
    T-GATE freezing cross-attention after the `tgate` share, 1 off; `controlnet_N`: a ControlNet steering the image with
    `controlnet_N_image` through `controlnet_N_preprocessor`, at `controlnet_N_scale` from the `controlnet_N_start`
    to the `controlnet_N_end` share of the steps). Returns (images captioned with their seeds, seed used, trajectory
    of x0 previews, parameters as JSON, share link). Image k of a batch is drawn from seed + k."""
    form = form_of(locals())
    settings = settings_from_form(form)
    trajectory = [] if flag(show_trajectory, "show_trajectory") else None
    result, ran, images = run_sd(settings, progress, trajectory, pictures=control_pictures(form))
    link = share_link("text_to_image", form_from_settings(ran), generate_images, request, left_behind(ran))
    return images, str(ran.seed), trajectory or [], json.dumps(result.parameters, indent=2), link


@handler
def transform_image(model, image, prompt, negative_prompt, strength, steps, guidance_scale, scheduler, seed,
                    number_of_images, prompt_syntax="plain", clip_skip=0, lora_1=None, lora_1_scale=1.0, lora_2=None,
                    lora_2_scale=1.0, embeddings=None, controlnet_1="", controlnet_1_image=None,
                    controlnet_1_preprocessor="none", controlnet_1_scale=1.0, controlnet_1_start=0.0,
                    controlnet_1_end=1.0, controlnet_2="", controlnet_2_image=None, controlnet_2_preprocessor="none",
                    controlnet_2_scale=1.0, controlnet_2_start=0.0, controlnet_2_end=1.0, guess_mode=False,
                    progress=gr.Progress(),
                    request: gr.Request = None):
    """Image to image (ControlNets as in text to image). Returns (images captioned with their seeds, seed used,
    parameters as JSON, share link)."""
    if image is None:
        raise gr.Error("Upload a starting image first (or send one here from Text to image).")
    form = form_of(locals())
    settings = settings_from_form(form)
    image = open_upload(image, max_pixels=LIMITS.max_upload_pixels)  # a bomb is refused from its header
    result, ran, images = run_sd(settings, progress, image=image, pictures=control_pictures(form))
    link = share_link("image_to_image", form_from_settings(ran), transform_image, request,
                      ["the starting image"] + left_behind(ran))
    return images, str(ran.seed), json.dumps(result.parameters, indent=2), link


@handler
def inpaint_image(model, image_and_mask, prompt, negative_prompt, strength, steps, guidance_scale, scheduler, seed,
                  number_of_images, controlnet_1="", controlnet_1_image=None, controlnet_1_preprocessor="none",
                  controlnet_1_scale=1.0, controlnet_1_start=0.0, controlnet_1_end=1.0, controlnet_2="",
                  controlnet_2_image=None, controlnet_2_preprocessor="none", controlnet_2_scale=1.0,
                  controlnet_2_start=0.0, controlnet_2_end=1.0, guess_mode=False, progress=gr.Progress(),
                  request: gr.Request = None):
    """Inpainting: repaint the painted region of the image (the editor's layers are the mask), keep the rest
    (ControlNets as in text to image). Returns (images captioned with their seeds, seed used, the image with the
    repainted region shown in red, parameters as JSON, share link)."""
    form = form_of(locals())
    settings = settings_from_form(form)
    image, mask = painted_mask(image_and_mask, LIMITS.max_upload_pixels)
    result, ran, images = run_sd(settings, progress, image=image, mask=mask, pictures=control_pictures(form))
    link = share_link("inpaint", form_from_settings(ran), inpaint_image, request,
                      ["the image and its mask"] + left_behind(ran))
    return images, str(ran.seed), mask_overlay(image, mask), json.dumps(result.parameters, indent=2), link


def left_behind(ran: GenerationSettings) -> list[str]:
    """The uploads a share link of this run cannot carry besides the tab's own: each ControlNet's image."""
    return [f"ControlNet {i}'s image" for i in range(1, len(ran.controlnets) + 1)]


@handler
def roundtrip(model, image, sample_posterior=False, seed=0):
    """VAE round trip. Returns (reconstruction, difference x4, PSNR dB, latent channels)."""
    image = open_upload(image, max_pixels=LIMITS.max_upload_pixels)  # a bomb is refused from its header
    seed = whole_number(0 if seed is None else seed, "seed", 0, MAX_SEED)
    pipe = MODELS.get(model)
    result = run_bounded(f"vae_roundtrip:{model}", image.width * image.height, 1, 1,
                         lambda: vae_roundtrip(pipe.vae, image, sample=flag(sample_posterior, "sample_posterior"),
                                                      seed=seed))
    channels = [(channel.resize((channel.width * 4, channel.height * 4), Image.NEAREST), f"channel {i}")
                for i, channel in enumerate(result.latent_channels)]
    return result.reconstruction, result.difference, round(result.psnr, 2), channels


@handler
def sample_dit(model, class_label, guidance_scale, steps, scheduler, seed, number_of_images, guided_channels="all",
               fast=False, dit_cache=0, guidance_until=1.0, progress=gr.Progress(), request: gr.Request = None):
    """DiT class-conditional sampling (`fast`: the approximate fast path, with FORA recomputing the blocks every
    `dit_cache` steps, 0 off, and guidance only for the `guidance_until` share of the schedule, 1 off). Returns
    (images captioned with their seeds, seed used, share link, the timestep semantics that ran)."""
    settings = dit_settings_from_form(form_of(locals()))
    pipe = MODELS.get(settings.model, progress)
    if not isinstance(pipe, DiTPipeline):
        raise gr.Error(f"{model} is not a DiT model.")
    settings = settings.replace(seed=resolve_seed(settings.seed))
    side = drawn_side(pipe)
    count = len(settings.class_labels)
    sample = fast_for(pipe, settings).generate_dit if settings.fast else functools.partial(generate_dit, pipe)
    with MODELS.using(pipe):  # FORA keeps features between steps: one request at a time on this model
        result = run_bounded(f"dit:{settings.model}", side * side, settings.steps, count,
                             lambda: sample(settings, callback=progress_callback(progress, settings.steps)))
    link = share_link("dit", dit_form_from_settings(settings), sample_dit, request)
    images = [(image, f"seed {s}") for image, s in zip(result.images, image_seeds(settings.seed, count, True))]
    return images, str(settings.seed), link, timestep_semantics(pipe)
