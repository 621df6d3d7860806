"""Model-level CPU offload (accelerate's hooks), run with the CPU standing in for the GPU."""
import numpy as np
import pytest
from accelerate.hooks import CpuOffload

from sd_core.checkpoints.catalog import EMBEDDED_TEXT_TO_IMAGE
from sd_core.checkpoints.loading import load_pipeline
from sd_core.pipelines.offload import enable_model_cpu_offload, execution_device
from sd_core.pipelines.generate import text_to_image

PROMPT = "a big red circle on the left on a gray background"


@pytest.fixture()
def pipe():
    return load_pipeline(EMBEDDED_TEXT_TO_IMAGE)


def test_offloaded_pipeline_draws_the_identical_image_and_unhooks_cleanly(pipe):
    plain = text_to_image(pipe, PROMPT, steps=4, guidance_scale=5.0, seed=3).images
    offload = enable_model_cpu_offload(pipe, "cpu")
    assert execution_device(pipe.unet).type == "cpu" and set(offload.hooks) == {"text_encoder", "unet", "vae"}
    offloaded = text_to_image(pipe, PROMPT, steps=4, guidance_scale=5.0, seed=3).images
    offload.remove()
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(plain, offloaded))
    assert not any(hasattr(model, "_hf_hook") or "decode" in vars(model) for model in pipe.models.values())


def test_each_component_hands_the_device_to_the_next_in_execution_order(pipe, monkeypatch):
    """On a real GPU each hook's pre-forward sends the previous component back to the CPU (accelerate skips
    that when the previous one is already on the CPU, as here): so the chain and the run order are what
    decide where each component is, and both are asserted."""
    names = {id(model): name for name, model in pipe.models.items()}
    runs = []
    pre_forward = CpuOffload.pre_forward

    def logged_pre_forward(hook, module, *args, **kwargs):
        runs.append(names[id(module)])
        return pre_forward(hook, module, *args, **kwargs)

    monkeypatch.setattr(CpuOffload, "pre_forward", logged_pre_forward)
    offload = enable_model_cpu_offload(pipe, "cpu")
    chain = [(name, hook.hook.prev_module_hook) for name, hook in offload.hooks.items()]
    assert [name for name, _ in chain] == ["text_encoder", "unet", "vae"]
    assert chain[0][1] is None and chain[1][1] is offload.hooks["text_encoder"] and chain[2][1] is offload.hooks["unet"]
    assert all(hook.hook.execution_device.type == "cpu" for hook in offload.hooks.values())
    text_to_image(pipe, PROMPT, steps=3, guidance_scale=5.0, seed=0)
    # the text encoder (prompt, then negative), the UNet once per step, then the VAE's decode
    assert runs == ["text_encoder", "text_encoder", "unet", "unet", "unet", "vae"]


def test_fp16_vae_decodes_in_fp32_on_a_copy_when_its_config_says_force_upcast(pipe):
    """SDXL's VAE overflows in float16: decoding runs in float32 (as diffusers' SDXL pipelines do) and equals
    the fp32 VAE's image, while the shared fp16 model stays fp16."""
    import torch

    from sd_core.pipelines.generate import decode
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = np.asarray(decode(pipe.vae, latents)[0])
        half = pipe.vae.half()
        half.config.force_upcast = True  # as SDXL's VAE config says (the embedded VAE's does not)
        upcast = np.asarray(decode(half, latents.half())[0])
    assert next(half.parameters()).dtype == torch.float16
    # the fp16 weights themselves are rounded, so the image is close, not identical
    assert np.abs(upcast.astype(int) - reference.astype(int)).max() <= 2


@pytest.mark.parametrize("weight,stage", [("unet.conv_in.weight", "latents after denoising"),
                                          ("vae.decoder.conv_in.weight", "VAE's decoded image")])
def test_nan_weights_stop_with_the_stage_named_instead_of_a_black_image(pipe, weight, stage):
    import torch
    component, name = weight.split(".", 1)
    with torch.no_grad():
        getattr(pipe, component).get_parameter(name).fill_(float("nan"))
    with pytest.raises(FloatingPointError, match=f"NaN or infinity in the {stage}"):
        text_to_image(pipe, PROMPT, steps=2, guidance_scale=5.0, seed=0)


def test_the_fp32_copy_of_a_half_vae_is_made_once_not_at_every_preview(pipe):
    import torch

    from sd_core.pipelines.sampling import converted_copy, decode
    half = pipe.vae.half()
    half.config.force_upcast = True
    with torch.no_grad():
        decode(half, torch.zeros(1, 4, 8, 8, dtype=torch.float16))
        first = converted_copy(half, torch.float32)
        decode(half, torch.zeros(1, 4, 8, 8, dtype=torch.float16))
    assert converted_copy(half, torch.float32) is first and next(first.parameters()).dtype == torch.float32
