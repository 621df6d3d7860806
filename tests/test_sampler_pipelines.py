"""Folders configured like the real ones run their own scheduler by default and give diffusers' image:
SD 1.5's PNDM (PLMS), SD-Turbo's Euler ancestral with trailing spacing at 1 and 4 steps."""
import diffusers
import pytest
import torch

from sd_core.loading import load_pipeline
from sd_core.pipelines import text_to_image
from tests import tiny
from tests.helpers import assert_images_match
from tests.test_schedulers import SD15_SCHEDULER_CONFIG, TURBO_SCHEDULER_CONFIGS

PROMPTS = ["a small red circle on the left", "a big blue square, top right!"]


def folder_with_scheduler(tmp_path_factory, scheduler):
    reference = tiny.stable_diffusion("sd1", seed=3)
    reference.scheduler = scheduler
    folder = tmp_path_factory.mktemp(type(scheduler).__name__)
    tiny.save_pretrained(reference, folder)
    return reference, load_pipeline(folder)


@pytest.fixture(scope="module")
def sd15_folder(tmp_path_factory):
    return folder_with_scheduler(tmp_path_factory, diffusers.PNDMScheduler.from_config(SD15_SCHEDULER_CONFIG))


@pytest.fixture(scope="module")
def turbo_folder(tmp_path_factory):
    config = TURBO_SCHEDULER_CONFIGS["sd-turbo"]
    return folder_with_scheduler(tmp_path_factory, diffusers.EulerAncestralDiscreteScheduler.from_config(config))


def run_both(reference, ours, steps, guidance_scale, expected_scheduler):
    assert ours.scheduler_config["_class_name"] == type(reference.scheduler).__name__
    kwargs = dict(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=guidance_scale, height=24, width=32)
    latents = reference(**kwargs, generator=torch.Generator().manual_seed(11), output_type="latent").images
    images = reference(**kwargs, generator=torch.Generator().manual_seed(11), output_type="np").images
    result = text_to_image(ours, PROMPTS, steps=steps, guidance_scale=guidance_scale, height=24, width=32, seed=11)
    assert result.parameters["scheduler"] == expected_scheduler
    assert (result.latents - latents).abs().max() <= 1e-5 * max(1.0, latents.abs().max().item())
    assert_images_match(result.images, images)


@pytest.mark.parametrize("steps", [1, 6])
def test_sd15_pndm_folder_equals_diffusers_default_pipeline(sd15_folder, steps):
    reference, ours = sd15_folder
    run_both(reference, ours, steps, 6.0, "pndm")


@pytest.mark.parametrize("steps", [1, 4])
def test_turbo_folder_equals_diffusers_at_guidance_0(turbo_folder, steps):
    reference, ours = turbo_folder
    run_both(reference, ours, steps, 0.0, "euler_ancestral")
