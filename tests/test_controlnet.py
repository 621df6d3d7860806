"""ControlNet: the model against diffusers' ControlNetModel, the UNet taking its residuals, loading, control images."""
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import ControlNetModel as ReferenceControlNet
from diffusers import UNet2DConditionModel as ReferenceUNet
from PIL import Image

from sd_core.checkpoints import convert
from sd_core.checkpoints.controlnet import controlnet_config_from_weights, load_controlnet
from sd_core.checkpoints.convert import CheckpointError
from sd_core.checkpoints.loading import expected_shapes
from sd_core.models import presets
from sd_core.models.controlnet import ControlNetConfig, ControlNetModel
from sd_core.models.unet import UNet2DConditionModel
from sd_core.pipelines.control_images import (canny_edges, control_batch, control_image_to_tensor,
                                              preprocess_control_image)
from sd_core.pipelines.image_io import load_image
from tests.helpers import parameter_shapes, randomize, relative_diff, twin

SMALL_CONFIGS = {
    "sd1_like_conv_projection": dict(
        block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], layers_per_block=2,
        attention_head_dim=4, cross_attention_dim=24, norm_num_groups=8,
        conditioning_embedding_out_channels=[8, 16]),
    "sd2_like_linear_projection_list_heads_upcast": dict(
        block_out_channels=[32, 64, 64], down_block_types=["CrossAttnDownBlock2D"] * 2 + ["DownBlock2D"],
        layers_per_block=1, attention_head_dim=[2, 4, 4], cross_attention_dim=32, norm_num_groups=8,
        use_linear_projection=True, upcast_attention=True, conditioning_embedding_out_channels=[8, 8, 16, 16]),
    "sdxl_like_text_time_deep_transformers": dict(
        block_out_channels=[32, 64, 64], down_block_types=["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 2,
        layers_per_block=2, attention_head_dim=[2, 4, 4], transformer_layers_per_block=[1, 2, 3],
        cross_attention_dim=40, norm_num_groups=8, use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 6 * 8,
        conditioning_embedding_out_channels=[8, 16], conditioning_channels=1),
}


def build_pair(name: str, seed: int = 0, **overrides):
    reference = randomize(ReferenceControlNet(**{**SMALL_CONFIGS[name], **overrides}), seed)
    return twin(ControlNetModel, reference), reference


def controlnet_inputs(model, batch: int = 2, height: int = 4, width: int = 6, timestep=500):
    c = model.config
    generator = torch.Generator().manual_seed(7)
    sample = torch.randn(batch, c.in_channels, height, width, generator=generator)
    context = torch.randn(batch, 5, c.cross_attention_dim, generator=generator)
    factor = 2 ** (len(c.conditioning_embedding_out_channels) - 1)
    hint = torch.rand(batch, c.conditioning_channels, height * factor, width * factor, generator=generator)
    added = None
    if c.addition_embed_type == "text_time":
        added = {"text_embeds": torch.randn(batch, 16, generator=generator),
                 "time_ids": torch.tensor([[64.0, 96, 0, 0, 64, 96]]).repeat(batch, 1)}
    return sample, timestep, context, hint, added


def assert_residuals_match(ours, reference, inputs, **options):
    sample, t, context, hint, added = inputs
    expected_down, expected_mid = reference(sample, t, context, hint, added_cond_kwargs=added, return_dict=False,
                                            **options)
    down, mid = ours(sample, t, context, hint, added_cond_kwargs=added, **options)
    assert len(down) == len(expected_down) == len(ours.controlnet_down_blocks)
    for residual, expected in zip(down, expected_down):
        assert residual.shape == expected.shape
        assert relative_diff(residual, expected) <= 1e-5
    assert relative_diff(mid, expected_mid) <= 1e-5
    return down, mid


@pytest.mark.parametrize("timestep", [17, 500.5, torch.tensor([1, 999])], ids=["int", "float", "per_batch"])
@pytest.mark.parametrize("name", SMALL_CONFIGS)
@torch.no_grad()
def test_controlnet_residuals_match_diffusers(name, timestep):
    ours, reference = build_pair(name)
    assert_residuals_match(ours, reference, controlnet_inputs(ours, timestep=timestep))


@pytest.mark.parametrize("name", SMALL_CONFIGS)
@torch.no_grad()
def test_controlnet_conditioning_scale_and_guess_mode_match_diffusers(name):
    ours, reference = build_pair(name)
    inputs = controlnet_inputs(ours)
    plain_down, plain_mid = assert_residuals_match(ours, reference, inputs)
    half_down, half_mid = assert_residuals_match(ours, reference, inputs, conditioning_scale=0.5)
    assert torch.allclose(half_mid, plain_mid * 0.5)
    guess_down, guess_mid = assert_residuals_match(ours, reference, inputs, conditioning_scale=0.8, guess_mode=True)
    assert torch.allclose(guess_down[0], plain_down[0] * 0.08)  # 0.1 at the first skip, 1 at the mid block
    assert torch.allclose(guess_mid, plain_mid * 0.8)


@torch.no_grad()
def test_controlnet_with_transformer_free_attention_levels_matches_diffusers():
    """SDXL's mid and small ControlNets keep a level's attention norm and projections but no transformer."""
    ours, reference = build_pair("sdxl_like_text_time_deep_transformers", transformer_layers_per_block=[1, 0, 2])
    assert not ours.down_blocks[1].attentions[0].transformer_blocks
    assert_residuals_match(ours, reference, controlnet_inputs(ours))


@torch.no_grad()
def test_controlnet_global_pool_conditions_and_bgr_order_match_diffusers():
    ours, reference = build_pair("sd1_like_conv_projection", global_pool_conditions=True,
                                 controlnet_conditioning_channel_order="bgr")
    down, mid = assert_residuals_match(ours, reference, controlnet_inputs(ours), guess_mode=True)
    assert mid.shape[2:] == (1, 1) and all(residual.shape[2:] == (1, 1) for residual in down)


@pytest.mark.parametrize("name", ["CONTROLNET_SD15", "CONTROLNET_SD21", "CONTROLNET_SDXL"])
def test_real_size_controlnet_parameter_names_and_shapes_match_diffusers(name):
    with torch.device("meta"):
        reference = ReferenceControlNet.from_config(getattr(presets, name))
        ours = ControlNetModel.from_config(dict(reference.config))
    assert parameter_shapes(ours) == parameter_shapes(reference)


def unet_config_for(name: str) -> dict:
    """The UNet a small ControlNet config was copied from."""
    config = {k: v for k, v in SMALL_CONFIGS[name].items() if not k.startswith("conditioning")}
    return {**config, "up_block_types": [kind.replace("Down", "Up") for kind in reversed(config["down_block_types"])]}


@pytest.mark.parametrize("name", ["sd1_like_conv_projection", "sdxl_like_text_time_deep_transformers"])
@torch.no_grad()
def test_unet_adds_controlnet_residuals_as_diffusers_does(name):
    reference_unet = randomize(ReferenceUNet(**unet_config_for(name)), 1)
    unet = twin(UNet2DConditionModel, reference_unet)
    controlnet, _ = build_pair(name)
    sample, t, context, hint, added = controlnet_inputs(controlnet)
    down, mid = controlnet(sample, t, context, hint, added_cond_kwargs=added)
    expected = reference_unet(sample, t, context, added_cond_kwargs=added, down_block_additional_residuals=down,
                              mid_block_additional_residual=mid).sample
    ours = unet(sample, t, context, added, down_block_additional_residuals=down, mid_block_additional_residual=mid)
    assert relative_diff(ours, expected) <= 1e-5
    assert relative_diff(ours, unet(sample, t, context, added)) > 1e-3  # the residuals changed the prediction


@torch.no_grad()
def test_unet_refuses_half_a_residual_pair():
    name = "sd1_like_conv_projection"
    unet = randomize(UNet2DConditionModel.from_config(unet_config_for(name)))
    controlnet, _ = build_pair(name)
    sample, t, context, hint, _ = controlnet_inputs(controlnet)
    down, mid = controlnet(sample, t, context, hint)
    with pytest.raises(ValueError, match="pass both"):
        unet(sample, t, context, down_block_additional_residuals=down)
    with pytest.raises(ValueError, match="one per skip"):
        unet(sample, t, context, down_block_additional_residuals=down[:-1], mid_block_additional_residual=mid)


@pytest.mark.parametrize("name", ["sd1_like_conv_projection", "sdxl_like_text_time_deep_transformers"])
@torch.no_grad()
def test_controlnet_from_unet_copies_the_encoder_and_zeroes_every_z_as_diffusers_does(name):
    reference_unet = randomize(ReferenceUNet(**unet_config_for(name)), 2)
    unet = twin(UNet2DConditionModel, reference_unet)
    hint = SMALL_CONFIGS[name]
    expected = ReferenceControlNet.from_unet(reference_unet, conditioning_channels=hint.get("conditioning_channels", 3),
                                             conditioning_embedding_out_channels=hint["conditioning_embedding_out_channels"])
    ours = ControlNetModel.from_unet(unet, hint.get("conditioning_channels", 3), hint["conditioning_embedding_out_channels"])
    for key, tensor in expected.state_dict().items():
        if key.startswith("controlnet_cond_embedding.") and not key.startswith("controlnet_cond_embedding.conv_out"):
            continue  # E's first convs start random, in both
        assert torch.equal(ours.state_dict()[key], tensor), key
    sample, t, context, hint_image, added = controlnet_inputs(ours)
    down, mid = ours(sample, t, context, hint_image, added_cond_kwargs=added)
    assert all(not residual.any() for residual in down) and not mid.any()  # an untrained ControlNet adds nothing


def test_a_controlnet_for_another_family_is_refused_before_any_step():
    with torch.device("meta"):
        sdxl_controlnet = ControlNetModel.from_config(presets.CONTROLNET_SDXL)
        sd15_unet = UNet2DConditionModel.from_config(presets.UNET_SD15)
        sd15_controlnet = ControlNetModel.from_config(presets.CONTROLNET_SD15)
    sd15_controlnet.check_fits(sd15_unet)
    with pytest.raises(ValueError, match=r"made for SDXL models, does not fit this SD 1.x model's UNet \(its "
                                         r"cross_attention_dim, block_out_channels, layers_per_block, "
                                         r"addition_embed_type differ\)"):
        sdxl_controlnet.check_fits(sd15_unet)


@torch.no_grad()
def test_controlnet_rejects_a_hint_of_the_wrong_size_with_the_fix():
    ours, _ = build_pair("sd1_like_conv_projection")
    sample, t, context, hint, _ = controlnet_inputs(ours)
    with pytest.raises(ValueError, match=r"controlnet_cond must be \(batch, 3, 8, 12\).*control_images"):
        ours(sample, t, context, hint[:, :, :7])
    with pytest.raises(ValueError, match="mid_block_type='UNetMidBlock2D' is not supported"):
        ControlNetModel.from_config({**SMALL_CONFIGS["sd1_like_conv_projection"], "mid_block_type": "UNetMidBlock2D"})


# ------------------------------------------------------------------------------------------------- loading

def small_reference(name: str = "sd1_like_conv_projection", **overrides):
    return randomize(ReferenceControlNet(**{**SMALL_CONFIGS[name], **overrides}), 3)


def original_layout(reference, prefix: bool = True) -> dict:
    """The reference's weights under lllyasviel's original names, by running sd_core's rules backwards."""
    rules = convert.controlnet_rules(ControlNetConfig.from_dict(dict(reference.config)))
    original = convert.export_component(reference.state_dict(), rules)
    return original if prefix else {k.removeprefix(convert.CONTROLNET_PREFIX): v for k, v in original.items()}


def assert_same_weights(model, reference):
    expected = reference.state_dict()
    assert model.state_dict().keys() == expected.keys()
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)


def test_controlnet_folder_loads_with_diffusers_names(tmp_path):
    reference = small_reference("sdxl_like_text_time_deep_transformers")
    reference.save_pretrained(tmp_path / "controlnet")
    model = load_controlnet(tmp_path / "controlnet")
    assert_same_weights(model, reference)
    assert not model.training and model.config.addition_embed_type == "text_time"


@pytest.mark.parametrize("prefix", [True, False], ids=["control_model_prefix", "bare_keys"])
def test_original_controlnet_file_round_trips_through_the_rules(tmp_path, prefix):
    reference = small_reference("sd2_like_linear_projection_list_heads_upcast")
    path = tmp_path / "control_small.safetensors"
    safetensors.torch.save_file(original_layout(reference, prefix), path)
    assert_same_weights(load_controlnet(path, config=dict(reference.config)), reference)


def test_original_names_from_the_rules_are_the_ones_diffusers_single_file_converter_reads():
    """An independent check of the rules: diffusers' own converter turns sd_core's original layout back into the
    same state_dict (the hint encoder at its released widths, which diffusers' converter hard-codes)."""
    from diffusers.loaders.single_file_utils import convert_controlnet_checkpoint
    reference = small_reference(conditioning_embedding_out_channels=[16, 32, 96, 256])
    converted = convert_controlnet_checkpoint(original_layout(reference), dict(reference.config))
    assert converted.keys() == reference.state_dict().keys()
    assert all(torch.equal(converted[k], v) for k, v in reference.state_dict().items())


def test_real_size_sd15_controlnet_has_lllyasviels_original_names():
    with torch.device("meta"):
        model = ControlNetModel.from_config(presets.CONTROLNET_SD15)
    original = convert.export_component(model.state_dict(), convert.controlnet_rules(model.config))
    assert len(original) == len(model.state_dict())
    for key in ["input_hint_block.0.weight", "input_hint_block.12.bias", "input_hint_block.14.weight",
                "zero_convs.0.0.weight", "zero_convs.11.0.bias", "middle_block_out.0.weight", "time_embed.2.bias",
                "input_blocks.11.0.out_layers.3.weight", "input_blocks.3.0.op.weight",
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight", "middle_block.2.emb_layers.1.weight"]:
        assert convert.CONTROLNET_PREFIX + key in original, key
    assert not any("zero_convs.12." in k or "input_hint_block.16" in k for k in original)


SDXL_MID_LIKE = {**presets.CONTROLNET_SDXL, "transformer_layers_per_block": [1, 0, 2], "conditioning_channels": 1}


@pytest.mark.parametrize("layout", ["original", "diffusers"])
@pytest.mark.parametrize("preset", [presets.CONTROLNET_SD15, presets.CONTROLNET_SD21, presets.CONTROLNET_SDXL,
                                    SDXL_MID_LIKE], ids=["sd15", "sd21", "sdxl", "sdxl_mid_like_one_channel_hint"])
def test_a_single_files_architecture_is_read_off_its_tensors(preset, layout):
    with torch.device("meta"):
        model = ControlNetModel.from_config(preset)
    tensors = model.state_dict()
    if layout == "original":
        tensors = convert.export_component(tensors, convert.controlnet_rules(model.config))
    derived = controlnet_config_from_weights(tensors, "test")
    assert expected_shapes(ControlNetModel, derived) == parameter_shapes(model)


def test_a_diffusers_layout_single_file_loads_without_conversion(tmp_path):
    reference = small_reference()
    path = tmp_path / "diffusers_small.safetensors"
    safetensors.torch.save_file(reference.state_dict(), path)
    assert_same_weights(load_controlnet(path, config=dict(reference.config)), reference)
    with pytest.raises(CheckpointError, match=r"cross-attention width \(24\).*pass config="):
        load_controlnet(path)


def test_a_pickled_controlnet_is_refused_with_the_way_out(tmp_path):
    path = tmp_path / "control_v11p_sd15_canny.pth"
    torch.save(small_reference().state_dict(), path)
    with pytest.raises(CheckpointError, match=r"pickle.*convert it to \.safetensors"):
        load_controlnet(path)


def test_missing_and_extra_controlnet_keys_are_reported_by_name(tmp_path):
    reference = small_reference()
    config = dict(reference.config)
    original = original_layout(reference)
    missing, extra = tmp_path / "missing.safetensors", tmp_path / "extra.safetensors"
    safetensors.torch.save_file({k: v for k, v in original.items() if "zero_convs.3." not in k}, missing)
    safetensors.torch.save_file({**original, "control_model.lora_up.weight": torch.zeros(2)}, extra)
    with pytest.raises(CheckpointError, match=r"lacks control_model\.zero_convs\.3\.0\.bias"):
        load_controlnet(missing, config=config)
    with pytest.raises(CheckpointError, match=r"no part of the ControlNet uses: control_model\.lora_up\.weight"):
        load_controlnet(extra, config=config)
    diffusers_extra = tmp_path / "diffusers_extra.safetensors"
    safetensors.torch.save_file({**reference.state_dict(), "controlnet_extra.weight": torch.zeros(2)}, diffusers_extra)
    with pytest.raises(CheckpointError, match=r"unexpected controlnet_extra\.weight"):
        load_controlnet(diffusers_extra, config=config)


def test_a_folder_of_another_model_is_not_taken_for_a_controlnet(tmp_path):
    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    with pytest.raises(CheckpointError, match="UNet2DConditionModel, not a ControlNetModel"):
        load_controlnet(tmp_path)


# ------------------------------------------------------------------------------------------- control images

def rectangle_image(height=40, width=50, box=(10, 30, 12, 40), value=255.0, background=0.0) -> np.ndarray:
    image = np.full((height, width), background, np.float32)
    top, bottom, left, right = box
    image[top:bottom, left:right] = value
    return image


def edges_of(image: np.ndarray, **options) -> np.ndarray:
    return canny_edges(torch.from_numpy(image), **options).numpy()


def test_canny_finds_a_rectangles_edges_one_pixel_thin():
    edges = edges_of(rectangle_image())
    boundary = np.zeros_like(edges)  # the pixels on either side of each step
    boundary[9:11, 11:41] = boundary[29:31, 11:41] = boundary[9:31, 11:13] = boundary[9:31, 39:41] = True
    assert edges.any() and not (edges & ~boundary).any()
    assert all(edges[9:11, x].sum() == 1 and edges[29:31, x].sum() == 1 for x in range(14, 38))  # thin, unbroken
    assert all(edges[y, 11:13].sum() == 1 and edges[y, 39:41].sum() == 1 for y in range(12, 28))


def test_canny_keeps_weak_edges_only_where_they_touch_strong_ones():
    """A step of 30 grey levels gives an L1 Sobel magnitude of 120 along its sides and 180 at its corners: between
    the thresholds, so an edge only when connected (hysteresis) to a strong one (a step of 255)."""
    image = rectangle_image(box=(5, 15, 5, 15), value=30.0)  # isolated and weak
    image[25:35, 5:15] = 255.0  # strong ...
    image[25:35, 15:45] = 30.0  # ... with a weak neighbour touching it
    edges = edges_of(image)
    assert not edges[:20].any()
    assert edges[24:26, 40].any() and edges[34:36, 40].any()  # the weak rectangle's far edges survive
    assert not edges_of(image, low=130.0)[24:26, 40].any()  # below the low threshold: gone though connected


def test_canny_blur_quiets_noise_but_keeps_the_edges():
    noisy = rectangle_image() + np.random.default_rng(0).normal(0, 25, (40, 50)).astype(np.float32)
    inside = np.zeros((40, 50), bool)
    inside[14:26, 16:36] = True
    assert edges_of(noisy)[inside].sum() > 20  # noise edges without the blur
    blurred = edges_of(noisy, sigma=2.0)
    assert blurred[inside].sum() == 0 and blurred[9:11, 20:30].any()


def test_canny_rejects_crossed_thresholds():
    with pytest.raises(ValueError, match="low threshold"):
        edges_of(rectangle_image(), low=200.0, high=100.0)


def test_invert_turns_dark_line_art_on_light_into_light_lines_on_dark():
    drawing = Image.fromarray(rectangle_image(value=0.0, background=255.0).astype(np.uint8), "L")
    inverted = np.asarray(preprocess_control_image(drawing, "invert"))
    assert inverted.shape == (40, 50, 3)
    assert (inverted[20, 20] == 255).all() and (inverted[0, 0] == 0).all()


def test_canny_preprocessor_gives_white_edges_on_black_rgb():
    photo = Image.fromarray(rectangle_image().astype(np.uint8), "L").convert("RGB")
    control = np.asarray(preprocess_control_image(photo, "canny"))
    assert control.shape == (40, 50, 3) and set(np.unique(control)) == {0, 255}
    assert np.array_equal(control[..., 0] > 0, edges_of(rectangle_image()))
    with pytest.raises(ValueError, match="choose one of none, canny, invert"):
        preprocess_control_image(photo, "depth")


def random_picture(width, height, mode="RGB", seed=0) -> Image.Image:
    array = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(array, "RGB")
    return image.convert(mode) if mode != "P" else image.quantize(16)


@pytest.mark.parametrize("mode", ["RGB", "L", "P"], ids=["rgb", "grey", "palette_nearest"])
def test_control_image_resizes_as_diffusers_does(mode):
    from diffusers.image_processor import VaeImageProcessor
    image = random_picture(70, 45, mode)
    processor = VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True, do_normalize=False)
    expected = processor.preprocess(image, height=36, width=100).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = control_image_to_tensor(image, width=100, height=36)  # 100 -> 96 and 36 -> 32, as diffusers
    assert ours.shape == expected.shape == (1, 3, 32, 96)
    assert torch.equal(ours, expected)


def test_control_image_of_another_aspect_says_it_is_stretched():
    with pytest.warns(UserWarning, match="70x45 but the output is 64x64: it is stretched"):
        control_image_to_tensor(random_picture(70, 45), 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        control_image_to_tensor(random_picture(128, 64), 64, 32)


def test_sixteen_bit_and_transparent_control_images_are_read_as_the_image_reader_does():
    grey16 = Image.fromarray((np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16), "I;16")
    expected = np.asarray(load_image(grey16), dtype=np.float32) / 255.0
    assert torch.equal(control_image_to_tensor(grey16, 64, 64)[0].permute(1, 2, 0), torch.from_numpy(expected))
    hidden_black = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    assert (control_image_to_tensor(hidden_black, 64, 64) == 1.0).all()  # white, not the hidden black


@pytest.mark.parametrize("guided,guess_mode", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("images,images_per_prompt", [(1, 1), (1, 3), (2, 2)])
def test_control_batch_matches_diffusers_prepare_image(images, images_per_prompt, guided, guess_mode):
    from diffusers import StableDiffusionControlNetPipeline
    from diffusers.image_processor import VaeImageProcessor
    pictures = [random_picture(64, 48, seed=i) for i in range(images)]
    owner = SimpleNamespace(control_image_processor=VaeImageProcessor(vae_scale_factor=8, do_convert_rgb=True,
                                                                      do_normalize=False))
    prompts = 2
    expected = StableDiffusionControlNetPipeline.prepare_image(
        owner, pictures, 64, 48, prompts * images_per_prompt, images_per_prompt, "cpu", torch.float32,
        do_classifier_free_guidance=guided, guess_mode=guess_mode)
    ours = control_batch(control_image_to_tensor(pictures, 64, 48), prompts, images_per_prompt, guided, guess_mode)
    assert torch.equal(ours, expected)
    with pytest.raises(ValueError, match="one image, or one per prompt"):
        control_batch(torch.zeros(3, 3, 8, 8), prompts)
