"""Folders configured like the real ones run their own scheduler by default and give diffusers' image:
SD 1.5's PNDM (PLMS), SD-Turbo's Euler ancestral with trailing spacing at 1 and 4 steps, and folders naming
UniPC or LCM (LCM as LCM-LoRA runs it)."""
import functools

import diffusers
import pytest
import torch

from sd_core.checkpoints.loading import load_pipeline
from sd_core.pipelines.generate import text_to_image
from tests import tiny
from tests.helpers import assert_images_match
from tests.test_schedulers import SD15_SCHEDULER_CONFIG, TURBO_SCHEDULER_CONFIGS

PROMPTS = ["a small red circle on the left", "a big blue square, top right!"]
# (diffusers scheduler class, its config, sd_core's name for it, guidance, step counts)
FOLDERS = {
    "sd15-pndm": (diffusers.PNDMScheduler, SD15_SCHEDULER_CONFIG, "pndm", 6.0, [1, 6]),
    "sd-turbo": (diffusers.EulerAncestralDiscreteScheduler, TURBO_SCHEDULER_CONFIGS["sd-turbo"], "euler_ancestral",
                 0.0, [1, 4]),
    "unipc": (diffusers.UniPCMultistepScheduler, SD15_SCHEDULER_CONFIG, "unipc", 6.0, [1, 5]),
    "lcm": (diffusers.LCMScheduler, SD15_SCHEDULER_CONFIG, "lcm", 1.5, [1, 4]),
}
CASES = [(folder, steps) for folder, (*_, counts) in FOLDERS.items() for steps in counts]


@functools.cache
def folder_with_scheduler(name: str, root):
    scheduler_class, config, *_ = FOLDERS[name]
    reference = tiny.stable_diffusion("sd1", seed=3)
    reference.scheduler = scheduler_class.from_config(config)
    folder = root / name
    tiny.save_pretrained(reference, folder)
    return reference, load_pipeline(folder)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("scheduler-folders")


@pytest.mark.parametrize("name,steps", CASES, ids=[f"{name}-{steps}" for name, steps in CASES])
def test_folder_runs_its_own_scheduler_and_equals_diffusers(root, name, steps):
    reference, ours = folder_with_scheduler(name, root)
    _, _, expected_scheduler, guidance_scale, _ = FOLDERS[name]
    assert ours.scheduler_config["_class_name"] == type(reference.scheduler).__name__
    kwargs = dict(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=guidance_scale, height=24, width=32)
    latents = reference(**kwargs, generator=torch.Generator().manual_seed(11), output_type="latent").images
    images = reference(**kwargs, generator=torch.Generator().manual_seed(11), output_type="np").images
    result = text_to_image(ours, PROMPTS, steps=steps, guidance_scale=guidance_scale, height=24, width=32, seed=11)
    assert result.parameters["scheduler"] == expected_scheduler
    assert (result.latents - latents).abs().max() <= 1e-5 * max(1.0, latents.abs().max().item())
    assert_images_match(result.images, images)
