"""What app.py needs besides its layout and handlers: ZeroGPU wrapping, input checks, and the form pieces several
tabs share. The models it offers and keeps loaded are in app_models.py; share links and their restore on page load
in app_links.py; the Inpaint tab and its mask editor in app_inpaint.py.

This module may import gradio; the models, pipelines and schedulers never do.
"""
import functools
import html
import inspect
import logging
import os
import re
import time
from pathlib import Path

import gradio as gr
from gradio import processing_utils
from PIL import Image

from sd_core.app.api_docs import documented
from sd_core.app.forms import DEEPCACHE_CHOICES, FORM_LIMITS, MODEL_DEFAULT, SHARE_CHOICES, TOME_CHOICES, choice_of, form_from_settings  # noqa: F401
from sd_core.app.model_choices import (  # noqa: F401
    EMBEDDED,
    MODELS,
    ModelCache,
    Settings,
    catalog_entry,
    extra_path,
    hub_offered,
    model_choices,
    resolve_source,
    root_files,
)
from sd_core.app.serving import (
    WorkLimits,
    as_choice,
    check_request,
    numbers_choice,
    open_upload,
    raw_value,
)
from sd_core.checkpoints.convert import CheckpointError
from sd_core.checkpoints.pipeline_classes import DiTPipeline
from sd_core.files import atomic_path
from sd_core.pipelines import settings
from sd_core.pipelines.generate import preview
from sd_core.pipelines.metadata import read_png_parameters
from sd_core.pipelines.prompt_syntax import count_chunks
from sd_core.pipelines.settings import RULES, GenerationSettings
from sd_core.pipelines.textual_inversion import embeddings_bound, load_embedding
from sd_core.schedulers import DISPLAY_NAMES, SCHEDULER_NAMES

LOG = logging.getLogger("sd_core.app")
# ------------------------------------------------------------------------------ handlers: GPU, errors, inputs


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
    """Turn bad input (ValueError/TypeError from sd_core and sd_core.app.serving's refusals) and non-finite latents
    (FloatingPointError) into a one-line gr.Error the visitor reads, logged as one line (no traceback: a visitor's
    mistake is not the server's); the app keeps serving.
    What the visitor reads names no server folder (without_server_paths); the log keeps the whole path.
    The handler's signature is kept: gradio names the API parameters after it."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error as error:
            LOG.warning("%s refused: %s", fn.__name__, error.message)
            error.message = without_server_paths(str(error.message))
            error.print_exception = False  # the line above is the log's record; gradio would add a traceback
            raise
        except (ValueError, TypeError, FileNotFoundError, CheckpointError, FloatingPointError) as error:
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            LOG.warning("%s refused: %s", fn.__name__, message)
            raise gr.Error(without_server_paths(message), print_exception=False) from None
    return wrapped


# A folder part of an absolute path (POSIX or Windows), not inside a word, a URL or a relative path.
SERVER_FOLDERS = re.compile(r"(?<![\w.~:/\\-])(?:/|[A-Za-z]:\\)(?:[^\s/\\'\"`<>|,;()\[\]]+[/\\])+")


def without_server_paths(message: str) -> str:
    """`message` naming files as a visitor may read them: a file under a model root (or the embedded models'
    folder) relative to that root, any other absolute path (the gradio temp folder, the machine's own) by its
    base name."""
    roots = {root for root in Settings.model_roots} | {path.parent for path in EMBEDDED.values()}
    for root in sorted({form for root in roots for form in (str(root), str(root.resolve()))}, key=len, reverse=True):
        message = message.replace(root + os.sep, "")
    return SERVER_FOLDERS.sub("", message)


def handler(fn):
    """A visitor-facing endpoint: its parameters documented (api_docs: the API page, the MCP tools), its refusals
    one-line messages, its work on a ZeroGPU GPU where there is one."""
    return on_gpu(user_errors(documented(fn)))


def save_pil_to_cache_whole(img, cache_dir: str, name: str = "image", format: str = "webp") -> str:
    """gradio's processing_utils.save_pil_to_cache, but written beside its path and renamed into place. gradio names
    a result file by its content's hash and rewrote it in place, so a request with the same picture (two VAE
    round-trips of one image) truncated the file while another visitor was downloading it ("Too little data for
    declared Content-Length"); a download now keeps reading the whole file it opened."""
    data = processing_utils.encode_pil_to_bytes(img, format)
    folder = Path(cache_dir) / processing_utils.hash_bytes(data)
    folder.mkdir(exist_ok=True, parents=True)
    path = (folder / f"{name}.{format}").resolve()
    with atomic_path(path) as partial:
        partial.write_bytes(data)
    return str(path)


processing_utils.save_pil_to_cache = save_pil_to_cache_whole  # every gradio image and gallery output goes through it


LIMITS = WorkLimits.from_environment(Settings.device)  # work per request; heavy requests share one slot


def run_bounded(kind: str, pixels: int, steps: int, batch: int, work, chunks: int = 1):
    """Refuse work beyond this machine's budget for `kind` ("text_to_image:<model>": each model's own speed; the
    message states the bound; `chunks`: the prompt's 77-token chunks), run the rest (heavy requests one at a time
    across all endpoints), and learn the model's speed from each run."""
    with LIMITS.slot(check_request(LIMITS, kind, pixels, steps, batch, chunks=chunks)):
        start = time.perf_counter()
        result = work()
        LIMITS.observe(kind, time.perf_counter() - start, pixels, steps, batch, chunks)
    return result


def prompt_chunks(pipe, prompt_syntax: str, *prompts) -> int:
    """How many 77-token chunks the longest of `prompts` is encoded as: A1111's syntax cuts a long prompt and each
    BREAK into chunks; a plain prompt is one (cut at 77 tokens)."""
    if prompt_syntax != "a1111":
        return 1
    return count_chunks(pipe.tokenizer, [prompt or "" for prompt in prompts])


def timestep_semantics(pipe) -> str:
    frequencies = pipe.transformer.config.timestep_frequencies
    why = ("the original DiT code's (exponent / half), as the released DiT weights were trained" if frequencies == "original"
           else "diffusers' (exponent / (half - 1)), as diffusers-trained weights expect")
    return f"Timestep embedding frequencies: **{frequencies}**: {why}. Compare → dit_timestep_semantics shows the other."


def drawn_side(pipe) -> int:
    """The side of the square image a model draws by default (what a compare or DiT request is priced at)."""
    if hasattr(pipe, "transformer"):
        return pipe.transformer.config.sample_size * pipe.vae.downscale_factor
    return pipe.default_size


def random_seed() -> int:
    return settings.random_seed()


# ------------------------------------------------------------------------------------ shared form pieces


def image_upload(**options) -> gr.Image:
    """An image input that hands the handler the uploaded file's path (decoded there within open_upload's bounds),
    and refuses a file that is no image (a text file named .png) with sd_core's message, as the command line does
    ("Cannot read fake.png as an image: ..."): gradio's own preprocessing opened it first and answered only "Error".
    (An instance attribute, as serving.raw_value does.)"""
    component = gr.Image(type="filepath", image_mode=None, **options)
    gradio_preprocess = component.preprocess

    def preprocess(payload):
        try:
            return gradio_preprocess(payload)
        except Exception:  # noqa: BLE001 - whatever gradio raised, the visitor reads sd_core's reason below
            if getattr(payload, "path", None) is None:  # nothing on disk to read (a data URL gradio could not decode)
                raise
            name = Path(payload.orig_name or payload.path).name
            try:
                open_upload(payload.path, max_pixels=LIMITS.max_upload_pixels, name=name)
            except (ValueError, OSError) as refusal:
                LOG.warning("upload refused: %s", refusal)
                raise gr.Error(without_server_paths(str(refusal)), print_exception=False) from None
            raise
    component.preprocess = preprocess
    return component


SCHEDULER_CHOICES = [(DISPLAY_NAMES.get(name, name), name) for name in SCHEDULER_NAMES] + [
    ("the model's own", MODEL_DEFAULT)]
SYNTAXES = [("plain (as diffusers)", "plain"), ("A1111: (word:1.2), [word], BREAK, long prompts", "a1111")]


def scheduler_of(choice):
    choice = as_choice(choice, "scheduler", [value for _, value in SCHEDULER_CHOICES])
    return None if choice == MODEL_DEFAULT else choice


def model_dropdown(choices: list, label: str = "Model") -> gr.Dropdown:
    return gr.Dropdown(choices, value=choices[0][1] if choices else None, label=label,
                       allow_custom_value=Settings.allow_hub)


def scheduler_dropdown(value: str) -> gr.Dropdown:
    return gr.Dropdown(SCHEDULER_CHOICES, value=value, label="Scheduler")


def images_gallery(label="Images", columns=4) -> gr.Gallery:
    return gr.Gallery(label=label, columns=columns, height="auto", format="png", elem_classes="pixelated")


def refiner_choices() -> list[tuple[str, str]]:
    """("none", "") and the SDXL refiners a visitor may pick (the curated hub ones where the hub is offered)."""
    return [("none", "")] + [(label, value) for label, value in model_choices("sdxl_refiner")]


def advanced_settings(refiners: list | None = None, fast: bool = False) -> list:
    """Prompt syntax, clip skip, two LoRAs with a scale each, embeddings: the A1111 user's settings; with
    `refiners`, an SDXL refiner and the fraction of the noise schedule the base runs; with `fast`, the fast path
    (approximate) and its DeepCache interval."""
    loras = [(label, label) for label, _ in root_files("loras")]
    embeddings = [(label, label) for label, _ in root_files("embeddings")]
    where = "Add LoRAs in a model root's loras/ folder, embeddings in its embeddings/ folder (.safetensors)."
    title = ("Advanced: prompt syntax, clip skip, LoRAs, embeddings" + (", SDXL refiner" if refiners else "")
             + (", fast path" if fast else ""))
    with gr.Accordion(title, open=False):
        with gr.Row():
            syntax = gr.Radio(SYNTAXES, value="plain", label="Prompt syntax")
            clip_skip = raw_value(gr.Slider(0, 10, 0, step=1,
                                            label="Clip skip", info="0: the model's usual layer; A1111's 2 is 1"))
        components = [syntax, clip_skip]
        for i in (1, 2):
            with gr.Row():
                components += [gr.Dropdown([("none", "")] + loras, value="", label=f"LoRA {i}"),
                               raw_value(gr.Slider(-2, 2, 1.0, step=0.05, label=f"LoRA {i} scale"))]
        components.append(gr.Dropdown(embeddings, value=[], multiselect=True,
                                      label="Embeddings (write each one's file name in the prompt)"))
        gr.Markdown(where if loras or embeddings else f"No LoRAs or embeddings found. {where}")
        if refiners is not None:
            with gr.Row():
                components += [gr.Dropdown(refiners, value="", label="Refiner (SDXL base models only)",
                                           allow_custom_value=Settings.allow_hub),
                               raw_value(gr.Slider(0.05, 0.95, 0.8, step=0.05,
                                                   label="High noise frac (the base's share of the schedule)"))]
        if fast:
            with gr.Row():
                components += [gr.Checkbox(False, label="Fast path (approximate)"),
                               numbers_choice(gr.Dropdown(DEEPCACHE_CHOICES, value=0, label="DeepCache interval")),
                               numbers_choice(gr.Dropdown(TOME_CHOICES, value=0.0, label="ToMe: tokens merged")),
                               numbers_choice(gr.Dropdown(SHARE_CHOICES, value=1.0, label="Guidance until")),
                               numbers_choice(gr.Dropdown(SHARE_CHOICES, value=1.0, label="T-GATE at (tgate)"))]
            gr.Markdown("The fast path is not the parity path: its images differ from diffusers' (see Compare: "
                        "fast_path). DeepCache N runs the full UNet every N steps; ToMe merges that share of the "
                        "tokens before self-attention at the highest resolution (it pays from 512 px up). Guidance "
                        "until: after that share of the noise schedule, the prompt's pass alone (no unconditional "
                        "one). T-GATE at: after that share, cross-attention is frozen at its average and guidance "
                        "stops. None combines with LoRAs; the Lab's X/Y/Z plot shows each one's effect.")
    return components


# ------------------------------------------------------------------------------------ handler helpers


def progress_callback(progress, total: int, pipe=None, trajectory: list | None = None, previewer=preview):
    """Progress per step; with `trajectory`, each step's x0 estimate as a thumbnail drawn by `previewer`
    (pipelines.preview, a full VAE decode; the fast path's preview.fast_preview, a linear map)."""
    def callback(step, timestep, latents, x0):
        progress((step + 1, total), desc="denoising")
        if trajectory is not None:
            trajectory.append((previewer(pipe, x0), f"step {step + 1}"))
    return callback


def deepcache_of(value) -> int:
    """A visitor's DeepCache interval: one of DEEPCACHE_CHOICES (the Text-to-image and Compare tabs share it)."""
    return choice_of(value or 0, "deepcache", DEEPCACHE_CHOICES)


def tome_of(value) -> float | None:
    """A visitor's ToMe ratio: one of TOME_CHOICES (the Text-to-image and Compare tabs share it); None when off."""
    return choice_of(value or 0.0, "tome", TOME_CHOICES) or None


def bind_embeddings(pipe, choices):
    """The chosen embeddings bound to the cached pipeline for one request: `with bind_embeddings(pipe, choices) as
    tokens:` inside the request's MODELS.using(pipe) lock; afterwards the pipeline is as it was, so another visitor's
    prompt with the same word never draws this one's embedding."""
    return embeddings_bound(pipe, [load_embedding(extra_path("embeddings", choice)) for choice in choices or []])


def selected_image(gallery, selected):
    if not gallery:
        raise gr.Error("Generate images first, then pick one.")
    return gallery[min(int(selected or 0), len(gallery) - 1)]


def picked(event: gr.SelectData) -> int:
    return event.index


def send_to_image_to_image(gallery, selected, model, prompt, negative_prompt, steps, guidance_scale, scheduler):
    """The picked result (or the first) and its settings into the Image to image tab."""
    image, _ = selected_image(gallery, selected)
    return image, model, prompt, negative_prompt, steps, guidance_scale, scheduler, gr.Tabs(selected="image_to_image")


def use_this_seed(gallery, selected):
    """The picked result's own seed (from its caption) into the seed box."""
    _, caption = selected_image(gallery, selected)
    return int(re.search(r"seed (\d+)", caption or "").group(1))


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


def dit_labels(choice: str) -> list[str]:
    """The model's class names; a hub model is never downloaded just to list them."""
    try:
        local = choice in EMBEDDED or choice.startswith("models: ")
        pipe = MODELS.get(choice) if local or choice in MODELS else None
    except gr.Error:
        return []
    return [pipe.id2label[i] for i in sorted(pipe.id2label)] if isinstance(pipe, DiTPipeline) else []


PNG_FIELDS = ("model", "prompt", "negative_prompt", "steps", "guidance_scale", "scheduler", "width", "height", "seed",
              "prompt_syntax", "clip_skip")


def as_page_text(text: str) -> str:
    """A message that may carry a visitor's values (a link's, a PNG's), for a Markdown box or a toast: its
    markup shown as text, never rendered (quotes stay as they are)."""
    return html.escape(text, quote=False)


@handler
def png_info(png):
    """Settings from a PNG made by sd_core or AUTOMATIC1111, for the Text to image inputs (unchanged where absent
    or beyond this app's bounds, with a note saying so)."""
    if png is None:
        return [gr.skip()] * len(PNG_FIELDS) + [""]
    read_notes = []  # what was read in place of something sd_core lacks (an A1111 sampler)
    try:
        settings = read_png_parameters(png, read_notes)
    except (OSError, Image.DecompressionBombError) as error:
        raise gr.Error(f"Cannot read this file as a PNG ({error}); drop a .png image made by sd_core or A1111.") from None
    except ValueError as error:  # no settings in it (a photo, a ComfyUI workflow): nothing to fill, said plainly
        return [gr.skip()] * len(PNG_FIELDS) + [as_page_text(f"{error} The form keeps its values.")]
    if not isinstance(settings, GenerationSettings) or not isinstance(settings.prompt, str):
        raise gr.Error("This image is a DiT sample or one of a diffusers-rule batch; its settings fit the DiT tab "
                       "or the CLI, not one prompt here.")
    form, notes = form_from_settings(settings), read_notes
    if form["model"] not in dict(model_choices("text_to_image")).values():
        notes.append(f"its model {form.pop('model')!r} is not offered here: the selected model is kept")
    if settings.strength is not None:
        notes.append(f"it was made from an image (strength {settings.strength}): use Image to image")
    for field in PNG_FIELDS:
        try:
            if field in RULES and form.get(field) is not None:
                RULES[field](form[field], field, FORM_LIMITS)
        except ValueError as error:
            notes.append(f"{error} (this app's bound): the form keeps its value")
            form.pop(field)
    values = [form[field] if form.get(field) is not None else gr.skip() for field in PNG_FIELDS]
    values[PNG_FIELDS.index("negative_prompt")] = settings.negative_prompt or ""
    read = ", ".join(f"{field}={form[field]!r}" for field in PNG_FIELDS if form.get(field) is not None)
    return values + [as_page_text("Read " + read + (". Note: " + "; ".join(notes) + "." if notes else "."))]
