"""The ControlNet section of the Text to image, Image to image and Inpaint tabs: which ControlNets are offered, each
unit's image or sketch with its preprocessed preview, and the loaded ControlNets a request runs with.

Where the ControlNets live: the embedded `shapes-controlnet` (sd_core/weights, when shipped) and, under each model
root (--models-dir / SD_CORE_MODELS_DIR),
    <root>/controlnets/<name>/config.json   a diffusers ControlNet folder
    <root>/controlnets/*.safetensors        a single file (diffusers' or the original key names)
each a regular file or folder resolved inside its root, as LoRAs and embeddings are.

A unit's form values are controlnet_N (the choice, "" for none), controlnet_N_image (the editor: an upload, or a
sketch drawn on its canvas), controlnet_N_preprocessor, controlnet_N_scale, controlnet_N_start, controlnet_N_end,
and one guess_mode for all units (sd_core.app.forms reads them into the record's `controlnets`).
"""
import gradio as gr
from PIL import Image

from sd_core.app.forms import CONTROLNET_DEFAULTS, CONTROLNET_FIELDS, CONTROLNET_SLOTS, FORM_LIMITS
from sd_core.app.inpaint_tab import editor_files
from sd_core.app.model_choices import Settings, offered_files
from sd_core.app.parts import LIMITS, as_page_text, handler
from sd_core.app.serving import LoadingCache, open_upload, raw_value
from sd_core.checkpoints import catalog
from sd_core.checkpoints.controlnet import load_controlnet
from sd_core.checkpoints.convert import CheckpointError
from sd_core.pipelines.control_images import PREPROCESSORS, preprocess_control_image
from sd_core.pipelines.metadata import controlnet_model_label, read_png_parameters
from sd_core.pipelines.sampling import dtype_of

EMBEDDED_CONTROLNETS = {f"embedded: {name}": path for name, path in catalog.EMBEDDED_CONTROLNETS.items()}
NONE = [("none", "")]


def controlnet_files() -> list[tuple[str, object]]:
    """(label, resolved path) of every ControlNet offered: the embedded ones present on this disk, then the folders
    and single files in each model root's controlnets/ folder (regular files inside the root only)."""
    found = [(label, path) for label, path in EMBEDDED_CONTROLNETS.items() if (path / "config.json").is_file()]
    for root in Settings.model_roots:
        if not (root / "controlnets").is_dir():
            continue
        folders = [(p.parent, real.parent) for p, real in
                   offered_files(root, sorted((root / "controlnets").glob("*/config.json")))]
        files = offered_files(root, sorted((root / "controlnets").glob("*.safetensors")))
        found += [(f"controlnets: {p.relative_to(root)}", real) for p, real in sorted(folders + files)]
    return found


def controlnet_choices() -> list[tuple[str, str]]:
    return NONE + [(label, label) for label, _ in controlnet_files()]


def controlnet_path(choice: str):
    for label, path in controlnet_files():
        if label == choice:
            return path
    raise gr.Error(f"{choice!r} is not one of the offered ControlNets. Pick one from the list (folders or "
                   f".safetensors files in a model root's controlnets/ folder).")


def load_for(key):
    path, dtype, device = key
    try:
        return load_controlnet(path, dtype=dtype, device=device)
    except (CheckpointError, OSError, ValueError) as error:
        raise gr.Error(str(error)) from None


CONTROLNETS = LoadingCache(load_for, size=2)  # (path, dtype, device) -> ControlNetModel


def control_picture(editor: dict | None, name: str) -> Image.Image | None:
    """A unit's control image from its editor (sd_core.app.inpaint_tab.editor_files' dict): what the canvas shows
    (the upload with the strokes drawn on it, or a sketch on its blank canvas), transparency on white; without
    the canvas's own picture (an API call), the background with its layers on top. None when there is none."""
    if not editor:
        return None
    if editor.get("composite") is not None:
        return open_upload(editor["composite"], max_pixels=LIMITS.max_upload_pixels, name=name)
    if editor.get("background") is None:
        return None
    picture = open_upload(editor["background"], max_pixels=LIMITS.max_upload_pixels, name=name).convert("RGBA")
    for i, layer in enumerate(editor.get("layers") or []):
        strokes = open_upload(layer, max_pixels=LIMITS.max_upload_pixels, name=f"{name}, layer {i + 1}",
                              convert=lambda image: image.convert("RGBA"))
        picture.alpha_composite(strokes.resize(picture.size, Image.NEAREST))
    return picture.convert("RGB")


def control_pictures(form: dict) -> list[Image.Image]:
    """The control image of every unit that names a ControlNet, in unit order (the record's order)."""
    pictures = []
    for i in CONTROLNET_SLOTS:
        if form.get(f"controlnet_{i}"):
            picture = control_picture(form.get(f"controlnet_{i}_image"), f"ControlNet {i}'s image")
            if picture is None:
                raise gr.Error(f"ControlNet {i} has no image: upload one or draw an outline in its canvas, or set "
                               f"ControlNet {i} to none.")
            pictures.append(picture)
    return pictures


def loaded_control(pipe, controlnets: tuple, pictures: list) -> list:
    """(ControlNetModel, image) per record entry, each loaded (cached) in the pipeline's dtype and device."""
    weight = next(pipe.unet.parameters())
    return [(CONTROLNETS.get((controlnet_path(name), dtype_of(pipe.unet), weight.device)), picture)
            for (name, *_), picture in zip(controlnets, pictures)]


@handler
def control_preview(image, preprocessor="none"):
    """What a ControlNet will see: the unit's image through its preprocessor (none, canny, invert), before a run."""
    picture = control_picture(image, "the control image")
    return None if picture is None else preprocess_control_image(picture, preprocessor)


def controlnet_unit(i: int, choices: list) -> list:
    """One unit's inputs (model, image, preprocessor, scale, start, end), with its preview kept up to date."""
    with gr.Row():
        model = gr.Dropdown(choices, value="", label=f"ControlNet {i}")
        preprocessor = gr.Radio(list(PREPROCESSORS), value=CONTROLNET_DEFAULTS["preprocessor"],
                                label=f"ControlNet {i} preprocessor (invert: dark lines drawn on light)")
    with gr.Row():
        image = editor_files(gr.ImageEditor(
            type="filepath", image_mode=None, label=f"ControlNet {i} image: upload one, or draw an outline",
            height=256, canvas_size=(256, 256), layers=False,
            brush=gr.Brush(colors=["#000000"], color_mode="fixed", default_size=4), eraser=gr.Eraser()))
        preview = gr.Image(label=f"ControlNet {i} sees (after its preprocessor)", interactive=False, format="png",
                           height=256, elem_classes="pixelated")
    with gr.Row():
        scale = raw_value(gr.Slider(0, 2, CONTROLNET_DEFAULTS["scale"], step=0.05,
                                    label=f"ControlNet {i} scale (A1111's weight)"))
        start = raw_value(gr.Slider(0, 1, CONTROLNET_DEFAULTS["start"], step=0.05,
                                    label=f"ControlNet {i} start (share of the steps)"))
        end = raw_value(gr.Slider(0, 1, CONTROLNET_DEFAULTS["end"], step=0.05,
                                  label=f"ControlNet {i} end (share of the steps)"))
    for event in (image.change, preprocessor.change):
        event(control_preview, [image, preprocessor], preview, api_name=False)
    return [model, image, preprocessor, scale, start, end]


def controlnet_section() -> list:
    """The ControlNet accordion: FORM_LIMITS.max_controlnets units, then guess mode. Returns the inputs in the
    handlers' order (controlnet_1, controlnet_1_image, ..., guess_mode)."""
    choices = controlnet_choices()
    where = "Add ControlNets in a model root's controlnets/ folder (diffusers folders or .safetensors files)."
    with gr.Accordion(f"ControlNet: up to {FORM_LIMITS.max_controlnets}, each with an image or a sketch",
                      open=False):
        if len(choices) == 1:
            gr.Markdown(f"No ControlNets found. {where}")
        inputs = [component for i in CONTROLNET_SLOTS for component in controlnet_unit(i, choices)]
        inputs.append(gr.Checkbox(False, label="Guess mode (the ControlNets see only the prompt's half of guidance)"))
    return inputs


PNG_CONTROLNET_FIELDS = [f"controlnet_{i}{field}" for i in CONTROLNET_SLOTS
                         for field in ("", *(f"_{name}" for name in CONTROLNET_FIELDS))] + ["guess_mode"]


@handler
def png_controlnets(png):
    """A PNG's ControlNet units (sd_core's or A1111's extension's metadata) for the form's ControlNet fields; the
    control images themselves are not stored in a PNG. Fields it cannot fill are left as they are."""
    skipped = [gr.skip()] * len(PNG_CONTROLNET_FIELDS)
    try:
        settings = read_png_parameters(png) if png is not None else None
    except (OSError, ValueError, Image.DecompressionBombError):
        return skipped + [""]  # png_info says what is wrong with the file
    units = getattr(settings, "controlnets", ())  # a DiT sample has none
    if not units:
        return skipped + [""]
    offered = {controlnet_model_label(label): label for label, _ in controlnet_files()}
    values, notes = {"guess_mode": settings.guess_mode}, []
    for i, (name, *unit) in zip(CONTROLNET_SLOTS, units):
        label = offered.get(controlnet_model_label(name))
        if label is None:
            notes.append(f"ControlNet {i} ({name!r}) is not offered here")
            continue
        values.update({f"controlnet_{i}": label, **{f"controlnet_{i}_{field}": value for field, value in
                                                     zip(CONTROLNET_FIELDS, unit)}})
    note = (f"ControlNet units read: {len(units) - len(notes)} of {len(units)}"
            + ("; " + "; ".join(notes) if notes else "")
            + ". A PNG does not hold the control images: upload each unit's image again.")
    return [values.get(field, gr.skip()) for field in PNG_CONTROLNET_FIELDS] + [as_page_text(note)]
