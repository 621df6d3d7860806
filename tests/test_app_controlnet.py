"""The app's ControlNet section: what it offers, the preview, a run steered by a ControlNet through every door
(handler, API, PNG Info), and share links of the picture tabs that say which pictures they cannot carry."""
import inspect
import json
import urllib.parse

import gradio as gr
import numpy as np
import pytest
import safetensors.torch
import torch
from gradio_client import Client, handle_file
from PIL import Image

import app
from sd_core.app import controlnet_section, handlers
from sd_core.app import parts as app_parts
from sd_core.models.controlnet import ControlNetModel
from tests.launch import free_port

SD = "embedded: shapes (text to image)"
CANNY = "controlnets: controlnets/canny"


def saved_controlnet(folder, pipe, seed: int = 0):
    """A ControlNet of the embedded UNet (the paper's start: its copy of the encoder) whose zero convolutions are
    made random, so it changes the image, saved as a diffusers folder. Its hint encoder halves the image as often
    as the model's VAE does (the embedded VAE: 4x)."""
    controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32, 64)[
        :len(pipe.vae.config.block_out_channels)])
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in [controlnet.controlnet_cond_embedding.conv_out, *controlnet.controlnet_down_blocks,
                       controlnet.controlnet_mid_block]:
            for parameter in module.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    folder.mkdir(parents=True)
    config = {"_class_name": "ControlNetModel", **controlnet.config.to_dict()}
    (folder / "config.json").write_text(json.dumps(config, default=list))
    safetensors.torch.save_file({k: v.contiguous() for k, v in controlnet.state_dict().items()},
                                folder / "diffusion_pytorch_model.safetensors")
    return controlnet


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    """A model root with controlnets/canny (a folder), controlnets/lines.safetensors (a single file), a link out
    of the root and a circle outline to steer with."""
    root = tmp_path_factory.mktemp("models")
    pipe = app_parts.MODELS.get(SD)
    lines = saved_controlnet(root / "controlnets" / "canny", pipe)
    safetensors.torch.save_file({k: v.contiguous() for k, v in lines.state_dict().items()},
                                root / "controlnets" / "lines.safetensors")
    outside = tmp_path_factory.mktemp("outside")
    saved_controlnet(outside / "elsewhere", pipe)
    (root / "controlnets" / "elsewhere").symlink_to(outside / "elsewhere")
    outline = Image.new("RGB", (64, 64), "white")
    for x in range(64):
        for y in range(64):
            if 14 ** 2 <= (x - 32) ** 2 + (y - 32) ** 2 <= 16 ** 2:
                outline.putpixel((x, y), (0, 0, 0))
    outline.save(root / "outline.png")
    return root


@pytest.fixture
def offered(model_root, monkeypatch):
    monkeypatch.setattr(app_parts.Settings, "model_roots", [model_root])
    return model_root


def editor(path) -> dict:
    """The control image as the editor sends it to a handler (editor_files' dict)."""
    return {"background": str(path), "layers": [], "composite": None}


def test_the_controlnets_folder_is_offered_with_folders_and_files_and_never_a_link_out_of_the_root(offered):
    shipped = ("embedded: shapes-controlnet",) * 2  # the embedded ControlNet comes first, then the root's
    assert controlnet_section.controlnet_choices() == [("none", ""), shipped, (CANNY, CANNY), (
        "controlnets: controlnets/lines.safetensors", "controlnets: controlnets/lines.safetensors")]
    with pytest.raises(gr.Error, match="not one of the offered ControlNets"):
        controlnet_section.controlnet_path("controlnets: controlnets/elsewhere")


def test_the_preview_shows_what_the_controlnet_will_see_after_its_preprocessor(offered):
    outline = np.asarray(Image.open(offered / "outline.png"))
    inverted = np.asarray(controlnet_section.control_preview(editor(offered / "outline.png"), "invert"))
    assert np.array_equal(inverted, 255 - outline)
    edges = np.asarray(controlnet_section.control_preview(editor(offered / "outline.png"), "canny"))
    assert set(np.unique(edges)) == {0, 255} and edges[32, 32].max() == 0 and edges[:, :, 0].sum() > 0
    assert controlnet_section.control_preview(None, "canny") is None


def test_a_drawn_sketch_is_flattened_on_white_as_the_canvas_shows_it(offered, tmp_path):
    strokes = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    strokes.paste((0, 0, 0, 255), (0, 10, 32, 12))
    strokes.save(tmp_path / "sketch.png")
    picture = controlnet_section.control_picture({"background": None, "layers": [], "composite":
                                                  str(tmp_path / "sketch.png")}, "sketch")
    assert picture.getpixel((0, 0)) == (255, 255, 255) and picture.getpixel((5, 11)) == (0, 0, 0)


def run(**options):
    return handlers.generate_images(SD, "a big red circle on a gray background", "", 3, 5.0, "ddim", 64, 64, 5, 1,
                                    **options)


def test_a_controlnet_steers_text_to_image_and_its_unit_is_recorded(offered):
    plain = np.asarray(run()[0][0][0])
    unit = dict(controlnet_1=CANNY, controlnet_1_image=editor(offered / "outline.png"),
                controlnet_1_preprocessor="invert", controlnet_1_scale=0.8, controlnet_1_start=0.0,
                controlnet_1_end=0.7)
    images, _, _, parameters, link = run(**unit)
    assert not np.array_equal(np.asarray(images[0][0]), plain)
    assert json.loads(parameters)["controlnets"] == [[CANNY, "invert", 0.8, 0.0, 0.7]]
    assert "ControlNet 1's image cannot travel in a link" in link and "controlnet_1_end=0.7" in link
    assert np.array_equal(np.asarray(run(**unit)[0][0][0]), np.asarray(images[0][0]))  # the cached ControlNet
    assert np.array_equal(np.asarray(run()[0][0][0]), plain)  # it steered that request only


@pytest.mark.parametrize("unit, message", [
    (dict(controlnet_1=CANNY), "ControlNet 1 has no image: upload one or draw an outline"),
    (dict(controlnet_1="controlnets: ../../etc"), "not one of the offered ControlNets"),
    (dict(controlnet_1=CANNY, controlnet_1_start=0.8, controlnet_1_end=0.2), r"must be below its end"),
    (dict(controlnet_1=CANNY, controlnet_1_scale=5), "controlnet_1_scale must be a number from 0 to 2; got 5"),
    (dict(controlnet_1=CANNY, controlnet_1_preprocessor="depth"), "controlnet_1_preprocessor must be one of none, canny"),
    (dict(controlnet_2_scale="nan"), r"controlnet_2_scale must be a number from 0 to 2; got nan"),  # with no ControlNet 2
    (dict(controlnet_2_end="../../etc/passwd"), r"controlnet_2_end must be a number from 0 to 1"),
    (dict(tgate=True), r"tgate must be one of 1.0, 0.8, 0.7, 0.5; got True"),  # not read as 1.0
    (dict(clip_skip=[]), r"clip_skip must be a whole number"),  # not read as 0
    (dict(controlnet_1=CANNY, fast=True), "ControlNets run on the parity path without a refiner"),
])
def test_a_bad_controlnet_unit_gets_one_line_naming_the_fix(offered, unit, message):
    drawn = {} if "no image" in message else {"controlnet_1_image": editor(offered / "outline.png")}
    with pytest.raises(gr.Error, match=message):
        run(**unit, **drawn)


@pytest.fixture(scope="module")
def client(model_root):
    roots = app_parts.Settings.model_roots
    app_parts.Settings.model_roots = [model_root]
    demo = app.build().queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    yield Client(url, verbose=False)
    demo.close()
    app_parts.Settings.model_roots = roots


@pytest.mark.parametrize("endpoint", ["/text_to_image", "/image_to_image", "/inpaint"])
def test_every_picture_tab_takes_named_controlnet_parameters_through_the_api(client, endpoint):
    parameters = [p["parameter_name"] for p in client.view_api(return_format="dict", print_info=False)[
        "named_endpoints"][endpoint]["parameters"]]
    assert parameters[-13:] == [f"controlnet_{i}{field}" for i in (1, 2) for field in (
        "", "_image", "_preprocessor", "_scale", "_start", "_end")] + ["guess_mode"]


def test_png_info_restores_the_controlnet_fields_and_says_the_image_is_not_in_a_png(client, model_root):
    outline = {"background": handle_file(str(model_root / "outline.png")), "layers": [], "composite": None}
    images, *_ = client.predict(model=SD, prompt="a red circle", steps=2, seed=1, number_of_images=1,
                                controlnet_1=CANNY, controlnet_1_image=outline, controlnet_1_preprocessor="invert",
                                controlnet_1_scale=0.5, controlnet_1_end=0.5, guess_mode=True,
                                api_name="/text_to_image")
    read = client.predict(handle_file(images[0]["image"]), api_name="/png_info_controlnets")
    assert list(read[:5]) == [CANNY, "invert", 0.5, 0.0, 0.5] and read[-2] is True
    assert "units read: 1 of 1" in read[-1] and "does not hold the control images" in read[-1]


class FakeRequest:
    def __init__(self, query: str):
        self.query_params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
        self.headers = {}


def opened(link: str) -> list:
    """The page-load updates of the app opened on a share link's Markdown."""
    load = next(d for d in app.build().fns.values() if d.name == "on_load")
    return load.fn(FakeRequest(link.split("](", 1)[1].split(")", 1)[0].split("?", 1)[1]))


T2I_INPUTS = list(inspect.signature(handlers.generate_images).parameters)[:-2]  # less progress and request


def test_a_link_with_a_controlnet_restores_its_unit_and_waits_for_its_image(offered, monkeypatch):
    warnings = []
    monkeypatch.setattr(gr, "Warning", warnings.append)
    *_, link = run(controlnet_1=CANNY, controlnet_1_image=editor(offered / "outline.png"),
                   controlnet_1_preprocessor="canny", controlnet_1_scale=1.5, guess_mode=True)
    updates = opened(link)
    values = dict(zip(T2I_INPUTS, updates[1:]))
    assert (values["controlnet_1"], values["controlnet_1_preprocessor"], values["controlnet_1_scale"],
            values["guess_mode"]) == (CANNY, "canny", 1.5, True)
    assert values["controlnet_1_image"] == gr.skip() and len(warnings) == 1
    assert "not ControlNet 1's image (a link cannot hold pictures)" in warnings[0]
    assert updates[1 + len(T2I_INPUTS):][:2] == [gr.skip()] * 2  # nothing ran without its image


def test_the_embedded_shapes_controlnet_is_offered_first_once_it_is_shipped(offered, monkeypatch):
    shipped = offered / "controlnets" / "canny"
    monkeypatch.setitem(controlnet_section.EMBEDDED_CONTROLNETS, "embedded: shapes-controlnet", shipped)
    assert controlnet_section.controlnet_choices()[1] == ("embedded: shapes-controlnet",) * 2
    assert controlnet_section.controlnet_path("embedded: shapes-controlnet") == shipped
    monkeypatch.setitem(controlnet_section.EMBEDDED_CONTROLNETS, "embedded: shapes-controlnet", offered / "absent")
    assert "embedded: shapes-controlnet" not in dict(controlnet_section.controlnet_choices())


def test_each_unit_s_preview_follows_its_image_and_its_preprocessor():
    demo = app.build()
    previews = [f for f in demo.fns.values() if f.name == "control_preview"]
    triggers = sorted((type(demo.blocks[target]).__name__, event) for f in previews for target, event in f.targets)
    assert triggers == [("ImageEditor", "change")] * 6 + [("Radio", "change")] * 6  # 2 units in each of 3 tabs


def test_png_info_maps_an_a1111_unit_onto_the_offered_controlnet_of_that_name(offered, tmp_path):
    from PIL.PngImagePlugin import PngInfo
    info = PngInfo()
    info.add_text("parameters", 'a red circle\nSteps: 12, Sampler: DPM++ 2M, CFG scale: 6, Seed: 7, Size: 64x64, '
                  'ControlNet 0: "Module: invert (from white bg & black line), Model: canny [d14c016b], Weight: 0.6, '
                  'Guidance Start: 0.1, Guidance End: 0.9, Control Mode: Balanced", ControlNet 1: "Module: none, '
                  'Model: depth_midas, Weight: 1.0"')
    Image.new("RGB", (64, 64)).save(tmp_path / "a1111.png", pnginfo=info)
    *values, note = controlnet_section.png_controlnets(str(tmp_path / "a1111.png"))
    assert values[:5] == [CANNY, "invert", 0.6, 0.1, 0.9] and values[5] == gr.skip() and values[-1] is False
    assert "units read: 1 of 2" in note and "ControlNet 2 ('depth_midas') is not offered here" in note


def test_a_steered_picture_carries_its_unit_in_a1111_s_controlnet_field(offered):
    images, *_ = run(controlnet_1=CANNY, controlnet_1_image=editor(offered / "outline.png"),
                     controlnet_1_preprocessor="canny", controlnet_1_scale=0.5)
    assert ('ControlNet 0: "Module: canny, Model: canny, Weight: 0.5, Resize Mode: Just Resize, Threshold A: 100.0, '
            'Threshold B: 200.0, Guidance Start: 0.0, Guidance End: 1.0, Control Mode: Balanced"'
            in images[0][0].info["parameters"])


def test_a_link_naming_server_files_as_pictures_never_fills_a_picture_input(monkeypatch):
    warnings = []
    monkeypatch.setattr(gr, "Warning", warnings.append)
    updates = opened("[x](?tab=image_to_image&image=%2Fetc%2Fpasswd&controlnet_1_image=%2Fetc%2Fpasswd&steps=3)")
    names = list(inspect.signature(handlers.transform_image).parameters)[:-2]
    start = next(i for i, update in enumerate(updates) if update == SD)
    values = dict(zip(names, updates[start:]))
    assert values["image"] == gr.skip() and values["controlnet_1_image"] == gr.skip() and values["steps"] == 3
    assert warnings == ["This link carries the settings but not the starting image (a link cannot hold pictures): "
                        "upload it, then run."]
