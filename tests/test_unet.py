import pytest
import torch
from diffusers import UNet2DConditionModel as ReferenceUNet
from diffusers.models.embeddings import get_timestep_embedding

from sd_core.models import presets
from sd_core.models.layers import Downsample2D, Transformer2DModel, set_attention_backend, timestep_embedding
from sd_core.models.unet import UNet2DConditionModel
from tests.helpers import parameter_shapes, randomize, relative_diff, twin

SD1_LIKE = dict(block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=2, attention_head_dim=4,
                cross_attention_dim=24, norm_num_groups=8, sample_size=8)
SMALL_CONFIGS = {
    "sd1_like_conv_projection": SD1_LIKE,
    "sd2_like_linear_projection_list_heads_upcast": dict(
        block_out_channels=[32, 64, 64], down_block_types=["CrossAttnDownBlock2D"] * 2 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 2, layers_per_block=1, attention_head_dim=[2, 4, 4],
        cross_attention_dim=32, norm_num_groups=8, use_linear_projection=True, upcast_attention=True),
    "sdxl_like_text_time_deep_transformers": dict(
        block_out_channels=[32, 64, 64], down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2,
        up_block_types=["CrossAttnUpBlock2D"] * 2 + ["UpBlock2D"], layers_per_block=[1, 2, 1],
        attention_head_dim=[2, 4, 4], transformer_layers_per_block=[1, 2, 3], cross_attention_dim=40,
        norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=16 + 6 * 8),
    "inpainting_like_9_channels": dict(SD1_LIKE, in_channels=9),
}


def build_pair(name: str, seed: int = 0):
    reference = randomize(ReferenceUNet(**SMALL_CONFIGS[name]), seed)
    return twin(UNet2DConditionModel, reference), reference


def unet_inputs(model, timestep, batch: int = 3, height: int = 8, width: int = 12):
    c = model.config
    generator = torch.Generator().manual_seed(5)
    sample = torch.randn(batch, c.in_channels, height, width, generator=generator)
    context_dim = c.cross_attention_dim
    context = torch.randn(batch, 7, context_dim, generator=generator)
    added = None
    if c.addition_embed_type == "text_time":
        added = {"text_embeds": torch.randn(batch, 16, generator=generator),
                 "time_ids": torch.tensor([[64.0, 96, 0, 0, 64, 96]]).repeat(batch, 1)}
    return sample, timestep, context, added


@pytest.mark.parametrize("timestep", [torch.tensor(981), 17, 500.5, torch.tensor([1, 500, 999])],
                         ids=["0d_tensor", "int", "float", "per_batch"])
@pytest.mark.parametrize("name", SMALL_CONFIGS)
@torch.no_grad()
def test_unet_matches_diffusers_on_non_square_batch(name, timestep):
    ours, reference = build_pair(name)
    sample, t, context, added = unet_inputs(ours, timestep)
    expected = reference(sample, t, context, added_cond_kwargs=added).sample
    assert relative_diff(ours(sample, t, context, added), expected) <= 1e-5


@pytest.mark.parametrize("name", SMALL_CONFIGS)
@torch.no_grad()
def test_unet_math_and_sdpa_attention_agree(name):
    ours, _ = build_pair(name)
    inputs = unet_inputs(ours, 300)
    fast = ours(*inputs)
    assert relative_diff(set_attention_backend(ours, "math")(*inputs), fast) <= 1e-5


@pytest.mark.parametrize("name", ["sd1_like_conv_projection", "sdxl_like_text_time_deep_transformers"])
@torch.no_grad()
def test_unet_latent_sizes_not_divisible_by_the_downsampling_match_diffusers(name):
    """Odd latents (e.g. a 520 px image) downsample with ceil and upsample back to each skip's size."""
    ours, reference = build_pair(name)
    sample, t, context, added = unet_inputs(ours, 400, height=9, width=13)
    expected = reference(sample, t, context, added_cond_kwargs=added).sample
    assert expected.shape[2:] == (9, 13)
    assert relative_diff(ours(sample, t, context, added), expected) <= 1e-5


@torch.no_grad()
@pytest.mark.slow
def test_real_size_sd15_unet_matches_diffusers_at_32x32_latent():
    torch.manual_seed(0)
    reference = ReferenceUNet.from_config(presets.UNET_SD15).eval()
    ours = twin(UNet2DConditionModel, reference)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 32, 32, generator=generator)
    context = torch.randn(1, 77, 768, generator=generator)
    diff = relative_diff(ours(sample, 500, context), reference(sample, 500, context).sample)
    print(f"SD1.5 UNet real-size relative max diff: {diff:.2e}")
    assert diff <= 1e-4


@pytest.mark.parametrize("name", ["UNET_SD15", "UNET_SD15_INPAINT", "UNET_SD21", "UNET_SDXL_BASE", "UNET_SDXL_REFINER"])
def test_real_size_unet_parameter_names_and_shapes_match_diffusers(name):
    with torch.device("meta"):
        reference = ReferenceUNet.from_config(getattr(presets, name))
        ours = UNet2DConditionModel.from_config(dict(reference.config))
    assert parameter_shapes(ours) == parameter_shapes(reference)


def test_unet_downsample_pads_symmetrically():
    down = Downsample2D(4, padding=1)
    x = torch.randn(1, 4, 8, 8)
    expected = torch.nn.functional.conv2d(x, down.conv.weight, down.conv.bias, stride=2, padding=1)
    bottom_right = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), down.conv.weight,
                                              down.conv.bias, stride=2)
    assert torch.equal(down(x), expected)
    assert not torch.allclose(down(x), bottom_right, atol=1e-3)


def test_group_norm_eps_is_1e_5_in_resnets_and_1e_6_in_transformers():
    ours, _ = build_pair("sd1_like_conv_projection")
    transformer_norms = {id(m.norm) for m in ours.modules() if isinstance(m, Transformer2DModel)}
    norms = [m for m in ours.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert transformer_norms and all(m.eps == (1e-6 if id(m) in transformer_norms else 1e-5) for m in norms)


@torch.no_grad()
def test_geglu_uses_exact_gelu():
    ours, _ = build_pair("sd1_like_conv_projection")
    geglu = ours.down_blocks[0].attentions[0].transformer_blocks[0].ff.net[0]
    x = torch.randn(2, 5, geglu.proj.in_features)
    hidden, gate = geglu.proj(x).chunk(2, dim=-1)
    assert torch.allclose(geglu(x), hidden * torch.nn.functional.gelu(gate), atol=1e-7)
    assert not torch.allclose(geglu(x), hidden * torch.nn.functional.gelu(gate, approximate="tanh"), atol=1e-6)


@pytest.mark.parametrize("flip,shift", [(True, 0), (False, 0), (True, 1), (False, 1)])
def test_timestep_embedding_order_and_frequency_shift_match_diffusers(flip, shift):
    t = torch.tensor([0, 1, 17, 500, 999])
    expected = get_timestep_embedding(t, 320, flip_sin_to_cos=flip, downscale_freq_shift=shift)
    assert torch.equal(timestep_embedding(t, 320, flip, shift), expected)
    half = 160
    first = torch.cos if flip else torch.sin
    frequency_0 = t.float() * 1.0  # i = 0 has frequency 1 whatever the shift
    assert torch.allclose(timestep_embedding(t, 320, flip, shift)[:, 0], first(frequency_0))
    assert not torch.allclose(timestep_embedding(t, 320, flip, shift), timestep_embedding(t, 320, not flip, shift))
    assert not torch.allclose(timestep_embedding(t, 320, flip, 0)[:, 1:half], timestep_embedding(t, 320, flip, 1)[:, 1:half])


@torch.no_grad()
def test_unet_rejects_bad_inputs_with_the_fix():
    ours, _ = build_pair("sd1_like_conv_projection")
    sample, t, context, _ = unet_inputs(ours, 10)
    with pytest.raises(ValueError, match=r"\(batch, 4, height, width\)"):
        ours(sample[:, :3], t, context)
    with pytest.raises(ValueError, match=r"\(batch, tokens, 24\)"):
        ours(sample, t, context[..., :10])
    with pytest.raises(ValueError, match="timesteps for a batch of 3"):
        ours(sample, torch.tensor([1, 2]), context)
    sdxl, _ = build_pair("sdxl_like_text_time_deep_transformers")
    sample, t, context, _ = unet_inputs(sdxl, 10)
    with pytest.raises(ValueError, match="added_cond_kwargs"):
        sdxl(sample, t, context)


def test_unet_config_rejects_unsupported_settings():
    with pytest.raises(ValueError, match="class_embed_type='timestep' is not supported"):
        UNet2DConditionModel.from_config({**SD1_LIKE, "class_embed_type": "timestep"})
    with pytest.raises(ValueError, match="does not know the config field"):
        UNet2DConditionModel.from_config({**SD1_LIKE, "magic": True})
