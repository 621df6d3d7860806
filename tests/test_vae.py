import pytest
import torch
from diffusers import AutoencoderKL as ReferenceVAE

from sd_core.models import presets
from sd_core.models.vae import AutoencoderKL
from tests.helpers import parameter_shapes, randomize, relative_diff, twin

SMALL_CONFIGS = {
    "one_block_groups_1": dict(block_out_channels=[8], layers_per_block=1, norm_num_groups=1, latent_channels=4),
    "two_blocks_groups_2": dict(block_out_channels=[8, 16], layers_per_block=2, norm_num_groups=2, latent_channels=4),
    "four_blocks_groups_32": dict(block_out_channels=[32, 32, 64, 64], layers_per_block=1, norm_num_groups=32,
                                  latent_channels=4),
    "no_quant_convs_no_mid_attention": dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
                                            latent_channels=3, use_quant_conv=False, use_post_quant_conv=False,
                                            mid_block_add_attention=False),
}


def build_pair(config: dict, seed: int = 0):
    n = len(config["block_out_channels"])
    config = dict(config, down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n)
    reference = randomize(ReferenceVAE(**config), seed)
    return twin(AutoencoderKL, reference), reference


@pytest.mark.parametrize("name", SMALL_CONFIGS)
@torch.no_grad()
def test_vae_encode_decode_match_diffusers(name):
    ours, reference = build_pair(SMALL_CONFIGS[name])
    factor = ours.downscale_factor
    x = torch.randn(3, 3, 5 * factor * 2, 3 * factor * 2, generator=torch.Generator().manual_seed(1))  # non-square
    posterior, ref_posterior = ours.encode(x), reference.encode(x).latent_dist
    assert relative_diff(posterior.mean, ref_posterior.mean) <= 1e-5
    assert relative_diff(posterior.std, ref_posterior.std) <= 1e-5
    z = torch.randn_like(posterior.mean)
    assert relative_diff(ours.decode(z), reference.decode(z).sample) <= 1e-5


@torch.no_grad()
def test_vae_40x24_image_round_trip_matches_diffusers():
    ours, reference = build_pair(SMALL_CONFIGS["two_blocks_groups_2"])
    x = torch.randn(3, 3, 40, 24, generator=torch.Generator().manual_seed(2))
    assert relative_diff(ours(x), reference(x).sample) <= 1e-5


@torch.no_grad()
def test_posterior_sample_draws_noise_like_diffusers():
    ours, reference = build_pair(SMALL_CONFIGS["two_blocks_groups_2"])
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    ours_sample = ours.encode(x).sample(torch.Generator().manual_seed(7))
    ref_sample = reference.encode(x).latent_dist.sample(torch.Generator().manual_seed(7))
    assert relative_diff(ours_sample, ref_sample) <= 1e-5
    assert torch.equal(ours.encode(x).mode(), ours.encode(x).mean)


@torch.no_grad()
def test_vae_encoder_pads_bottom_right_before_stride2():
    """A symmetric pad gives the same shapes but shifts the image: only numbers can catch it."""
    ours, reference = build_pair(SMALL_CONFIGS["two_blocks_groups_2"])
    downsample = ours.encoder.down_blocks[0].downsamplers[0]
    x = torch.randn(1, 8, 8, 8)
    expected = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), downsample.conv.weight,
                                          downsample.conv.bias, stride=2)
    symmetric = torch.nn.functional.conv2d(x, downsample.conv.weight, downsample.conv.bias, stride=2, padding=1)
    assert torch.allclose(downsample(x), expected, atol=1e-6)
    assert not torch.allclose(downsample(x), symmetric, atol=1e-3)


def test_vae_group_norms_use_eps_1e_6():
    ours, _ = build_pair(SMALL_CONFIGS["two_blocks_groups_2"])
    norms = [m for m in ours.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)


@torch.no_grad()
def test_vae_with_wrong_group_norm_eps_is_caught_by_parity():
    ours, reference = build_pair(SMALL_CONFIGS["one_block_groups_1"])
    for m in ours.modules():
        if isinstance(m, torch.nn.GroupNorm):
            m.eps = 1e-2
    x = torch.randn(1, 3, 8, 8)
    assert relative_diff(ours(x), reference(x).sample) > 1e-5


def test_vae_rejects_wrong_channel_count_and_size():
    ours, _ = build_pair(SMALL_CONFIGS["two_blocks_groups_2"])
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
        ours.encode(torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match="multiples of 2"):
        ours.encode(torch.randn(1, 3, 15, 16))
    with pytest.raises(ValueError, match=r"\(batch, 4, height, width\)"):
        ours.decode(torch.randn(1, 3, 8, 8))


def test_vae_config_rejects_unknown_field():
    with pytest.raises(ValueError, match="does not know the config field"):
        AutoencoderKL.from_config({**presets.VAE_SD, "mystery_option": 1})


def test_real_size_sd_vae_parameter_names_and_shapes_match_diffusers():
    with torch.device("meta"):
        reference = ReferenceVAE.from_config(presets.VAE_SD)
        ours = AutoencoderKL.from_config(dict(reference.config))
    assert parameter_shapes(ours) == parameter_shapes(reference)
