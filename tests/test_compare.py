import json

import pytest
import torch

from compare.parity import compare_images, first_divergence, run_parity
from sd_core.loading import load_pipeline
from tests import tiny


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {family: tiny.save_pretrained(tiny.stable_diffusion(family, seed=7), tmp_path_factory.mktemp(family))
            for family in ("sd1", "sdxl")}


@pytest.mark.parametrize("family,scheduler", [("sd1", "ddim"), ("sd1", "euler_ancestral"), ("sdxl", "dpmpp_2m")])
def test_parity_run_passes_every_stage_and_writes_reports(folders, family, scheduler, tmp_path):
    report = run_parity(folders[family], "a red circle", "blurry", seed=3, steps=4, scheduler=scheduler,
                        guidance_scale=5.0, height=16, width=24)
    failed = [s.name for s in report.stages if not s.passed]
    assert report.passed, failed
    names = [s.name for s in report.stages]
    assert "token ids (tokenizer)" in names and "text embeddings (UNet input)" in names
    assert "step 4 noise prediction" in names and "step 4 latents" in names and names[-1] == "decoded images (8-bit)"
    assert report.divergence["first_divergent"] is None and report.divergence["modules_compared"] > 50
    folder = report.write(tmp_path / "report")
    data = json.loads((folder / "report.json").read_text())
    assert data["passed"] and len(data["stages"]) == len(report.stages)
    assert "| stage |" in (folder / "report.md").read_text()
    assert (folder / "images.png").stat().st_size > 0


def unet_inputs(pipe):
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=generator)
    context = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=generator)
    return sample, torch.tensor(500), context


def planted_divergence(folder, plant):
    import diffusers
    ours = load_pipeline(folder)
    reference = diffusers.UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True).eval()
    plant(ours.unet)
    sample, t, context = unet_inputs(ours)
    return first_divergence(ours.unet, reference, lambda: ours.unet(sample, t, context),
                            lambda: reference(sample, t, encoder_hidden_states=context))


def test_a_wrong_group_norm_eps_is_located_by_name(folders):
    def plant(unet):
        unet.down_blocks[0].resnets[0].norm2.eps = 1e-1
    result = planted_divergence(folders["sd1"], plant)
    assert result["first_divergent"]["name"] == "down_blocks.0.resnets.0.norm2"


def test_a_swapped_sin_cos_is_located_at_the_time_embedding(folders, monkeypatch):
    import sd_core.unet
    real = sd_core.unet.timestep_embedding

    def swapped(t, dim, flip_sin_to_cos, shift, **kwargs):
        return real(t, dim, not flip_sin_to_cos, shift, **kwargs)
    monkeypatch.setattr(sd_core.unet, "timestep_embedding", swapped)
    result = planted_divergence(folders["sd1"], lambda unet: None)
    assert result["first_divergent"]["name"] == "time_embedding.linear_1"


def test_image_comparison_counts_levels():
    import numpy as np
    a = np.zeros((2, 8, 8, 3), np.uint8)
    b = a.copy()
    assert compare_images(a, b).passed and compare_images(a, b).extra["psnr_db"] == float("inf")
    b[0, 0, 0, 0] = 1
    assert not compare_images(a, b).passed  # 1 of 384 values: more than 0.1%
    b[0, 0, 0, 0] = 3
    assert compare_images(a, b).extra["differing_values"] == 1 and compare_images(a, b).max_abs == 3
