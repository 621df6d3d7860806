"""The app's page: one function per tab, and build() that puts them together with share links restored on load."""
import inspect
from pathlib import Path

import gradio as gr

from sd_core.app.blocks import Blocks
from sd_core.app.compare_tab import compare_tab
from sd_core.app.controlnet_section import PNG_CONTROLNET_FIELDS, controlnet_section, png_controlnets
from sd_core.app.forms import (
    DEEPCACHE_CHOICES,
    SHARE_CHOICES,
    dit_form_from_settings,
    dit_settings_from_form,
    form_from_settings,
    settings_from_form,
)
from sd_core.app.handlers import (
    DIT_DEFAULTS,
    MAX_BATCH,
    MAX_SIZE,
    MAX_STEPS,
    SD_DEFAULTS,
    generate_images,
    inpaint_image,
    roundtrip,
    sample_dit,
    transform_image,
)
from sd_core.app.inpaint_tab import inpaint_tab
from sd_core.app.lab_tab import lab_tab
from sd_core.app.parts import (
    EMBEDDED,
    MODELS,
    advanced_settings,
    dit_labels,
    hub_offered,
    image_upload,
    images_gallery,
    model_choices,
    model_dropdown,
    picked,
    png_info,
    random_seed,
    recommended_dit_settings,
    recommended_settings,
    refiner_choices,
    scheduler_dropdown,
    send_to_image_to_image,
    use_this_seed,
)
from sd_core.app.serving import numbers_choice, raw_value
from sd_core.app.share_links import restore
from sd_core.schedulers import DISPLAY_NAMES

DATA = Path(__file__).resolve().parents[1] / "data"
PHOTOS, EXAMPLE_SCENE = DATA / "photos", DATA / "example-scene.png"
CSS = (".pixelated img { image-rendering: pixelated; }\n"  # the embedded models draw 64 px: enlarge without blur
       # a phone stacks a tab's columns: the results come first, above the long form
       "@media (max-width: 768px) { .row:has(> .results) { flex-direction: column; } .results { order: -1; } }")


def example_images() -> list[str]:
    return [str(EXAMPLE_SCENE)] + sorted(str(p) for p in PHOTOS.glob("*.png"))


def seed_box() -> gr.Number:
    return raw_value(gr.Number(-1, label="Seed", info="-1: random; image k uses seed + k", precision=0))


def controlnets_by_name(inputs: list, fn, names: list) -> list:
    """The components among a tab's `inputs` (in `fn`'s parameter order) named `names`."""
    by_name = dict(zip(inspect.signature(fn).parameters, inputs))
    return [by_name[name] for name in names]


def deepest_clip_skip(choice: str | None) -> int | None:
    """The largest clip skip a model's text encoders take (each keeps at least one layer; SDXL starts from the
    penultimate); None for a model not on this disk or not loaded (never downloaded just to ask)."""
    try:
        local = choice in EMBEDDED or str(choice).startswith("models: ")
        pipe = MODELS.get(choice) if choice and (local or choice in MODELS) else None
    except gr.Error:
        return None
    encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2")]
    depths = [len(getattr(e, "text_model", e).encoder.layers) for e in encoders if e is not None]
    return min(depths) - (2 if pipe.family == "sdxl" else 1) if depths else None


def clip_skip_slider(model: str):
    """The clip-skip slider for a newly picked model: its maximum the model's own (unchanged when unknown)."""
    deepest = deepest_clip_skip(model)
    return gr.skip() if deepest is None else gr.Slider(maximum=deepest)


def follow_clip_skip(model: gr.Dropdown, advanced: list):
    """The clip-skip slider of `advanced` (advanced_settings' second) bounded by the picked model's encoder."""
    clip_skip = advanced[1]
    clip_skip.maximum = deepest_clip_skip(model.value) or clip_skip.maximum
    model.change(clip_skip_slider, model, clip_skip, api_name=False)


def sampling_controls() -> tuple:
    """Steps, guidance and scheduler in a row, at the embedded model's settings (a model's pick changes them)."""
    with gr.Row():
        steps = raw_value(gr.Slider(1, MAX_STEPS, SD_DEFAULTS.steps, step=1, label="Steps"))
        guidance = raw_value(gr.Slider(0, 20, SD_DEFAULTS.guidance_scale, step=0.5, label="Guidance scale"))
        return steps, guidance, scheduler_dropdown(SD_DEFAULTS.scheduler)


def text_to_image_tab(models: list) -> dict:
    """The Text to image tab; returns its components that other tabs and share links use."""
    first_sd = models[0][1] if models else None
    with gr.Row():
        with gr.Column():
            model = model_dropdown(models)
            prompt = gr.Textbox("a big red circle on the left on a gray background", label="Prompt")
            negative = gr.Textbox("", label="Negative prompt")
            run = gr.Button("Generate", variant="primary")
            steps, guidance, scheduler = sampling_controls()
            with gr.Row():
                width = raw_value(gr.Slider(8, MAX_SIZE, SD_DEFAULTS.size, step=8, label="Width"))
                height = raw_value(gr.Slider(8, MAX_SIZE, SD_DEFAULTS.size, step=8, label="Height"))
                batch = raw_value(gr.Slider(1, MAX_BATCH, 4, step=1, label="Number of images"))
            with gr.Row():
                seed = seed_box()
                dice = gr.Button("🎲 Random seed", size="sm", min_width=60)
                trajectory_on = gr.Checkbox(False, label="Show trajectory (the x0 estimate per step)")
            advanced = advanced_settings(refiners=refiner_choices(), fast=True)
            controlnets = controlnet_section()
            png = gr.File(label="PNG Info: drop a PNG made by sd_core or AUTOMATIC1111 to load its settings",
                          file_types=[".png"], height=90)
            png_read = gr.Markdown(label="PNG Info note")
            png_controlnets_read = gr.Markdown(label="PNG Info ControlNet note")
        with gr.Column(elem_classes="results"):
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
    follow_clip_skip(model, advanced)
    t2i_inputs = [model, prompt, negative, steps, guidance, scheduler, width, height, seed, batch,
                  trajectory_on] + advanced + controlnets
    t2i_outputs = [gallery, used_seed, trajectory, parameters, link]
    run.click(generate_images, t2i_inputs, t2i_outputs, api_name="text_to_image")
    png.upload(png_info, png, [model, prompt, negative, steps, guidance, scheduler, width, height, seed]
               + advanced[:2] + [png_read], api_name="png_info")
    png.upload(png_controlnets, png, controlnets_by_name(t2i_inputs, generate_images, PNG_CONTROLNET_FIELDS)
               + [png_controlnets_read], api_name="png_info_controlnets")
    if first_sd:
        examples = [["a small blue square in the center on a white background", "dpmpp_2m", 1, False],
                    ["a big yellow triangle on the right on a black background", "euler", 7, True]]
        gr.Examples([[first_sd, text, "", SD_DEFAULTS.steps, SD_DEFAULTS.guidance_scale, sampler, 64, 64,
                      number, 4, show] for text, sampler, number, show in examples],
                    t2i_inputs[:11], t2i_outputs, generate_images, cache_examples=False, run_on_click=True,
                    example_labels=[f"{text} ({DISPLAY_NAMES[sampler]}, seed {number})"
                                    for text, sampler, number, _ in examples])
    send_from = [gallery, selected, model, prompt, negative, steps, guidance, scheduler]
    return dict(inputs=t2i_inputs, outputs=t2i_outputs, send=send, send_from=send_from)


def image_to_image_tab(models: list, text_tab: dict, tabs: gr.Tabs) -> dict:
    """The Image to image tab; Text to image's "Send to image to image" fills it. Returns its inputs and outputs
    (share links restore them)."""
    first_sd = models[0][1] if models else None
    with gr.Row():
        with gr.Column():
            i2i_model = model_dropdown(models)
            i2i_image = image_upload(label="Starting image", height=256)
            i2i_prompt = gr.Textbox("a big blue circle on the left on a gray background", label="Prompt")
            i2i_negative = gr.Textbox("", label="Negative prompt")
            i2i_run = gr.Button("Transform", variant="primary")
            i2i_strength = raw_value(gr.Slider(0, 1, 0.6, step=0.05,
                                               label="Strength (0: keep the image; 1: ignore it)"))
            i2i_steps, i2i_guidance, i2i_scheduler = sampling_controls()
            with gr.Row():
                i2i_seed = seed_box()
                i2i_batch = raw_value(gr.Slider(1, MAX_BATCH, 4, step=1, label="Number of images"))
            i2i_advanced = advanced_settings()
            i2i_controlnets = controlnet_section()
        with gr.Column(elem_classes="results"):
            i2i_gallery = images_gallery()
            i2i_used_seed = gr.Textbox(label="Seed used", placeholder="run first", interactive=False)
            i2i_parameters = gr.Code(label="Parameters", language="json")
            i2i_link = gr.Markdown(label="Share link")
    i2i_inputs = [i2i_model, i2i_image, i2i_prompt, i2i_negative, i2i_strength, i2i_steps, i2i_guidance,
                  i2i_scheduler, i2i_seed, i2i_batch] + i2i_advanced + i2i_controlnets
    i2i_outputs = [i2i_gallery, i2i_used_seed, i2i_parameters, i2i_link]
    follow_clip_skip(i2i_model, i2i_advanced)
    i2i_run.click(transform_image, i2i_inputs, i2i_outputs, api_name="image_to_image")
    text_tab["send"].click(send_to_image_to_image, text_tab["send_from"],
               [i2i_image, i2i_model, i2i_prompt, i2i_negative, i2i_steps, i2i_guidance, i2i_scheduler, tabs],
               api_name=False)
    if first_sd:
        gr.Examples([[first_sd, str(EXAMPLE_SCENE), "a big blue circle on the left on a gray background", "", 0.6,
                      SD_DEFAULTS.steps, SD_DEFAULTS.guidance_scale, SD_DEFAULTS.scheduler, 0, 4]],
                    i2i_inputs[:10], i2i_outputs, transform_image, cache_examples=False, run_on_click=True,
                    example_labels=["the example scene, a blue circle (seed 0)"])
    return dict(inputs=i2i_inputs, outputs=i2i_outputs)


def vae_tab(first_sd: str | None):
    """The VAE round-trip tab, with the example pictures when an embedded model is offered."""
    with gr.Row():
        with gr.Column():
            vae_model = model_dropdown(model_choices("any"), "Model (its VAE)")
            image = image_upload(label="Image", height=256)
            sample_posterior = gr.Checkbox(False, label="Sample posterior (else its mean)")
            vae_seed = raw_value(gr.Number(0, label="Seed for the sample", precision=0))
            vae_run = gr.Button("Round-trip", variant="primary")
        with gr.Column(elem_classes="results"):
            with gr.Row():
                reconstruction = gr.Image(label="Reconstruction", format="png", height=256,
                                          elem_classes="pixelated")
                difference = gr.Image(label="|difference| x 4", format="png", height=256,
                                      elem_classes="pixelated")
            psnr = gr.Number(None, label="PSNR (dB)", placeholder="run first", interactive=False)
            channels = images_gallery("Latent channels")
    vae_inputs = [vae_model, image, sample_posterior, vae_seed]
    vae_outputs = [reconstruction, difference, psnr, channels]
    vae_run.click(roundtrip, vae_inputs, vae_outputs, api_name="vae_roundtrip")
    if example_images() and first_sd:
        gr.Examples([[first_sd, path, False, 0] for path in example_images()], vae_inputs, vae_outputs,
                    roundtrip, cache_examples=False, run_on_click=True, examples_per_page=8)


def dit_tab(models: list) -> dict:
    """The DiT tab; returns its inputs and outputs (share links restore them)."""
    first_dit = models[0][1] if models else None
    with gr.Row():
        with gr.Column():
            dit_model = model_dropdown(models)
            labels = dit_labels(first_dit) if first_dit else []
            class_label = gr.Dropdown(labels, value=labels[0] if labels else None, allow_custom_value=True,
                                      label="Class label (name or id)")
            with gr.Row():
                dit_guidance = raw_value(gr.Slider(0, 10, DIT_DEFAULTS.guidance_scale, step=0.5,
                                                   label="Guidance scale"))
                dit_steps = raw_value(gr.Slider(1, MAX_STEPS, DIT_DEFAULTS.steps, step=1, label="Steps"))
            dit_scheduler = scheduler_dropdown(DIT_DEFAULTS.scheduler)
            with gr.Row():
                dit_seed = seed_box()
                dit_batch = raw_value(gr.Slider(1, MAX_BATCH, 4, step=1, label="Number of images"))
            guided_channels = gr.Radio(["all", "first3"], value="all",
                                       label="Guided channels (all: diffusers; first3: original DiT code)")
            with gr.Accordion("Fast path", open=False):
                with gr.Row():
                    dit_fast = [gr.Checkbox(False, label="Fast path (approximate)"),
                                numbers_choice(gr.Dropdown(DEEPCACHE_CHOICES, value=0,
                                                           label="FORA: DiT cache interval")),
                                numbers_choice(gr.Dropdown(SHARE_CHOICES, value=1.0, label="Guidance until"))]
                gr.Markdown("Not the parity path: its images differ from diffusers'. FORA recomputes the transformer's "
                            "blocks every N steps and reuses their outputs between; Guidance until drops the "
                            "unconditional pass after that share of the noise schedule.")
            dit_run = gr.Button("Sample", variant="primary")
        with gr.Column(elem_classes="results"):
            dit_gallery = images_gallery()
            dit_used_seed = gr.Textbox(label="Seed used", placeholder="run first", interactive=False)
            dit_link = gr.Markdown(label="Share link")
            dit_semantics = gr.Markdown(label="Timestep semantics")
    dit_model.change(lambda m: gr.Dropdown(choices=dit_labels(m)), dit_model, class_label, api_name=False)
    dit_model.input(recommended_dit_settings, dit_model, [dit_guidance, dit_steps, dit_scheduler],
                    api_name="recommended_dit_settings")
    dit_inputs = [dit_model, class_label, dit_guidance, dit_steps, dit_scheduler, dit_seed, dit_batch,
                  guided_channels, *dit_fast]
    dit_outputs = [dit_gallery, dit_used_seed, dit_link, dit_semantics]
    dit_run.click(sample_dit, dit_inputs, dit_outputs, api_name="dit_sample")
    if first_dit:
        gr.Examples([[first_dit, "red circle", DIT_DEFAULTS.guidance_scale, DIT_DEFAULTS.steps, "dpmpp_2m", 0,
                      4, "all", False, 0, 1.0],
                     [first_dit, "blue triangle", DIT_DEFAULTS.guidance_scale, DIT_DEFAULTS.steps, "ddim", 1,
                      4, "first3", False, 0, 1.0]],
                    dit_inputs, dit_outputs, sample_dit, cache_examples=False, run_on_click=True,
                    example_labels=["red circle (DPM++ 2M, seed 0)", "blue triangle (DDIM, first3, seed 1)"])
    return dict(inputs=dit_inputs, outputs=dit_outputs)


def build(comparisons) -> gr.Blocks:
    """The whole page; `comparisons` (compare.kinds) feeds the Compare tab."""
    t2i_models, dit_models = model_choices("text_to_image"), model_choices("dit")
    first_sd = t2i_models[0][1] if t2i_models else None
    with Blocks(title="sd_core", delete_cache=(600, 3600)) as demo:
        gr.Markdown("# sd_core\nStable Diffusion and DiT written from scratch in PyTorch, checked number by number "
                    "against diffusers. The embedded models are small, trained here on simple shapes"
                    + (", the hub models are the released checkpoints." if hub_offered() else "."))
        with gr.Tabs() as tabs:
            with gr.Tab("Text to image", id="text_to_image"):
                text_tab = text_to_image_tab(t2i_models)
            with gr.Tab("Image to image", id="image_to_image"):
                i2i_tab = image_to_image_tab(t2i_models, text_tab, tabs)
            with gr.Tab("Inpaint", id="inpaint"):
                painting = inpaint_tab(t2i_models, inpaint_image, str(EXAMPLE_SCENE) if first_sd else None,
                                       SD_DEFAULTS, MAX_STEPS, MAX_BATCH, controlnet_section)
            with gr.Tab("VAE round-trip", id="vae"):
                vae_tab(first_sd)
            with gr.Tab("DiT", id="dit"):
                dit = dit_tab(dit_models)
            with gr.Tab("Compare", id="compare"):
                compare_tab(comparisons)
            with gr.Tab("Lab", id="lab"): lab_tab(comparisons)  # noqa: E701
        shareable = {"text_to_image": (generate_images, text_tab["inputs"], text_tab["outputs"], settings_from_form,
                                       form_from_settings),
                     "image_to_image": (transform_image, i2i_tab["inputs"], i2i_tab["outputs"], settings_from_form,
                                        form_from_settings),
                     "inpaint": (inpaint_image, painting["inputs"], painting["outputs"], settings_from_form,
                                 form_from_settings),
                     "dit": (sample_dit, dit["inputs"], dit["outputs"], dit_settings_from_form, dit_form_from_settings)}
        load_outputs = [tabs] + [c for _, inputs, outputs, *_ in shareable.values() for c in inputs + outputs]

        def on_load(request: gr.Request):
            return restore(shareable, request)
        demo.load(on_load, None, load_outputs, api_name=False)
    return demo
