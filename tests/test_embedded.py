"""The shipped models: diffusers loads them offline and draws the same images as sd_core."""
import diffusers
import numpy as np
import pytest
import torch

from sd_core.training import shapes_dataset as shapes
from sd_core.checkpoints.catalog import EMBEDDED_DIT, EMBEDDED_TEXT_TO_IMAGE
from sd_core.checkpoints.loading import load_pipeline
from sd_core.pipelines.generate import dit_sample, text_to_image
from tests.helpers import assert_images_match, slow_unless

SCHEDULERS = {"dpmpp_2m": diffusers.DPMSolverMultistepScheduler, "euler": diffusers.EulerDiscreteScheduler,
              "ddim": diffusers.DDIMScheduler}


def test_shipped_weights_are_small():
    size = sum(p.stat().st_size for p in EMBEDDED_TEXT_TO_IMAGE.parent.rglob("*") if p.is_file())
    assert size < 50 * 2 ** 20, f"{size / 2 ** 20:.1f} MB"


@pytest.mark.parametrize("scheduler", slow_unless(list(SCHEDULERS), ["dpmpp_2m"]))
def test_diffusers_draws_the_same_images_from_the_shipped_text_to_image_model(scheduler):
    ours = load_pipeline(EMBEDDED_TEXT_TO_IMAGE)
    theirs = diffusers.StableDiffusionPipeline.from_pretrained(EMBEDDED_TEXT_TO_IMAGE, local_files_only=True)
    theirs.scheduler = SCHEDULERS[scheduler].from_config(theirs.scheduler.config)
    prompt = "a small purple circle in the center on a white background"
    expected = theirs(prompt, num_inference_steps=20, guidance_scale=5.0, num_images_per_prompt=2,
                      generator=torch.Generator().manual_seed(4), output_type="np").images
    result = text_to_image(ours, prompt, steps=20, guidance_scale=5.0, images_per_prompt=2, seed=4,
                           scheduler=scheduler)
    assert_images_match(result.images, expected)


@pytest.mark.slow
def test_diffusers_draws_the_same_images_from_the_shipped_dit():
    ours = load_pipeline(EMBEDDED_DIT)
    assert ours.id2label == dict(enumerate(shapes.CLASS_NAMES))
    theirs = diffusers.DiTPipeline.from_pretrained(EMBEDDED_DIT, local_files_only=True)
    expected = theirs([0, 7], guidance_scale=3.0, num_inference_steps=20, generator=torch.Generator().manual_seed(2),
                      output_type="np").images
    result = dit_sample(ours, ["red circle", 7], guidance_scale=3.0, steps=20, seed=2)
    assert_images_match(result.images, expected)


def test_the_shipped_model_draws_what_it_is_asked_for():
    """A small end-to-end sanity check of the training (the full evaluation is python -m sd_core.training evaluate)."""
    pipe = load_pipeline(EMBEDDED_TEXT_TO_IMAGE)
    scene = shapes.Scene("square", "blue", "left", "big", "white")
    result = text_to_image(pipe, scene.caption, steps=20, guidance_scale=5.0, images_per_prompt=4, seed=0)
    scores = [shapes.score(np.asarray(image), scene) for image in result.images]
    assert sum(s.colour and s.position for s in scores) >= 3


def test_the_embedded_model_is_labelled_an_sd1_style_pipeline_not_sd2():
    """Its encoder uses GELU like SD2's OpenCLIP, but it pads with <|endoftext|> and conditions like SD1."""
    assert load_pipeline(EMBEDDED_TEXT_TO_IMAGE).family == "sd1"
