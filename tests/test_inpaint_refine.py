"""Inpainting (9-channel inpainting UNets and masked image to image with ordinary ones) and SDXL's base + refiner
ensemble, against diffusers' StableDiffusionInpaintPipeline and StableDiffusionXL(Img2Img)Pipeline."""
import json

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from sd_core.checkpoints.loading import load_pipeline
from sd_core.pipelines.generate import generate, image_to_image, inpaint, refine, text_to_image
from sd_core.checkpoints.saving import save_pipeline
from sd_core.pipelines.settings import GenerationSettings
from tests import tiny
from tests.helpers import assert_images_match, slow_unless
from tests.test_pipelines import REFERENCE_SCHEDULERS

PROMPT = "a small red circle on the left"


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """family -> (diffusers pipeline, sd_core pipeline loaded from its saved folder)."""
    out = {}
    for family, seed in (("sd1_inpaint", 5), ("sd1", 6), ("sdxl", 7), ("sdxl_refiner", 8)):
        reference = tiny.stable_diffusion(family, seed=seed)
        folder = tmp_path_factory.mktemp(family)
        tiny.save_pretrained(reference, folder)
        out[family] = (reference, load_pipeline(folder))
    return out


def picture_and_mask(height=24, width=32):
    """A random picture, and a mask whose gray levels straddle 0.5 (binarization) around a painted rectangle."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    mask = rng.integers(100, 156, (height, width)).astype(np.uint8)
    mask[4:16, 8:24] = 255
    mask[:, :4] = 0
    return image, Image.fromarray(mask, mode="L")


def reference_inpaint(reference, scheduler, ours, **kwargs):
    components = {k: v for k, v in reference.components.items() if k not in ("safety_checker", "feature_extractor")}
    pipe = diffusers.StableDiffusionInpaintPipeline(**components, safety_checker=None, feature_extractor=None,
                                                    requires_safety_checker=False)
    pipe.scheduler = REFERENCE_SCHEDULERS[scheduler].from_config(ours.scheduler_config)
    return pipe(**kwargs, output_type="np").images


@pytest.mark.parametrize("family", ["sd1_inpaint", "sd1"])  # 9-channel inpainting UNet; 4-channel with the blend
@pytest.mark.parametrize("scheduler,strength", slow_unless([("ddim", 1.0), ("euler", 1.0), ("euler_ancestral", 0.75),
                                                            ("dpmpp_2m", 0.6)], [("ddim", 1.0), ("euler_ancestral", 0.75)]))
def test_inpaint_equals_diffusers_inpaint_pipeline(pipelines, family, scheduler, strength):
    reference, ours = pipelines[family]
    image, mask = picture_and_mask()
    expected = reference_inpaint(reference, scheduler, ours, prompt=[PROMPT, "a blue square"], image=image,
                                 mask_image=mask, height=24, width=32, strength=strength, num_inference_steps=8,
                                 guidance_scale=5.0, negative_prompt=["blurry", "green"], num_images_per_prompt=2,
                                 generator=torch.Generator().manual_seed(3))
    result = inpaint(ours, image, mask, [PROMPT, "a blue square"], ["blurry", "green"], strength=strength, steps=8,
                     guidance_scale=5.0, images_per_prompt=2, scheduler=scheduler, seed=3)
    assert_images_match(result.images, expected)
    assert result.parameters["inpaint"] is True and result.parameters["strength"] == strength


@pytest.mark.parametrize("family,scheduler,strength", [("sdxl", "euler", 1.0), ("sdxl_refiner", "ddim", 0.7)])
def test_sdxl_inpaint_equals_diffusers_sdxl_inpaint_pipeline(pipelines, family, scheduler, strength):
    reference, ours = pipelines[family]
    components = {k: v for k, v in reference.components.items() if k not in ("image_encoder", "feature_extractor")}
    pipe = diffusers.StableDiffusionXLInpaintPipeline(**components, requires_aesthetics_score=family == "sdxl_refiner",
                                                      force_zeros_for_empty_prompt=family == "sdxl")
    pipe.scheduler = REFERENCE_SCHEDULERS[scheduler].from_config(ours.scheduler_config)
    image, mask = picture_and_mask()
    expected = pipe(PROMPT, image=image, mask_image=mask, height=24, width=32, strength=strength, num_inference_steps=8,
                    guidance_scale=5.0, negative_prompt="blurry", generator=torch.Generator().manual_seed(3),
                    output_type="np").images
    result = inpaint(ours, image, mask, PROMPT, "blurry", strength=strength, steps=8, guidance_scale=5.0,
                     scheduler=scheduler, seed=3)
    assert_images_match(result.images, expected)


def test_inpaint_without_guidance_and_with_a_seed_per_image(pipelines):
    reference, ours = pipelines["sd1_inpaint"]
    image, mask = picture_and_mask(16, 16)
    expected = reference_inpaint(reference, "euler_ancestral", ours, prompt=PROMPT, image=image, mask_image=mask,
                                 height=16, width=16, num_inference_steps=5, guidance_scale=1.0,
                                 generator=torch.Generator().manual_seed(12))
    settings = dict(steps=5, guidance_scale=1.0, scheduler="euler_ancestral")
    assert_images_match(inpaint(ours, image, mask, PROMPT, seed=12, **settings).images, expected)
    batch = inpaint(ours, image, mask, PROMPT, images_per_prompt=2, seed=11, seed_per_image=True, **settings)
    assert_images_match(batch.images[1:], expected)  # image 1 of seed 11 is the single run with seed 12


def test_masked_image_to_image_keeps_the_black_region_and_the_mask_decides(pipelines):
    _, ours = pipelines["sd1"]
    image, _ = picture_and_mask(16, 16)
    keep_all = Image.new("L", (16, 16), 0)
    paint_all = Image.new("L", (16, 16), 255)
    settings = dict(steps=4, guidance_scale=3.0, scheduler="ddim", seed=1)
    kept = inpaint(ours, image, keep_all, PROMPT, **settings)
    # Nothing to paint: after the last step the latents are exactly the image's encoded latents.
    encoded = generate(ours, GenerationSettings(prompt=PROMPT, strength=1.0, steps=1, guidance_scale=1.0, seed=1),
                       image=image, mask=keep_all)
    assert torch.equal(kept.latents, encoded.latents)
    painted = inpaint(ours, image, paint_all, PROMPT, **settings)
    plain = text_to_image(ours, PROMPT, height=16, width=16, **settings)
    assert not torch.equal(painted.latents, kept.latents)
    assert painted.latents.shape == plain.latents.shape


def test_inpaint_refuses_what_it_cannot_do(pipelines):
    _, inpainting = pipelines["sd1_inpaint"]
    _, ours = pipelines["sd1"]
    image, mask = picture_and_mask(16, 16)
    with pytest.raises(ValueError, match="inpainting model .* give it an image and a mask"):
        text_to_image(inpainting, PROMPT, steps=1, height=16, width=16)
    with pytest.raises(ValueError, match="A mask needs an image"):
        generate(ours, GenerationSettings(prompt=PROMPT, steps=1), mask=mask)
    with pytest.raises(ValueError, match="Cannot read test_inpaint_refine.py as an image"):
        inpaint(ours, image, __file__, PROMPT, steps=1)


# ------------------------------------------------------------------------------------ SDXL base + refiner


@pytest.mark.parametrize("scheduler,negative,fraction", slow_unless(
    [("euler", None, 0.8), ("dpmpp_2m", "blurry", 0.7), ("euler_ancestral", "blurry", 0.8), ("ddim", None, 0.5)],
    [("euler", None, 0.8), ("dpmpp_2m", "blurry", 0.7)]))
def test_base_and_refiner_ensemble_equals_diffusers(pipelines, scheduler, negative, fraction):
    base_reference, base = pipelines["sdxl"]
    refiner_reference, refiner = pipelines["sdxl_refiner"]
    for reference, ours in ((base_reference, base), (refiner_reference, refiner)):
        reference.scheduler = REFERENCE_SCHEDULERS[scheduler].from_config(ours.scheduler_config)
    settings = dict(num_inference_steps=10, guidance_scale=5.0, negative_prompt=negative)
    latents = base_reference(PROMPT, height=24, width=32, denoising_end=fraction, output_type="latent",
                             generator=torch.Generator().manual_seed(4), **settings).images
    expected = refiner_reference(PROMPT, image=latents, denoising_start=fraction, output_type="np",
                                 generator=torch.Generator().manual_seed(4), **settings).images
    result = refine(base, refiner, PROMPT, negative, high_noise_frac=fraction, steps=10, guidance_scale=5.0,
                    height=24, width=32, scheduler=scheduler, seed=4)
    assert_images_match(result.images, expected)
    info = json.loads(result.images[0].info["sd_core"])
    assert info["high_noise_frac"] == fraction and info["refiner"] == result.parameters["refiner"] != info["model"]
    assert info["aesthetic_score"] == 6.0 and info["denoising_start"] == fraction


def test_base_stops_at_denoising_end_with_diffusers_latents(pipelines):
    reference, ours = pipelines["sdxl"]
    reference.scheduler = REFERENCE_SCHEDULERS["euler"].from_config(ours.scheduler_config)
    expected = reference(PROMPT, height=16, width=16, num_inference_steps=7, guidance_scale=5.0, denoising_end=0.6,
                         output_type="latent", generator=torch.Generator().manual_seed(2)).images
    steps = []
    result = text_to_image(ours, PROMPT, height=16, width=16, steps=7, guidance_scale=5.0, denoising_end=0.6,
                           scheduler="euler", seed=2, output_type="latent", callback=lambda i, *_: steps.append(i))
    assert result.images == [] and steps == [0, 1, 2, 3]  # timesteps >= round(1000 * 0.4) of 7
    assert (result.latents - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())


@pytest.mark.parametrize("scheduler", ["euler", "dpmpp_2m"])
def test_refiner_image_to_image_with_aesthetic_scores_equals_diffusers(pipelines, scheduler):
    reference, ours = pipelines["sdxl_refiner"]
    reference.scheduler = REFERENCE_SCHEDULERS[scheduler].from_config(ours.scheduler_config)
    image, _ = picture_and_mask()
    expected = reference(PROMPT, image=image, strength=0.6, num_inference_steps=10, guidance_scale=4.0,
                         aesthetic_score=7.0, negative_aesthetic_score=2.0, negative_prompt="blurry",
                         crops_coords_top_left=(8, 16), generator=torch.Generator().manual_seed(5),
                         output_type="np").images
    result = image_to_image(ours, image, PROMPT, "blurry", strength=0.6, steps=10, guidance_scale=4.0,
                            aesthetic_score=7.0, negative_aesthetic_score=2.0, crops_coords_top_left=(8, 16),
                            scheduler=scheduler, seed=5)
    assert_images_match(result.images, expected)
    swapped = image_to_image(ours, image, PROMPT, "blurry", strength=0.6, steps=10, guidance_scale=4.0,
                             aesthetic_score=2.0, negative_aesthetic_score=7.0, scheduler=scheduler, seed=5)
    assert not torch.equal(swapped.latents, result.latents)


def test_denoising_fractions_are_checked(pipelines):
    _, base = pipelines["sdxl"]
    for bad in (0.0, 1.0, 1, "half"):  # a numeral string ("0.5") reads as its number, as from a link or a file
        with pytest.raises(ValueError, match="denoising_end must be a fraction strictly between 0 and 1"):
            text_to_image(base, PROMPT, steps=2, height=16, width=16, denoising_end=bad)
    with pytest.raises(ValueError, match="leave no step to run"):
        text_to_image(base, PROMPT, steps=2, height=16, width=16, denoising_end=0.01)


def test_refiner_folders_load_and_save_as_img2img_pipelines(pipelines, tmp_path):
    reference, ours = pipelines["sdxl_refiner"]
    assert ours.family == "sdxl_refiner" and ours.text_encoder is None
    folder = save_pipeline(ours, tmp_path / "refiner")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline" and index["requires_aesthetics_score"] is True
    assert type(diffusers.DiffusionPipeline.from_pretrained(folder)) is diffusers.StableDiffusionXLImg2ImgPipeline
    xl_named = tmp_path / "xl_named"
    tiny.save_pretrained(reference, xl_named)
    index = json.loads((xl_named / "model_index.json").read_text())
    (xl_named / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    assert load_pipeline(xl_named).family == "sdxl_refiner"
