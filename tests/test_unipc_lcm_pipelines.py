"""A folder whose scheduler_config.json names UniPCMultistepScheduler or LCMScheduler runs unipc / lcm by
default and gives diffusers' StableDiffusionPipeline image with that scheduler (LCM as LCM-LoRA runs it)."""
import diffusers
import pytest

from tests.test_sampler_pipelines import folder_with_scheduler, run_both
from tests.test_schedulers import SD15_SCHEDULER_CONFIG


@pytest.fixture(scope="module")
def unipc_folder(tmp_path_factory):
    return folder_with_scheduler(tmp_path_factory, diffusers.UniPCMultistepScheduler.from_config(SD15_SCHEDULER_CONFIG))


@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory):
    return folder_with_scheduler(tmp_path_factory, diffusers.LCMScheduler.from_config(SD15_SCHEDULER_CONFIG))


@pytest.mark.parametrize("steps", [1, 5])
def test_unipc_folder_equals_diffusers(unipc_folder, steps):
    reference, ours = unipc_folder
    run_both(reference, ours, steps, 6.0, "unipc")


@pytest.mark.parametrize("steps", [1, 4])
def test_lcm_folder_equals_diffusers(lcm_folder, steps):
    reference, ours = lcm_folder
    run_both(reference, ours, steps, 1.5, "lcm")
