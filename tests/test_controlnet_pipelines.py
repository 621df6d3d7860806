"""ControlNets in the pipelines: images equal to diffusers' ControlNet pipelines, the record's entries, PNG metadata
(sd_core's and the A1111 extension's), the CLI's flags and the messages for bad input."""
import json
import re
import warnings

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from sd_core.__main__ import main
from sd_core.checkpoints.loading import load_pipeline
from sd_core.models.controlnet import ControlNetModel
from sd_core.pipelines.control_images import canny
from sd_core.pipelines.generate import generate, image_to_image, inpaint, text_to_image
from sd_core.pipelines.image_io import save_image
from sd_core.pipelines.metadata import read_png_parameters
from sd_core.pipelines.settings import GenerationSettings
from tests import tiny
from tests.helpers import assert_images_match, randomize, twin

SCHEDULERS = {"ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler,
              "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}
PROMPTS = ["a small red circle on the left", "a big blue square"]
NEGATIVES = ["blurry", "green"]
HEIGHT, WIDTH = 24, 32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (diffusers pipeline, sd_core pipeline, two diffusers ControlNets, the same two in sd_core). The
    ControlNets start as copies of the UNet's encoder (as training does), then get seeded random weights, so every
    zero convolution is far from zero."""
    out = {}
    for family in ("sd1", "sdxl"):
        reference = tiny.stable_diffusion(family, seed=3)
        ours = load_pipeline(tiny.save_pretrained(reference, tmp_path_factory.mktemp(family)))
        references = [randomize(diffusers.ControlNetModel.from_unet(reference.unet, conditioning_embedding_out_channels=(
            8, 16)), seed) for seed in (5, 6)]
        out[family] = (reference, ours, references, [twin(ControlNetModel, r) for r in references])
    return out


def picture(width=WIDTH, height=HEIGHT, seed=0, mode="RGB") -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(mode)


def reference_images(pipeline_class, reference, controlnets, scheduler: str, ours, seed: int, **kwargs):
    pipe = pipeline_class(**reference.components, controlnet=controlnets[0] if len(controlnets) == 1 else controlnets)
    pipe.scheduler = SCHEDULERS[scheduler].from_config(ours.scheduler_config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(**kwargs, generator=torch.Generator().manual_seed(seed), output_type="np").images


def entries(scales, starts, ends, preprocessor="none") -> list:
    return [(f"controlnet-{i}", preprocessor, scale, start, end)
            for i, (scale, start, end) in enumerate(zip(scales, starts, ends))]


# (family, ControlNets, scales, starts, ends, guess mode, guidance, scheduler)
TEXT_TO_IMAGE = {
    "one_scaled_in_a_window": ("sd1", 1, [0.7], [0.2], [0.8], False, 6.0, "euler"),
    "two_with_their_own_windows": ("sd1", 2, [0.6, 1.2], [0.0, 0.4], [0.6, 1.0], False, 5.0, "ddim"),
    "two_in_guess_mode": ("sd1", 2, [1.0, 0.5], [0.0, 0.0], [1.0, 0.8], True, 5.0, "dpmpp_2m"),
    "guess_mode_without_guidance": ("sd1", 1, [0.9], [0.0], [1.0], True, 1.0, "euler"),
    "sdxl_one_in_a_window": ("sdxl", 1, [0.8], [0.0], [0.6], False, 5.0, "euler"),
    "sdxl_two_in_guess_mode": ("sdxl", 2, [1.0, 0.7], [0.2, 0.0], [1.0, 1.0], True, 5.0, "ddim"),
}


@pytest.mark.parametrize("case", TEXT_TO_IMAGE)
def test_text_to_image_with_controlnets_equals_diffusers(models, case):
    family, count, scales, starts, ends, guess_mode, guidance, scheduler = TEXT_TO_IMAGE[case]
    reference, ours, references, controlnets = models[family]
    hints = [picture(seed=i) for i in range(count)]
    pipeline_class = diffusers.StableDiffusionXLControlNetPipeline if family == "sdxl" else \
        diffusers.StableDiffusionControlNetPipeline
    expected = reference_images(
        pipeline_class, reference, references[:count], scheduler, ours, seed=4, prompt=PROMPTS, negative_prompt=NEGATIVES,
        image=hints if count > 1 else hints[0], num_inference_steps=5, guidance_scale=guidance, height=HEIGHT,
        width=WIDTH, num_images_per_prompt=2 if count == 2 else 1, controlnet_conditioning_scale=scales if count > 1
        else scales[0], control_guidance_start=starts, control_guidance_end=ends, guess_mode=guess_mode)
    result = text_to_image(ours, PROMPTS, NEGATIVES, steps=5, guidance_scale=guidance, height=HEIGHT, width=WIDTH,
                           images_per_prompt=2 if count == 2 else 1, scheduler=scheduler, seed=4,
                           controlnets=entries(scales, starts, ends), guess_mode=guess_mode,
                           control=list(zip(controlnets, hints)))
    assert_images_match(result.images, expected)
    plain = text_to_image(ours, PROMPTS, NEGATIVES, steps=5, guidance_scale=guidance, height=HEIGHT, width=WIDTH,
                          images_per_prompt=2 if count == 2 else 1, scheduler=scheduler, seed=4)
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(result.images[0]))  # the control acted


def test_image_to_image_with_a_controlnet_counts_the_window_in_the_steps_it_runs(models):
    reference, ours, references, controlnets = models["sd1"]
    start, hint = picture(seed=7), picture(seed=8)
    expected = reference_images(diffusers.StableDiffusionControlNetImg2ImgPipeline, reference, references[:1], "ddim",
                                ours, seed=2, prompt=PROMPTS[0], image=start, control_image=hint, strength=0.6,
                                num_inference_steps=10, guidance_scale=4.0, controlnet_conditioning_scale=0.8,
                                control_guidance_start=0.0, control_guidance_end=0.5)
    result = image_to_image(ours, start, PROMPTS[0], strength=0.6, steps=10, guidance_scale=4.0, seed=2,
                            scheduler="ddim", controlnets=entries([0.8], [0.0], [0.5]), control=[(controlnets[0], hint)])
    assert_images_match(result.images, expected)


@pytest.mark.parametrize("unet", ["sd1", "sd1_inpaint"], ids=["masked_image_to_image", "inpainting_unet"])
def test_inpainting_with_two_controlnets_equals_diffusers(models, unet, tmp_path):
    """An inpainting UNet takes 9 channels; its ControlNets take the 4 latent ones, as diffusers gives them."""
    reference, ours, references, controlnets = models["sd1"]
    if unet == "sd1_inpaint":
        reference = tiny.stable_diffusion(unet, seed=3)
        ours = load_pipeline(tiny.save_pretrained(reference, tmp_path))
    image, hints = picture(seed=9), [picture(seed=10), picture(seed=11)]
    mask = Image.new("L", (WIDTH, HEIGHT), 0)
    mask.paste(255, (8, 4, 24, 20))
    expected = reference_images(diffusers.StableDiffusionControlNetInpaintPipeline, reference, references, "euler",
                                ours, seed=6, prompt=PROMPTS[1], image=image, mask_image=mask, control_image=hints,
                                num_inference_steps=5, guidance_scale=5.0, controlnet_conditioning_scale=[1.0, 0.5],
                                control_guidance_start=[0.0, 0.2], control_guidance_end=[0.8, 1.0])
    result = inpaint(ours, image, mask, PROMPTS[1], steps=5, guidance_scale=5.0, seed=6, scheduler="euler",
                     controlnets=entries([1.0, 0.5], [0.0, 0.2], [0.8, 1.0]), control=list(zip(controlnets, hints)))
    assert_images_match(result.images, expected)


def test_sdxl_image_to_image_with_a_controlnet_equals_diffusers(models):
    reference, ours, references, controlnets = models["sdxl"]
    start, hint = picture(seed=12), picture(seed=13)
    expected = reference_images(diffusers.StableDiffusionXLControlNetImg2ImgPipeline, reference, references[:1],
                                "euler", ours, seed=3, prompt=PROMPTS[0], image=start, control_image=hint, strength=0.7,
                                num_inference_steps=6, guidance_scale=5.0, controlnet_conditioning_scale=0.9)
    result = image_to_image(ours, start, PROMPTS[0], strength=0.7, steps=6, guidance_scale=5.0, seed=3,
                            scheduler="euler", controlnets=entries([0.9], [0.0], [1.0]), control=[(controlnets[0], hint)])
    assert_images_match(result.images, expected)


def test_a_control_image_of_another_size_is_stretched_as_diffusers_does_and_said(models):
    reference, ours, references, controlnets = models["sd1"]
    hint = picture(width=45, height=20, seed=14)
    expected = reference_images(diffusers.StableDiffusionControlNetPipeline, reference, references[:1], "euler", ours,
                                seed=1, prompt=PROMPTS[0], image=hint, num_inference_steps=3, guidance_scale=5.0,
                                height=HEIGHT, width=WIDTH)
    with pytest.warns(UserWarning, match="45x20 but the output is 32x24: it is stretched .* Crop it"):
        result = text_to_image(ours, PROMPTS[0], steps=3, guidance_scale=5.0, height=HEIGHT, width=WIDTH, seed=1,
                               scheduler="euler", controlnets=entries([1.0], [0.0], [1.0]),
                               control=[(controlnets[0], hint)])
    assert_images_match(result.images, expected)


def test_a_controlnet_outside_its_window_is_not_run(models):
    _, ours, _, controlnets = models["sd1"]
    calls = []
    handle = controlnets[0].register_forward_hook(lambda *_: calls.append(1))
    try:
        text_to_image(ours, "x", steps=5, height=16, width=16, seed=0, scheduler="euler",
                      controlnets=entries([1.0], [0.4], [1.0]), control=[(controlnets[0], picture(16, 16))])
    finally:
        handle.remove()
    assert len(calls) == 3  # steps 2, 3 and 4 of 5: i / 5 >= 0.4


def test_the_preprocessor_named_in_the_record_makes_the_control_image(models):
    _, ours, _, controlnets = models["sd1"]
    photo = Image.new("RGB", (16, 16), (20, 20, 20))
    photo.paste((230, 230, 230), (4, 4, 12, 12))
    run = lambda image, preprocessor: np.asarray(text_to_image(  # noqa: E731
        ours, "x", steps=2, height=16, width=16, seed=0, controlnets=entries([1.0], [0.0], [1.0], preprocessor),
        control=[(controlnets[0], image)]).images[0])
    assert np.array_equal(run(photo, "canny"), run(canny(photo), "none"))
    assert not np.array_equal(run(photo, "canny"), run(photo, "none"))


# ------------------------------------------------------------------------------------------ bad input


def test_the_record_refuses_bad_controlnet_entries_with_the_rule():
    for entry, message in [(("c", "depth", 1.0, 0.0, 1.0), "the preprocessor of c must be one of none, canny, invert"),
                           (("c", "none", 2.5, 0.0, 1.0), "the scale of c must be a number from 0 to 2; got 2.5"),
                           (("c", "none", 1.0, 0.6, 0.6), r"The start of c \(0.6\) must be below its end \(0.6\)"),
                           (("c", "none", 1.0, 0.0, 1.5), "the end of c must be a number from 0 to 1"),
                           (("c", "none"), r"must be \[name, preprocessor, scale, start, end\] lists")]:
        with pytest.raises(ValueError, match=message):
            GenerationSettings(controlnets=[entry])
    assert GenerationSettings.from_values({"controlnets": [["c", "canny", "0.5", "0", "1"]], "guess_mode": "true"}) \
        == GenerationSettings(controlnets=(("c", "canny", 0.5, 0.0, 1.0),), guess_mode=True)


def test_controlnets_and_their_models_must_pair_up(models):
    _, ours, _, controlnets = models["sd1"]
    with pytest.raises(ValueError, match=r"name 1 ControlNet\(s\) but 0 were given: pass control="):
        text_to_image(ours, "x", steps=1, height=16, width=16, controlnets=entries([1.0], [0.0], [1.0]))
    with pytest.raises(ValueError, match=r"name 0 ControlNet\(s\) but 1 were given"):
        text_to_image(ours, "x", steps=1, height=16, width=16, control=[(controlnets[0], picture(16, 16))])
    with pytest.raises(TypeError, match=r"control\[0\] must pair a ControlNetModel .* got str"):
        text_to_image(ours, "x", steps=1, height=16, width=16, controlnets=entries([1.0], [0.0], [1.0]),
                      control=[("canny.safetensors", picture(16, 16))])


def test_a_controlnet_for_another_family_is_refused_before_any_step(models):
    _, ours, _, _ = models["sd1"]
    _, _, _, sdxl_controlnets = models["sdxl"]
    steps = []
    with pytest.raises(ValueError, match="does not fit this .* model.s UNet .*addition_embed_type differ.*Choose a ControlNet made for"):
        text_to_image(ours, "x", steps=2, height=16, width=16, controlnets=entries([1.0], [0.0], [1.0]),
                      control=[(sdxl_controlnets[0], picture(16, 16))], callback=lambda *a: steps.append(a))
    assert not steps


def test_sixteen_bit_and_transparent_control_images_are_said_with_the_fix(models):
    _, ours, _, controlnets = models["sd1"]
    run = lambda image: text_to_image(ours, "x", steps=1, height=16, width=16, seed=0,  # noqa: E731
                                      controlnets=entries([1.0], [0.0], [1.0]), control=[(controlnets[0], image)])
    depth = Image.fromarray((np.arange(256, dtype=np.uint16).reshape(16, 16) * 257), "I;16")
    with pytest.warns(UserWarning, match="Control image 0 is I;16 .* scaled to 8 bits.*Save it as 8-bit"):
        run(depth)
    sketch = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    sketch.paste((0, 0, 0, 255), (4, 4, 12, 6))
    with pytest.warns(UserWarning, match="transparent pixels are read as white. Flatten it .* invert preprocessor"):
        run(sketch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run(picture(16, 16, mode="RGBA"))  # an alpha channel with every pixel opaque is not transparent


# ----------------------------------------------------------------------------------------------- metadata


def test_controlnets_are_recorded_only_when_used_and_round_trip_through_both_png_texts(models, tmp_path):
    _, ours, _, controlnets = models["sd1"]
    assert "controlnets" not in text_to_image(ours, "x", steps=1, height=16, width=16, seed=0).parameters
    hints = [picture(16, 16, seed=1), picture(16, 16, seed=2)]
    settings = GenerationSettings(prompt="a cat", steps=3, height=16, width=16, seed=5, guess_mode=True,
                                  controlnets=[(str(tmp_path / "control_sd15_canny.safetensors"), "canny", 0.5, 0.0,
                                                0.8), ("lllyasviel/sd-controlnet-scribble", "invert", 1.0, 0.25, 1.0)])
    (tmp_path / "control_sd15_canny.safetensors").touch()  # a path on this machine: recorded by its name
    result = generate(ours, settings, control=list(zip(controlnets, hints)))
    path = save_image(result.images[0], tmp_path / "cn.png")
    infotext = Image.open(path).text["parameters"]
    assert ('ControlNet 0: "Module: canny, Model: control_sd15_canny, Weight: 0.5, Resize Mode: Just Resize, '
            'Threshold A: 100.0, Threshold B: 200.0, Guidance Start: 0.0, Guidance End: 0.8, Control Mode: ControlNet '
            'is more important", ControlNet 1: "Module: invert, Model: sd-controlnet-scribble, Weight: 1.0, ') in infotext
    recorded = (("control_sd15_canny.safetensors", "canny", 0.5, 0.0, 0.8),
                ("lllyasviel/sd-controlnet-scribble", "invert", 1.0, 0.25, 1.0))
    from_json = read_png_parameters(path)
    assert from_json.controlnets == recorded and from_json.guess_mode
    again = generate(ours, from_json, control=list(zip(controlnets, hints)))
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", infotext)
    Image.open(path).save(tmp_path / "a1111.png", pnginfo=info)
    from_a1111 = read_png_parameters(tmp_path / "a1111.png")
    assert from_a1111.controlnets == (("control_sd15_canny", *recorded[0][1:]), ("sd-controlnet-scribble",
                                                                                 *recorded[1][1:]))
    assert from_a1111.guess_mode


# What sd-webui-controlnet 1.1.4xx writes on A1111 1.10: the model with its hash, every unit field, the invert
# preprocessor under its long name.
A1111_WRITTEN = (
    'a house\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, Model: v1-5-pruned-emaonly, '
    'ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 0.8, Resize Mode: Crop and '
    'Resize, Low Vram: False, Processor Res: 512, Threshold A: 100.0, Threshold B: 200.0, Guidance Start: 0.1, '
    'Guidance End: 0.9, Pixel Perfect: False, Control Mode: Balanced, Hr Option: Both, Save Detected Map: True", '
    'ControlNet 1: "Module: invert (from white bg & black line), Model: control_v11p_sd15_scribble [d4ba51ff], '
    'Weight: 1.0, Resize Mode: Crop and Resize, Low Vram: False, Guidance Start: 0.0, Guidance End: 1.0, '
    'Pixel Perfect: True, Control Mode: Balanced", Version: v1.10.1')


def test_the_extensions_controlnet_units_are_read_and_an_unknown_preprocessor_is_named(tmp_path):
    def read(text):
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", text)
        Image.new("RGB", (8, 8)).save(tmp_path / "a.png", pnginfo=info)
        return read_png_parameters(tmp_path / "a.png")
    settings = read(A1111_WRITTEN)
    assert settings.controlnets == (("control_v11p_sd15_canny", "canny", 0.8, 0.1, 0.9),
                                    ("control_v11p_sd15_scribble", "invert", 1.0, 0.0, 1.0))
    assert not settings.guess_mode
    with pytest.raises(ValueError, match=re.escape("ControlNet 0 used the preprocessor 'openpose_full', which sd_core "
                                                   "lacks") + ".* use preprocessor none"):
        read(A1111_WRITTEN.replace("Module: canny", "Module: openpose_full"))


# ------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def folders(models, tmp_path_factory):
    reference, _, references, _ = models["sd1"]
    _, _, sdxl_references, _ = models["sdxl"]
    sd = tiny.save_pretrained(reference, tmp_path_factory.mktemp("sd1"))
    controlnet, sdxl_controlnet = tmp_path_factory.mktemp("controlnet"), tmp_path_factory.mktemp("controlnet_xl")
    references[0].save_pretrained(controlnet)
    sdxl_references[0].save_pretrained(sdxl_controlnet)
    return sd, controlnet, sdxl_controlnet


def test_cli_controlnet_flags_make_the_librarys_image_and_record_it(models, folders, tmp_path):
    _, ours, _, controlnets = models["sd1"]
    sd, controlnet, _ = folders
    picture(16, 16, seed=3).save(tmp_path / "hint.png")
    assert main(["generate", "--model", str(sd), "a cat", "--steps", "3", "--seed", "2", "--height", "16", "--width",
                 "16", "--controlnet", f"{controlnet}:{tmp_path / 'hint.png'}:0.5", "--preprocessor", "invert",
                 "--control-start", "0.2", "--control-end", "0.9", "--guess-mode", "-o", str(tmp_path / "out.png")]) == 0
    written = Image.open(tmp_path / "out.png")
    recorded = json.loads(written.text["sd_core"])
    assert recorded["controlnets"] == [[controlnet.name, "invert", 0.5, 0.2, 0.9]] and recorded["guess_mode"]
    expected = text_to_image(ours, "a cat", steps=3, seed=2, height=16, width=16, guidance_scale=7.5,
                             controlnets=[("x", "invert", 0.5, 0.2, 0.9)], guess_mode=True,
                             control=[(controlnets[0], tmp_path / "hint.png")])
    assert np.array_equal(np.asarray(written), np.asarray(expected.images[0]))


def test_cli_controlnet_mistakes_are_one_line_and_exit_2(folders, tmp_path, capsys):
    sd, controlnet, sdxl_controlnet = folders
    picture(16, 16).save(tmp_path / "hint.png")
    base = ["generate", "--model", str(sd), "x", "--steps", "1", "--height", "16", "--width", "16", "-o",
            str(tmp_path / "x.png")]
    cases = [(["--controlnet", f"{sdxl_controlnet}:{tmp_path / 'hint.png'}"], "Choose a ControlNet made for"),
             (["--controlnet", f"{controlnet}:{tmp_path / 'hint.png'}", "--fast", "--tgate", "0.5"],
              r"parity path without a refiner; drop --fast, --tgate\.$"),
             (["--preprocessor", "canny"], "need --controlnet"),
             (["--controlnet", f"{controlnet}:{tmp_path / 'hint.png'}", "--control-end", "0.5", "--control-end", "1",
               "--control-end", "1"], "--control-end was given 3 times for 1 --controlnet"),
             (["--controlnet", f"{controlnet}:{tmp_path / 'hint.png'}", "--control-start", "0.7", "--control-end",
               "0.5"], r"must be below its end")]
    for extra, message in cases:
        assert main(base + extra) == 2
        assert re.search(message, capsys.readouterr().err)
    with pytest.raises(SystemExit):
        main(base + ["--controlnet", "just-a-model"])
    assert "--controlnet takes MODEL:IMAGE[:SCALE]" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


# ----------------------------------------------------------------------------------------------- compare


def test_compare_controlnet_kind_passes_and_compares_residuals_only_where_the_window_acts(folders):
    from compare.kinds import run_comparison
    sd, controlnet, _ = folders
    report = run_comparison("controlnet", sd, controlnet=controlnet, prompt="a red circle", steps=4,
                            guidance_scale=4.0, height=16, width=16, scheduler="euler", control_start=0.5)
    assert report.passed and report.verdict.startswith("controlnet: PASS") and "identical" in report.verdict
    names = [s.name for s in report.stages]
    assert names[0] == "control image (ControlNet input)" and names[-1] == "decoded images (8-bit)"
    assert [n for n in names if "ControlNet mid residual" in n] == ["step 3 ControlNet mid residual",
                                                                    "step 4 ControlNet mid residual"]
    assert "step 4 latents" in names and report.divergence["modules_compared"] > 50
    assert set(report.plots) == {"per-step", "per-module"} and "control image" in report.images


def test_compare_controlnet_kind_names_the_first_wrong_module_of_the_controlnet(folders):
    from compare.controlnet_kind import stand_in_controlnet
    from compare.kinds import run_comparison
    sd, _, _ = folders
    pipe = load_pipeline(sd)
    controlnet = stand_in_controlnet(pipe)
    controlnet.down_blocks[0].resnets[0].norm1.eps = 1e-1  # the reference is built from the config: eps 1e-5
    report = run_comparison("controlnet", pipe, controlnet=controlnet, prompt="x", steps=2, guidance_scale=4.0,
                            height=16, width=16, scheduler="euler")
    assert report.passed is False
    assert report.divergence["first_divergent"]["name"] == "down_blocks.0.resnets.0.norm1"
    assert next(s for s in report.stages if not s.passed).name == "step 1 ControlNet mid residual"


def test_the_fast_paths_unet_refuses_controlnets_by_name(models):
    from sd_core.fast.pipeline import make_fast
    _, ours, _, controlnets = models["sd1"]
    with pytest.raises(ValueError, match="denoiser is a FastUNet .* Generate with the plain pipeline"):
        make_fast(ours, deepcache=2).text_to_image("x", steps=1, height=16, width=16, controlnets=entries(
            [1.0], [0.0], [1.0]), control=[(controlnets[0], picture(16, 16))])
