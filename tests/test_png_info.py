"""PNG Info: sd_core's images carry A1111's "parameters" text, and read_png_parameters reads it (or ours) back."""
import json

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from sd_core.pipelines.image_io import save_image
from sd_core.pipelines.metadata import read_png_parameters
from sd_core.checkpoints.loading import load_pipeline
from sd_core.pipelines.generate import dit_sample, generate, image_to_image, text_to_image
from sd_core.pipelines.settings import DiTSettings, GenerationSettings
from tests import tiny


def parse_infotext(text: str) -> dict:
    """A1111's infotext as its format is described (stable-diffusion-webui wiki, "PNG info"), written here
    independently of sd_core: the prompt lines, an optional line starting "Negative prompt: ", then one line of
    `Key: value` pairs separated by ", " where a value holding a comma or colon is a JSON string."""
    lines = text.split("\n")
    settings_line = lines.pop()
    negative_at = next((i for i, line in enumerate(lines) if line.startswith("Negative prompt: ")), len(lines))
    out = {"prompt": "\n".join(lines[:negative_at]),
           "negative": "\n".join(lines[negative_at:])[len("Negative prompt: "):] or None}
    position = 0
    while position < len(settings_line):
        key, rest = settings_line[position:].split(": ", 1)
        if rest.startswith('"'):
            value, end = json.JSONDecoder().raw_decode(rest)
        else:
            end = rest.find(", ") if ", " in rest else len(rest)
            value = rest[:end]
        out[key] = value
        position += len(key) + 2 + end + 2  # past ", "
    return out


@pytest.fixture(scope="module")
def pipes(tmp_path_factory):
    sd = load_pipeline(tiny.save_pretrained(tiny.stable_diffusion("sd1", seed=1), tmp_path_factory.mktemp("sd1")))
    dit = load_pipeline(tiny.save_pretrained(tiny.dit(seed=2), tmp_path_factory.mktemp("dit")))
    return sd, dit


PROMPT = "a (big:1.2) red circle, on the left: gray"


def test_png_carries_a1111_parameters_an_a1111_parser_reads(pipes, tmp_path):
    sd, _ = pipes
    result = text_to_image(sd, PROMPT, "blurry, green", steps=3, guidance_scale=4.5, height=16, width=24, seed=7,
                           scheduler="dpmpp_2m_karras", clip_skip=1, prompt_syntax="a1111")
    image = Image.open(save_image(result.images[0], tmp_path / "a.png"))
    fields = parse_infotext(image.text["parameters"])
    assert fields["prompt"] == PROMPT and fields["negative"] == "blurry, green"
    assert fields["Steps"] == "3" and fields["Sampler"] == "DPM++ 2M Karras" and fields["CFG scale"] == "4.5"
    assert fields["Seed"] == "7" and fields["Size"] == "24x16" and fields["Clip skip"] == "2"
    assert fields["Model"] == result.parameters["model"] and "/" not in fields["Model"]
    assert "Prompt syntax" not in fields  # A1111's syntax is the infotext's own


def regenerate(pipe, settings: GenerationSettings, path):
    return generate(pipe, settings, image=path if settings.strength is not None else None)


@pytest.mark.parametrize("source", ["sd_core", "parameters"])
def test_read_png_parameters_round_trips_every_field_and_regenerates_the_image(pipes, tmp_path, source):
    sd, _ = pipes
    batch = text_to_image(sd, ["a cat", "a dog, (sitting)"], ["ugly", "blurry: very"], steps=3, guidance_scale=5.5,
                          guidance_rescale=0.25, height=16, width=16, seed=11, scheduler="euler_ancestral",
                          images_per_prompt=2, clip_skip=1, prompt_syntax="plain", seed_per_image=True)
    image = batch.images[3]  # the second prompt's second image: seed 14
    path = save_image(image, tmp_path / "b.png")
    if source == "parameters":  # an image with A1111's text only
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", Image.open(path).text["parameters"])
        Image.open(path).save(path, pnginfo=info)
    settings = read_png_parameters(path)
    assert settings == GenerationSettings(prompt="a dog, (sitting)", negative_prompt="blurry: very", steps=3,
                                          scheduler="euler_ancestral", guidance_scale=5.5, guidance_rescale=0.25,
                                          height=16, width=16, clip_skip=1, prompt_syntax="plain", seed=14,
                                          model=batch.parameters["model"])
    again = regenerate(sd, settings, path)
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(image))


def test_image_to_image_strength_and_dit_class_round_trip(pipes, tmp_path):
    sd, dit = pipes
    start = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    result = image_to_image(sd, start, "a cat", strength=0.5, steps=4, guidance_scale=3.0, seed=2)
    settings = read_png_parameters(save_image(result.images[0], tmp_path / "c.png"))
    assert settings.strength == 0.5 and settings.prompt == "a cat" and settings.seed == 2
    assert "Denoising strength: 0.5" in result.images[0].info["parameters"]
    sampled = dit_sample(dit, ["class 3", 5], steps=2, guidance_scale=2.0, seed=4, seed_per_image=True)
    settings = read_png_parameters(save_image(sampled.images[1], tmp_path / "d.png"))
    assert settings == DiTSettings(class_labels=(5,), steps=2, scheduler=sampled.parameters["scheduler"],
                                   guidance_scale=2.0, guided_channels="all", seed=5, model=sampled.parameters["model"])
    fields = parse_infotext(sampled.images[1].info["parameters"])
    assert fields["prompt"] == "class 5" and fields["Seed"] == "5" and fields["Class"] == "5"


# What stable-diffusion-webui 1.10 writes: the new "Schedule type" key, hashes and a version sd_core ignores.
A1111_WRITTEN = (
    'masterpiece, (red circle:1.3), gray background\n'
    'BREAK on the left\n'
    'Negative prompt: blurry, lowres\n'
    'Steps: 25, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.5, Seed: 1234567, Size: 512x768, '
    'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.45, Clip skip: 2, '
    'Lora hashes: "style: 8a3c2f", Version: v1.10.1')


def test_an_a1111_infotext_is_read_into_sd_core_settings(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", A1111_WRITTEN)
    Image.new("RGB", (8, 8)).save(tmp_path / "a1111.png", pnginfo=info)
    assert read_png_parameters(tmp_path / "a1111.png") == GenerationSettings(
        prompt="masterpiece, (red circle:1.3), gray background\nBREAK on the left",
        negative_prompt="blurry, lowres", steps=25, scheduler="dpmpp_2m_karras", guidance_scale=6.5,
        seed=1234567, width=512, height=768, strength=0.45, clip_skip=1, prompt_syntax="a1111",
        model="v1-5-pruned-emaonly")
    older = A1111_WRITTEN.replace("Sampler: DPM++ 2M, Schedule type: Karras", "Sampler: Euler a")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", older.replace(", Clip skip: 2", ""))
    Image.new("RGB", (8, 8)).save(tmp_path / "old.png", pnginfo=info)
    settings = read_png_parameters(tmp_path / "old.png")
    assert settings.scheduler == "euler_ancestral" and settings.clip_skip == 0
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", older.replace("Euler a", "DPM adaptive"))
    Image.new("RGB", (8, 8)).save(tmp_path / "unknown-sampler.png", pnginfo=info)
    notes = []
    assert read_png_parameters(tmp_path / "unknown-sampler.png", notes).scheduler == "dpmpp_2m"
    assert notes == ["its sampler 'DPM adaptive' is not one sd_core has: the closest it offers, 'DPM++ 2M', is set "
                     "instead"]
    Image.new("RGB", (8, 8)).save(tmp_path / "bare.png")
    with pytest.raises(ValueError, match="carries no generation parameters"):
        read_png_parameters(tmp_path / "bare.png")


def test_jpeg_and_webp_are_written_in_their_format_and_a_folder_is_refused(pipes, tmp_path):
    sd, _ = pipes
    image = text_to_image(sd, "x", steps=1, height=16, width=16, seed=0).images[0]
    assert Image.open(save_image(image, tmp_path / "x.jpg")).format == "JPEG"
    assert Image.open(save_image(image, tmp_path / "x.webp")).format == "WEBP"
    with pytest.raises(IsADirectoryError, match="is a folder"):
        save_image(image, tmp_path)
    with pytest.raises(ValueError, match="use a .png, .jpg or .webp"):
        save_image(image, tmp_path / "x.gif")


def a1111_png(path, text: str, **chunks):
    info = PngImagePlugin.PngInfo()
    for key, value in {**({"parameters": text} if text else {}), **chunks}.items():
        info.add_text(key, value)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return str(path)


@pytest.mark.parametrize("sampler,closest", [("DPM++ SDE Karras", "dpmpp_2m_sde_karras"), ("DPM2 a", "euler_ancestral"),
                                             ("LMS Karras", "lms")])
def test_an_a1111_sampler_sd_core_lacks_becomes_the_closest_one_it_has(sampler, closest, tmp_path):
    from sd_core.pipelines.metadata import closest_sampler
    assert closest_sampler(sampler) == closest


def test_png_info_loads_an_a1111_png_with_a_sampler_sd_core_lacks_and_keeps_lora_tags_as_text(tmp_path):
    from sd_core.app import parts as app_parts
    text = ("<lora:style:0.8> a red circle\nSteps: 12, Sampler: DPM++ SDE, Schedule type: Karras, CFG scale: 6, "
            "Seed: 77, Size: 64x64")
    model, prompt, negative, steps, guidance, scheduler, width, height, seed, syntax, skip, note = app_parts.png_info(
        a1111_png(tmp_path / "a.png", text))
    assert (prompt, steps, guidance, scheduler, seed) == ("<lora:style:0.8> a red circle", 12, 6.0,
                                                          "dpmpp_2m_sde_karras", 77)
    assert "its sampler 'DPM++ SDE Karras' is not one sd_core has: the closest it offers, 'DPM++ 2M SDE Karras'" in note
    # Markdown would read a bare <lora:style:0.8> as an autolink (the scheme "lora") and drop its brackets
    assert "&lt;lora:style:0.8&gt;" in note and "<lora" not in note


def test_png_info_reads_a_hires_fix_png_as_text_to_image_and_a_comfyui_png_as_no_parameters(tmp_path):
    import gradio as gr

    from sd_core.app import parts as app_parts
    hires = ("a red circle\nSteps: 12, Sampler: Euler, CFG scale: 6, Seed: 7, Size: 64x64, Denoising strength: 0.7, "
             "Hires upscale: 2, Hires steps: 10, Hires upscaler: Latent")
    *values, note = app_parts.png_info(a1111_png(tmp_path / "hires.png", hires))
    assert values[1] == "a red circle" and "made from an image" not in note
    comfy = a1111_png(tmp_path / "comfy.png", "", prompt='{"3": {"class_type": "KSampler"}}', workflow='{"nodes": []}')
    *values, note = app_parts.png_info(comfy)
    assert "carries no generation parameters" in note and all(value == gr.skip() for value in values)
