"""sd_core's Gradio app: text to image, VAE round-trip, DiT sampling, and sd_core vs diffusers side by side.

    python app.py                                  # the embedded models, offline, on this machine
    python app.py --models-dir ~/models --share    # also offer the checkpoints found under ~/models

Visitors pick models from a list: the embedded ones, folders and .safetensors files under the
configured model roots (--models-dir / SD_CORE_MODELS_DIR), and hub ids when --allow-hub is given.
A path typed into the API is accepted only if it resolves inside a model root. Where the hub is reachable
(a Hugging Face Space, where SPACE_ID is set, or --allow-hub) the curated hub models of sd_core.catalog are
offered too, fetched from the hub and never looked up on this disk.

On a Space the app starts unchanged: gradio reads GRADIO_SERVER_NAME / GRADIO_SERVER_PORT itself, and on
ZeroGPU hardware the handlers run inside `spaces.GPU`.
"""
import argparse
import functools
import gc
import inspect
import json
import logging
import os
import threading
import urllib.parse
from collections import OrderedDict
from pathlib import Path

import gradio as gr
import numpy as np
import torch
from PIL import Image

from compare.parity import run_parity
from sd_core import catalog
from sd_core.catalog import CatalogModel
from sd_core.components import DiTPipeline, StableDiffusionPipeline
from sd_core.convert import CheckpointError
from sd_core.loading import HUB_ID, load_from_hub, load_pipeline
from sd_core.pipelines import MAX_SEED, dit_sample, preview, resolve_seed, text_to_image, vae_roundtrip
from sd_core.schedulers import DISPLAY_NAMES, SCHEDULER_NAMES

LOG = logging.getLogger("sd_core.app")
EMBEDDED = {name: Path(model.source) for name, model in catalog.EMBEDDED.items()}
HUB_BY_SOURCE = {model.source: model for model in catalog.HUB.values()}
PHOTOS = Path(__file__).resolve().parent / "sd_core" / "data" / "photos"
EXAMPLE_SCENE = Path(__file__).resolve().parent / "sd_core" / "data" / "example-scene.png"
MAX_SIZE, MAX_STEPS, MAX_BATCH = 1024, 100, 8
MODEL_DEFAULT = "default"  # scheduler choice: the one the model's own scheduler config names
SCHEDULER_CHOICES = [(DISPLAY_NAMES.get(name, name), name) for name in SCHEDULER_NAMES] + [
    ("the model's own", MODEL_DEFAULT)]
SD_DEFAULTS, DIT_DEFAULTS = catalog.EMBEDDED["embedded: shapes (text to image)"], catalog.EMBEDDED["embedded: shapes (DiT)"]
CSS = ".pixelated img { image-rendering: pixelated; }"  # the embedded models draw 64 px: enlarge without blur


class Settings:
    """What the server operator chose (command line / environment), not what a visitor sends."""
    model_roots: list[Path] = [Path(p).resolve() for p in os.environ.get("SD_CORE_MODELS_DIR", "").split(os.pathsep) if p]
    allow_hub: bool = os.environ.get("SD_CORE_ALLOW_HUB") == "1"  # any owner/name a visitor types
    device: str = "cuda" if torch.cuda.is_available() else "cpu"
    dtype: torch.dtype = torch.float16 if torch.cuda.is_available() else torch.float32


def hub_offered() -> bool:
    """The curated hub models are offered where the hub is reachable: on a Space, or when the operator allows it."""
    return Settings.allow_hub or bool(os.environ.get("SPACE_ID"))


def model_choices(kind: str) -> list[tuple[str, str]]:
    """(label, value) pairs a visitor may pick: embedded models, what lies under the model roots, curated hub models."""
    names = [(name, name) for name, model in catalog.EMBEDDED.items()
             if Path(model.source).is_dir() and kind in ("any", model.kind)]
    for root in Settings.model_roots:
        if root.is_dir():
            found = sorted([p.parent for p in root.glob("*/model_index.json")] + list(root.glob("*.safetensors")))
            names += [(f"models: {p.relative_to(root)}",) * 2 for p in found]
    if hub_offered():
        names += [(f"{model.name} (hub, {model.download_gb:g} GB)", model.name) for model in catalog.HUB.values()
                  if kind in ("any", model.kind)]
    return names


def resolve_source(choice: str) -> Path | str:
    """A visitor's model choice -> a local Path (embedded or under a model root) or a hub repo id (a str).
    A hub-shaped string is never looked up on the local disk."""
    choice = (choice or "").strip()
    if choice in EMBEDDED:
        return EMBEDDED[choice]
    relative = choice.removeprefix("models: ")
    for root in Settings.model_roots:
        candidate = (root / relative).resolve()
        if candidate.is_relative_to(root) and candidate.exists() and choice.startswith("models: "):
            return candidate
    if hub_offered() and (choice in catalog.HUB or choice in HUB_BY_SOURCE):
        return catalog.HUB[choice].source if choice in catalog.HUB else choice
    if Settings.allow_hub and HUB_ID.match(choice):
        return choice
    raise gr.Error(f"{choice!r} is not one of the offered models. Pick one from the list"
                   + (" or give a hub id like owner/model." if Settings.allow_hub else "."))


def catalog_entry(choice: str) -> CatalogModel | None:
    return catalog.EMBEDDED.get(choice) or catalog.HUB.get(choice) or HUB_BY_SOURCE.get(choice)


def available_memory_gb() -> float:
    """Free memory where the weights will live: the GPU's, else the machine's RAM."""
    if Settings.device == "cuda":
        try:
            return torch.cuda.mem_get_info()[0] / 1e9
        except RuntimeError:  # ZeroGPU: no GPU attached outside a spaces.GPU call; it lends a whole one
            return float("inf")
    try:
        import psutil
        return psutil.virtual_memory().available / 1e9
    except ImportError:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9


def check_fits(model: CatalogModel):
    bytes_per_parameter = torch.finfo(Settings.dtype).bits // 8
    needed, free = model.memory_needed_gb(bytes_per_parameter), available_memory_gb()
    if needed > free:
        where = "GPU memory" if Settings.device == "cuda" else "RAM"
        raise gr.Error(f"{model.name} needs about {needed:.1f} GB of {where} for its weights ({Settings.dtype}); this "
                       f"machine has {free:.1f} GB free. Pick a smaller model, or run the app on a larger machine.")


class ModelCache:
    """The last few loaded pipelines; older ones are dropped (and their memory freed) when others load."""

    def __init__(self, size: int = 2):
        self.size, self.models, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, choice: str, progress=None):
        source = resolve_source(choice)
        with self.lock:
            if source in self.models:
                self.models.move_to_end(source)
                return self.models[source]
            try:
                pipe = self.load(source, progress)
            except (CheckpointError, OSError, ValueError) as error:  # OSError: missing files, no network
                raise gr.Error(str(error)) from None
            self.models[source] = pipe
            while len(self.models) > self.size:
                self.models.popitem(last=False)
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            return pipe

    @staticmethod
    def load(source: Path | str, progress=None):
        if isinstance(source, Path):
            return load_pipeline(source, dtype=Settings.dtype, device=Settings.device)
        if source in HUB_BY_SOURCE:
            check_fits(HUB_BY_SOURCE[source])

        def on_file(name, index, total, size):
            if progress is not None:
                progress((index - 1, total), desc=f"downloading {source}: {name} ({size / 1e9:.2f} GB)")
        variant = "fp16" if Settings.dtype == torch.float16 else None
        return load_from_hub(source, dtype=Settings.dtype, device=Settings.device, variant=variant, on_file=on_file)


MODELS = ModelCache()


def gpu_seconds(arguments: dict) -> int:
    """How long a request may hold a ZeroGPU GPU: loading, plus steps x images x megapixels."""
    try:
        pixels = int(arguments.get("width") or 512) * int(arguments.get("height") or 512)
        work = int(arguments.get("steps") or 25) * int(arguments.get("number_of_images") or 1) * max(pixels / 512 ** 2, 0.25)
    except (TypeError, ValueError):
        return 60
    return int(min(30 + 0.25 * work, 300))


def on_gpu(fn):
    """ZeroGPU Spaces lend a GPU only inside functions wrapped by `spaces.GPU`; where that package is not
    installed nothing changes."""
    try:
        import spaces
    except ImportError:
        return fn
    signature = inspect.signature(fn)

    def duration(*args, **kwargs):
        bound = signature.bind_partial(*args, **kwargs)
        return gpu_seconds(bound.arguments)
    return functools.wraps(fn)(spaces.GPU(duration=duration)(fn))


def user_errors(fn):
    """Turn bad input (ValueError/TypeError from sd_core) into a gr.Error the visitor reads, logged as one line;
    the app keeps serving. The handler's signature is kept: gradio names the API parameters after it."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error as error:
            LOG.warning("%s refused: %s", fn.__name__, error.message)
            raise
        except (ValueError, TypeError, FileNotFoundError, CheckpointError) as error:
            LOG.warning("%s refused: %s", fn.__name__, error)
            raise gr.Error(str(error)) from None
    return wrapped


def handler(fn):
    return on_gpu(user_errors(fn))


def as_int(value, name: str, low: int, high: int) -> int:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or float(value) != int(value):
        raise gr.Error(f"{name} must be a whole number; got {value!r}.")
    number = int(value)
    if not low <= number <= high:
        raise gr.Error(f"{name} must be between {low} and {high}; got {number}.")
    return number


def seed_of(seed) -> int:
    """A visitor's seed: -1 (or empty) draws a random one, anything else must be a valid seed."""
    return resolve_seed(None if seed is None or seed < 0 else as_int(seed, "seed", 0, MAX_SEED))


def progress_callback(progress, total: int, pipe=None, trajectory: list | None = None):
    def callback(step, timestep, latents, x0):
        progress((step + 1, total), desc="denoising")
        if trajectory is not None:
            trajectory.append((preview(pipe, x0), f"step {step + 1}"))
    return callback


def share_link(tab: str, settings: dict, request: gr.Request | None = None) -> str:
    """A Markdown link that reopens the app on this tab with these settings (read back by `restore`)."""
    query = urllib.parse.urlencode({"tab": tab, **{k: v for k, v in settings.items() if v is not None}})
    if os.environ.get("SPACE_ID"):
        base = f"https://huggingface.co/spaces/{os.environ['SPACE_ID']}"
    elif request is not None and request.headers.get("referer"):
        base = request.headers["referer"].split("?")[0].split("#")[0]
    else:
        base = ""
    return f"[🔗 Link to this result and its settings]({base}?{query})"


@handler
def generate_images(model, prompt, negative_prompt, steps, guidance_scale, scheduler, width, height, seed,
                    number_of_images, show_trajectory=False, progress=gr.Progress(), request: gr.Request = None):
    """Text to image. Returns (images, used seed, trajectory of x0 previews, parameters as JSON, share link)."""
    pipe = MODELS.get(model, progress)
    if not isinstance(pipe, StableDiffusionPipeline):
        raise gr.Error(f"{model} is a DiT model: use the DiT tab.")
    steps = as_int(steps, "steps", 1, MAX_STEPS)
    width, height = as_int(width, "width", 8, MAX_SIZE), as_int(height, "height", 8, MAX_SIZE)
    number_of_images = as_int(number_of_images, "number_of_images", 1, MAX_BATCH)
    seed = seed_of(seed)
    trajectory = [] if show_trajectory else None
    result = text_to_image(pipe, prompt or "", negative_prompt or None, steps=steps, guidance_scale=float(guidance_scale),
                           scheduler=None if scheduler == MODEL_DEFAULT else scheduler, width=width, height=height,
                           seed=seed, images_per_prompt=number_of_images,
                           callback=progress_callback(progress, steps, pipe, trajectory))
    link = share_link("text_to_image", dict(model=model, prompt=prompt, negative_prompt=negative_prompt, steps=steps,
                                            guidance_scale=guidance_scale, scheduler=scheduler, width=width,
                                            height=height, seed=seed, number_of_images=number_of_images), request)
    return result.images, seed, trajectory or [], json.dumps(result.parameters, indent=2), link


@handler
def roundtrip(model, image, sample_posterior=False, seed=0):
    """VAE round trip. Returns (reconstruction, difference x4, PSNR dB, latent channels)."""
    if image is None:
        raise gr.Error("Upload an image (or pick an example) first.")
    pipe = MODELS.get(model)
    result = vae_roundtrip(pipe.vae, image, sample=bool(sample_posterior), seed=int(seed or 0))
    channels = [(channel.resize((channel.width * 4, channel.height * 4), Image.NEAREST), f"channel {i}")
                for i, channel in enumerate(result.latent_channels)]
    return result.reconstruction, result.difference, round(result.psnr, 2), channels


@handler
def sample_dit(model, class_label, guidance_scale, steps, scheduler, seed, number_of_images, guided_channels="all",
               progress=gr.Progress(), request: gr.Request = None):
    """DiT class-conditional sampling. Returns (images, used seed, share link)."""
    pipe = MODELS.get(model, progress)
    if not isinstance(pipe, DiTPipeline):
        raise gr.Error(f"{model} is not a DiT model.")
    steps = as_int(steps, "steps", 1, MAX_STEPS)
    number_of_images = as_int(number_of_images, "number_of_images", 1, MAX_BATCH)
    seed = seed_of(seed)
    result = dit_sample(pipe, [str(class_label)] * number_of_images, guidance_scale=float(guidance_scale), steps=steps,
                        scheduler=None if scheduler == MODEL_DEFAULT else scheduler, seed=seed,
                        guided_channels=guided_channels, callback=progress_callback(progress, steps))
    link = share_link("dit", dict(model=model, class_label=class_label, guidance_scale=guidance_scale, steps=steps,
                                  scheduler=scheduler, seed=seed, number_of_images=number_of_images,
                                  guided_channels=guided_channels), request)
    return result.images, seed, link


@handler
def compare_models(model, prompt, negative_prompt, seed, steps, scheduler, guidance_scale, progress=gr.Progress()):
    """sd_core beside diffusers on the same weights and noise. Returns (sd_core image, diffusers image,
    difference map, per-stage table, verdict and first divergent module)."""
    pipe = MODELS.get(model, progress)
    if not isinstance(pipe, StableDiffusionPipeline):
        raise gr.Error("Compare runs text-to-image models; pick a Stable Diffusion model.")
    progress(0, desc="running sd_core and diffusers")
    report = run_parity(pipe, prompt or "", negative_prompt or None, seed=as_int(seed, "seed", 0, MAX_SEED),
                        steps=as_int(steps, "steps", 1, 50), scheduler=None if scheduler == MODEL_DEFAULT else scheduler,
                        guidance_scale=float(guidance_scale))
    rows = [[s.name, f"{s.max_abs:.3g}", f"{s.relative:.3g}", f"{s.cosine:.8f}", "pass" if s.passed else "FAIL"]
            for s in report.stages]
    first = report.divergence["first_divergent"]
    verdict = (f"## {'✅ PASS' if report.passed else '❌ FAIL'}\n{len(report.stages)} stages compared. "
               f"Difference map: |sd_core - diffusers| x {report.images['difference_scale']:g}. "
               f"Per-layer check of the UNet ({report.divergence['modules_compared']} modules): "
               + (f"first divergent module `{first['name']}` (relative error {first['relative']:.3g})."
                  if first else "no module differs beyond 1e-4."))
    return report.images["sd_core"], report.images["diffusers"], report.images["difference"], rows, verdict


def recommended_settings(model):
    """A catalog model's recommended steps, guidance, scheduler, width and height (unchanged for other models)."""
    entry = catalog_entry(model)
    if entry is None:
        return [gr.skip()] * 5
    return entry.steps, entry.guidance_scale, entry.scheduler or MODEL_DEFAULT, entry.size, entry.size


def recommended_dit_settings(model):
    """A catalog DiT model's recommended guidance, steps and scheduler."""
    entry = catalog_entry(model)
    if entry is None:
        return [gr.skip()] * 3
    return entry.guidance_scale, entry.steps, entry.scheduler or MODEL_DEFAULT


def random_seed() -> int:
    return int(np.random.randint(0, MAX_SEED))


def example_images() -> list[str]:
    return [str(EXAMPLE_SCENE)] + sorted(str(p) for p in PHOTOS.glob("*.png"))


def query_value(component, text: str):
    """A setting read from a shared link, in the component's type; None when it does not fit the component."""
    try:
        if isinstance(component, gr.Checkbox):
            return text.lower() == "true"
        if isinstance(component, (gr.Slider, gr.Number)):
            number = float(text)
            return int(number) if number.is_integer() else number
    except ValueError:
        return None
    if isinstance(component, (gr.Dropdown, gr.Radio)) and not getattr(component, "allow_custom_value", False):
        return text if text in [value for _, value in component.choices] else None
    return text


def restore(shareable: dict, request: gr.Request | None):
    """Page load: the settings of a shared link (?tab=...&model=...), and on the embedded models a first result so
    nobody looks at empty boxes. Returns updates for the tabs, then each tab's inputs and outputs."""
    query = dict(request.query_params) if request is not None else {}
    tab = query.get("tab") if query.get("tab") in shareable else "text_to_image"
    updates = [gr.Tabs(selected=tab)]
    for name, (fn, inputs, outputs) in shareable.items():
        if name != tab:
            updates += [gr.skip()] * (len(inputs) + len(outputs))
            continue
        values = [component.value for component in inputs]
        for i, (parameter, component) in enumerate(zip(inspect.signature(fn).parameters, inputs)):
            if parameter in query:
                value = query_value(component, query[parameter])
                if value is None:
                    gr.Warning(f"The link's {parameter}={query[parameter]!r} does not fit this app; kept {values[i]!r}.")
                else:
                    values[i] = value
        results = [gr.skip()] * len(outputs)
        if values[0] in EMBEDDED:  # fast; a hub model waits for the visitor's click (it may download gigabytes)
            try:
                results = list(fn(*values, request=request))
            except gr.Error as error:
                gr.Warning(f"The link's settings did not run: {error.message}")
        updates += values + results
    return updates


def model_dropdown(choices: list, label: str = "Model") -> gr.Dropdown:
    return gr.Dropdown(choices, value=choices[0][1] if choices else None, label=label,
                       allow_custom_value=Settings.allow_hub)


def scheduler_dropdown(value: str) -> gr.Dropdown:
    return gr.Dropdown(SCHEDULER_CHOICES, value=value, label="Scheduler")


def build() -> gr.Blocks:
    t2i_models, dit_models = model_choices("text_to_image"), model_choices("dit")
    first_sd = t2i_models[0][1] if t2i_models else None
    first_dit = dit_models[0][1] if dit_models else None
    with gr.Blocks(title="sd_core") as demo:
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
                        with gr.Row():
                            steps = gr.Slider(1, MAX_STEPS, SD_DEFAULTS.steps, step=1, label="Steps")
                            guidance = gr.Slider(0, 20, SD_DEFAULTS.guidance_scale, step=0.5, label="Guidance scale")
                            scheduler = scheduler_dropdown(SD_DEFAULTS.scheduler)
                        with gr.Row():
                            width = gr.Slider(64, MAX_SIZE, SD_DEFAULTS.size, step=8, label="Width")
                            height = gr.Slider(64, MAX_SIZE, SD_DEFAULTS.size, step=8, label="Height")
                            batch = gr.Slider(1, MAX_BATCH, 4, step=1, label="Number of images")
                        with gr.Row():
                            seed = gr.Number(-1, label="Seed (-1: random)", precision=0)
                            dice = gr.Button("🎲", size="sm", min_width=60)
                            trajectory_on = gr.Checkbox(False, label="Show trajectory (the x0 estimate per step)")
                    with gr.Column():
                        gallery = gr.Gallery(label="Images", columns=4, height="auto", format="png",
                                             elem_classes="pixelated")
                        used_seed = gr.Number(None, label="Seed used (type it above to reproduce)", precision=0)
                        link = gr.Markdown(label="Share link")
                        trajectory = gr.Gallery(label="Trajectory", columns=6, height="auto", format="png",
                                                elem_classes="pixelated")
                        parameters = gr.Code(label="Parameters", language="json")
                dice.click(random_seed, None, seed, api_name=False)
                model.input(recommended_settings, model, [steps, guidance, scheduler, width, height],
                            api_name="recommended_settings")
                t2i_inputs = [model, prompt, negative, steps, guidance, scheduler, width, height, seed, batch,
                              trajectory_on]
                t2i_outputs = [gallery, used_seed, trajectory, parameters, link]
                run.click(generate_images, t2i_inputs, t2i_outputs, api_name="text_to_image")
                if first_sd:
                    examples = [["a small blue square in the center on a white background", "dpmpp_2m", 1, False],
                                ["a big yellow triangle on the right on a black background", "euler", 7, True]]
                    gr.Examples([[first_sd, text, "", SD_DEFAULTS.steps, SD_DEFAULTS.guidance_scale, sampler, 64, 64,
                                  number, 4, show] for text, sampler, number, show in examples],
                                t2i_inputs, t2i_outputs, generate_images, cache_examples=False,
                                example_labels=[f"{text} ({DISPLAY_NAMES[sampler]}, seed {number})"
                                                for text, sampler, number, _ in examples])
            with gr.Tab("VAE round-trip", id="vae"):
                with gr.Row():
                    with gr.Column():
                        vae_model = model_dropdown(model_choices("any"), "Model (its VAE)")
                        image = gr.Image(type="pil", label="Image", height=256)
                        sample_posterior = gr.Checkbox(False, label="Sample posterior (else its mean)")
                        vae_seed = gr.Number(0, label="Seed for the sample", precision=0)
                        vae_run = gr.Button("Round-trip", variant="primary")
                    with gr.Column():
                        with gr.Row():
                            reconstruction = gr.Image(label="Reconstruction", format="png", height=256,
                                                      elem_classes="pixelated")
                            difference = gr.Image(label="|difference| x 4", format="png", height=256,
                                                  elem_classes="pixelated")
                        psnr = gr.Number(None, label="PSNR (dB)")
                        channels = gr.Gallery(label="Latent channels", columns=4, height="auto", format="png",
                                              elem_classes="pixelated")
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
                            dit_guidance = gr.Slider(0, 10, DIT_DEFAULTS.guidance_scale, step=0.5, label="Guidance scale")
                            dit_steps = gr.Slider(1, MAX_STEPS, DIT_DEFAULTS.steps, step=1, label="Steps")
                        dit_scheduler = scheduler_dropdown(DIT_DEFAULTS.scheduler)
                        with gr.Row():
                            dit_seed = gr.Number(-1, label="Seed (-1: random)", precision=0)
                            dit_batch = gr.Slider(1, MAX_BATCH, 4, step=1, label="Number of images")
                        guided_channels = gr.Radio(["all", "first3"], value="all",
                                                   label="Guided channels (all: diffusers; first3: original DiT code)")
                        dit_run = gr.Button("Sample", variant="primary")
                    with gr.Column():
                        dit_gallery = gr.Gallery(label="Images", columns=4, height="auto", format="png",
                                                 elem_classes="pixelated")
                        dit_used_seed = gr.Number(None, label="Seed used", precision=0)
                        dit_link = gr.Markdown(label="Share link")
                dit_model.change(lambda m: gr.Dropdown(choices=dit_labels(m)), dit_model, class_label, api_name=False)
                dit_model.input(recommended_dit_settings, dit_model, [dit_guidance, dit_steps, dit_scheduler],
                                api_name="recommended_dit_settings")
                dit_inputs = [dit_model, class_label, dit_guidance, dit_steps, dit_scheduler, dit_seed, dit_batch,
                              guided_channels]
                dit_outputs = [dit_gallery, dit_used_seed, dit_link]
                dit_run.click(sample_dit, dit_inputs, dit_outputs, api_name="dit_sample")
                if first_dit:
                    gr.Examples([[first_dit, "red circle", DIT_DEFAULTS.guidance_scale, DIT_DEFAULTS.steps, "dpmpp_2m", 0,
                                  4, "all"],
                                 [first_dit, "blue triangle", DIT_DEFAULTS.guidance_scale, DIT_DEFAULTS.steps, "ddim", 1,
                                  4, "first3"]],
                                dit_inputs, dit_outputs, sample_dit, cache_examples=False,
                                example_labels=["red circle (DPM++ 2M, seed 0)", "blue triangle (DDIM, first3, seed 1)"])
            with gr.Tab("Compare", id="compare"):
                gr.Markdown("The same weights, prompt, seed and scheduler through sd_core and through diffusers' own "
                            "pipeline: both images, their difference, and every stage's error.")
                with gr.Row():
                    with gr.Column():
                        cmp_model = model_dropdown(t2i_models)
                        cmp_prompt = gr.Textbox("a small green triangle on the left on a white background", label="Prompt")
                        cmp_negative = gr.Textbox("", label="Negative prompt")
                        with gr.Row():
                            cmp_seed = gr.Number(0, label="Seed", precision=0)
                            cmp_steps = gr.Slider(1, 50, 10, step=1, label="Steps")
                        cmp_scheduler = scheduler_dropdown("ddim")
                        cmp_guidance = gr.Slider(0, 20, 5.0, step=0.5, label="Guidance scale")
                        cmp_run = gr.Button("Compare", variant="primary")
                    with gr.Column():
                        verdict = gr.Markdown(label="Verdict")
                        with gr.Row():
                            ours_image = gr.Image(label="sd_core", format="png", height=200, elem_classes="pixelated")
                            their_image = gr.Image(label="diffusers", format="png", height=200, elem_classes="pixelated")
                            diff_image = gr.Image(label="difference (amplified)", format="png", height=200,
                                                  elem_classes="pixelated")
                stages = gr.Dataframe(headers=["stage", "max |diff|", "relative", "cosine", "verdict"], wrap=True,
                                      label="Per-stage error", max_height=800)
                cmp_run.click(compare_models, [cmp_model, cmp_prompt, cmp_negative, cmp_seed, cmp_steps, cmp_scheduler,
                                               cmp_guidance], [ours_image, their_image, diff_image, stages, verdict],
                              api_name="compare")
        shareable = {"text_to_image": (generate_images, t2i_inputs, t2i_outputs), "dit": (sample_dit, dit_inputs, dit_outputs)}
        load_outputs = [tabs] + [c for _, inputs, outputs in shareable.values() for c in inputs + outputs]

        def on_load(request: gr.Request):
            return restore(shareable, request)
        demo.load(on_load, None, load_outputs, api_name=False)
    return demo


def dit_labels(choice: str) -> list[str]:
    if catalog.HUB.get(choice) or choice in HUB_BY_SOURCE:
        return [] if choice not in MODELS.models else dit_labels_of(MODELS.get(choice))  # no download to list labels
    try:
        return dit_labels_of(MODELS.get(choice))
    except gr.Error:
        return []


def dit_labels_of(pipe) -> list[str]:
    return [pipe.id2label[i] for i in sorted(pipe.id2label)] if isinstance(pipe, DiTPipeline) else []


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
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    Settings.model_roots += [Path(p).resolve() for p in args.models_dir]
    Settings.allow_hub = Settings.allow_hub or args.allow_hub
    for name in EMBEDDED:  # warm: the first page shows a picture at once
        MODELS.get(name)
    demo = build().queue(max_size=args.max_queue, default_concurrency_limit=args.concurrency)
    where = {key: value for key, value in (("server_name", args.host), ("server_port", args.port)) if value is not None}
    demo.launch(share=args.share, css=CSS, **where)  # no host/port given: gradio reads GRADIO_SERVER_NAME/_PORT


if __name__ == "__main__":
    main()
