"""The Inpaint tab and its mask editor: the visitor paints over what to repaint, the handler reads the uploaded
background and layers within open_upload's bounds and turns the painted pixels into a mask.

This module may import gradio; the models, pipelines and schedulers never do.
"""
import io

import gradio as gr
from PIL import Image

from sd_core.app.parts import images_gallery, model_dropdown, scheduler_dropdown
from sd_core.app.serving import open_upload, raw_value
from sd_core.pipelines.image_io import upright_8bit


def editor_files(editor: gr.ImageEditor) -> gr.ImageEditor:
    """An ImageEditor whose handler receives {"background", "layers", "composite"} as uploaded files (paths, or
    file objects for the canvas's blobs), not decoded images: gradio's own preprocessing decodes everything
    first, a decompression bomb included. The handler opens each with open_upload's bounds. (An instance
    attribute, as serving.raw_value does.)"""
    def files(payload):
        if payload is None:
            return None
        data = payload
        if getattr(payload, "id", None) is not None:
            data = editor.blob_storage.pop(payload.id, None) or payload

        def one(file):
            if file is None:
                return None
            return io.BytesIO(bytes(file)) if isinstance(file, (bytes, bytearray, memoryview)) else file.path
        return {"background": one(data.background), "layers": [one(layer) for layer in data.layers or []
                                                                if layer is not None], "composite": one(data.composite)}
    editor.preprocess = files
    return editor


def painted_pixels(layer: Image.Image) -> Image.Image:
    """A mask-editor layer as a binary "L" mask: its opaque pixels (a layer with transparency) or its light ones (an
    opaque layer), after the reader's orientation and 16-bit scaling."""
    layer = upright_8bit(layer)
    alpha = layer.mode in ("RGBA", "LA", "PA") or "transparency" in layer.info
    return (layer.convert("RGBA").getchannel("A") if alpha else layer.convert("L")).point(lambda v: 255 if v > 127 else 0)


def painted_mask(editor: dict | None, max_pixels: int) -> tuple[Image.Image, Image.Image]:
    """(image, mask) from the mask editor: the background image, and white wherever a layer is painted (a layer
    with transparency: its opaque pixels; an opaque layer, e.g. a mask sent through the API: its light pixels)."""
    if not editor or editor.get("background") is None:
        raise gr.Error("Upload an image into the editor first, then paint over the region to repaint.")
    image = open_upload(editor["background"], max_pixels=max_pixels, name="the image")
    mask = Image.new("L", image.size, 0)
    for i, layer in enumerate(editor.get("layers") or []):
        painted = open_upload(layer, max_pixels=max_pixels, name=f"layer {i + 1}", convert=painted_pixels)
        if painted.size != image.size:
            painted = painted.resize(image.size, Image.NEAREST)
        mask.paste(255, mask=painted)
    if mask.getbbox() is None:
        raise gr.Error("Nothing is painted: paint over the region to repaint (white in the mask), then Inpaint.")
    return image, mask


MASK_TINT, MASK_PREVIEW_SIDE = (255, 0, 0), 256


def mask_overlay(image: Image.Image, mask: Image.Image) -> Image.Image:
    """The mask used, shown where a visitor can see it: the image with the repainted region half red, enlarged
    (nearest neighbour) so its shorter side is at least MASK_PREVIEW_SIDE. A bare white-on-black mask of a 64 px
    image disappears into a white panel."""
    image = image.convert("RGB")
    tinted = Image.blend(image, Image.new("RGB", image.size, MASK_TINT), 0.5)
    shown = Image.composite(tinted, image, mask.convert("L"))
    factor = max(1, -(-MASK_PREVIEW_SIDE // min(shown.size)))
    return shown.resize((shown.width * factor, shown.height * factor), Image.NEAREST)


def inpaint_tab(models: list, fn, example: str | None, defaults, max_steps: int, max_batch: int,
                extra_settings=list) -> dict:
    """The Inpaint tab: the image in a mask editor (the visitor paints what to repaint), the usual settings, then
    what `extra_settings()` adds (the ControlNet section); `fn` is the handler (named endpoint /inpaint).
    Returns its inputs and outputs (share links restore them)."""
    with gr.Row():
        with gr.Column():
            model = model_dropdown(models)
            editor = editor_files(gr.ImageEditor(
                value=example, type="filepath", image_mode=None, label="Image and mask: paint over what to repaint",
                height=320, layers=False, brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"), eraser=gr.Eraser()))
            prompt = gr.Textbox("a big red circle on the left on a gray background", label="Prompt")
            negative = gr.Textbox("", label="Negative prompt")
            run = gr.Button("Inpaint", variant="primary")
            strength = raw_value(gr.Slider(0, 1, 1.0, step=0.05, label="Strength (1: repaint fully)"))
            with gr.Row():
                steps = raw_value(gr.Slider(1, max_steps, defaults.steps, step=1, label="Steps"))
                guidance = raw_value(gr.Slider(0, 20, defaults.guidance_scale, step=0.5, label="Guidance scale"))
                scheduler = scheduler_dropdown(defaults.scheduler)
            with gr.Row():
                seed = raw_value(gr.Number(-1, label="Seed", info="-1: random; image k uses seed + k", precision=0))
                batch = raw_value(gr.Slider(1, max_batch, 2, step=1, label="Number of images"))
            extra = extra_settings()
        with gr.Column(elem_classes="results"):
            gallery = images_gallery()
            used_seed = gr.Textbox(label="Seed used", placeholder="run first", interactive=False)
            mask = gr.Image(label="Mask used (red: repainted)", format="png", height=256, elem_classes="pixelated")
            parameters = gr.Code(label="Parameters", language="json")
            link = gr.Markdown(label="Share link")
    inputs = [model, editor, prompt, negative, strength, steps, guidance, scheduler, seed, batch] + extra
    outputs = [gallery, used_seed, mask, parameters, link]
    run.click(fn, inputs, outputs, api_name="inpaint")
    return dict(inputs=inputs, outputs=outputs)
