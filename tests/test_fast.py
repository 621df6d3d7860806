"""The opt-in fast path (sd_core.fast.pipeline) and cheap previews (sd_core.pipelines.previews) against the parity path.

Figures measured on the embedded model (the tests' settings; see the README's benchmark section), each asserted
with a margin: channels_last images are identical or within a level (PSNR inf/inf/83 dB), DeepCache N=3 over
12 steps of the model's own scheduler gives 26.4 dB (N=2: 30.6, N=4: 23.3), the linear preview's mean colour error against
the full decode on encoded shapes scenes is 50.4 levels of 255, against 64.5 for a mid-gray image (this small VAE's latents are far from linear in
colour: the best any per-pixel linear map does on those very images is 46).
"""
import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from sd_core.training import shapes_dataset as shapes
from sd_core.checkpoints.catalog import EMBEDDED_TEXT_TO_IMAGE
from sd_core.fast.pipeline import FastOptions, FastUNet, make_fast
from sd_core.pipelines.image_io import psnr
from sd_core.checkpoints.loading import load_pipeline
from sd_core.pipelines.generate import text_to_image
from sd_core.pipelines.previews import fast_preview, latent_preview, latent_preview_tensor, latent_to_rgb

PROMPT = "a big yellow triangle on the right on a black background"
SETTINGS = {"steps": 12, "guidance_scale": 5.0, "seed": 2}
DEEPCACHE_MIN_PSNR = 22.0  # measured 26.4 dB (DeepCache N=3, SETTINGS)
PREVIEW_MAX_ERROR = 55.0  # measured 50.4 levels mean |preview - decode|; a mid-gray image scores 64.5


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(EMBEDDED_TEXT_TO_IMAGE)


@pytest.fixture(scope="module")
def parity_image(pipe):
    return text_to_image(pipe, PROMPT, **SETTINGS).images[0]


def test_full_pass_is_the_unet_forward(pipe):
    """FastUNet's own full pass (the one DeepCache caches from) computes what unet.py's forward computes."""
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 16, 16, generator=generator)
    context = torch.randn(2, 77, 64, generator=generator)
    t = torch.tensor(700)
    with torch.no_grad():
        exact = pipe.unet(sample, t, context)
        fast = FastUNet(pipe.unet, FastOptions(channels_last=False, bf16=False))(sample, t, context)
    assert torch.equal(fast, exact)


def test_channels_last_stays_on_the_parity_image(pipe, parity_image):
    image = make_fast(pipe, bf16=False).text_to_image(PROMPT, **SETTINGS).images[0]
    assert psnr(image, parity_image) > 50
    assert next(pipe.unet.parameters()).is_contiguous()  # the shared weights were not converted


def test_bf16_unet_is_a_copy_within_stated_psnr(pipe, parity_image):
    """bf16 (chosen by measurement on this CPU: AMX) runs bf16 copies of the UNet (conv weights channels_last) and
    of the VAE for decoding, made once and shared by every fast pipeline over the model; measured 47.3 dB here."""
    fast = make_fast(pipe, bf16=True)
    image = fast.text_to_image(PROMPT, **SETTINGS).images[0]
    assert 40 < psnr(image, parity_image) < float("inf")
    assert fast.dtype == torch.bfloat16 and next(pipe.unet.parameters()).dtype == torch.float32
    low_unet, low_vae = fast.pipe.unet.unet, fast.pipe.vae.decoding
    assert next(low_vae.parameters()).dtype == torch.bfloat16 and next(pipe.vae.parameters()).dtype == torch.float32
    assert low_unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert next(pipe.unet.parameters()).is_contiguous() and pipe.unet.conv_in.weight.is_contiguous()
    other = make_fast(pipe, bf16=True, deepcache=2)
    assert other.pipe.unet.unet is low_unet and other.pipe.vae.decoding is low_vae
    assert fast.text_to_image(PROMPT, **SETTINGS).parameters["fast"] == "channels_last,bfloat16"


def test_deepcache_skips_deep_blocks_within_stated_psnr(pipe, parity_image):
    fast = make_fast(pipe, bf16=False, channels_last=False, deepcache=3)
    calls = []
    original = fast.pipe.unet.shallow
    fast.pipe.unet.shallow = lambda *args: calls.append(1) or original(*args)
    image = fast.text_to_image(PROMPT, **SETTINGS).images[0]
    assert len(calls) == 8  # 12 steps: full at 0, 3, 6, 9; shallow at the other 8
    value = psnr(image, parity_image)
    assert DEEPCACHE_MIN_PSNR < value < float("inf"), value
    again = fast.text_to_image(PROMPT, **SETTINGS).images[0]  # reset between requests: the same image again
    assert np.array_equal(np.asarray(again), np.asarray(image))
    assert fast.pipe.unet.options.deepcache == 3 and fast.original is pipe


@pytest.mark.slow
def test_compiled_fast_path_is_reused_across_requests(pipe):
    """The second identical request compiles nothing new. Dynamo's guards decide reuse whatever the backend;
    the 'eager' backend keeps the test fast on a small CPU (inductor's code generation takes minutes here)."""
    fast = make_fast(pipe, bf16=False, compile=True, compile_backend="eager", deepcache=2)
    counters.clear()
    settings = dict(SETTINGS, steps=4)
    first = fast.text_to_image(PROMPT, **settings).images[0]
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 2  # the full and the shallow pass were compiled
    second = fast.text_to_image(PROMPT, **settings).images[0]
    assert counters["stats"]["unique_graphs"] == graphs
    assert np.array_equal(np.asarray(first), np.asarray(second))


def encoded_scenes(vae, count: int = 32):
    scenes = shapes.sample_scenes(5, count, shapes.ALL_SCENES)
    images = torch.tensor(np.stack([image for _, image in scenes])).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        latents = vae.encode(images).mode() * vae.config.scaling_factor
        decoded = vae.decode(latents / vae.config.scaling_factor).clamp(-1, 1)
    return latents, decoded


def test_preview_colours_match_the_decode(pipe):
    latents, decoded = encoded_scenes(pipe.vae)
    preview = latent_preview_tensor(pipe.vae, latents)
    assert preview.shape == decoded.shape
    error = float((preview - decoded).abs().mean()) * 127.5
    gray = float(decoded.abs().mean()) * 127.5  # the error of a mid-gray preview
    assert error < PREVIEW_MAX_ERROR and error < gray - 5, (error, gray)


def test_preview_api(pipe):
    assert latent_to_rgb(pipe.vae) is latent_to_rgb(pipe.vae)  # fitted once per VAE
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    image = latent_preview(pipe.vae, latents)
    assert image.size == (64, 64) and image.mode == "RGB"
    thumbnail = fast_preview(pipe, latents, size=32)
    assert thumbnail.size == (32, 32)
    expected = ((latent_preview_tensor(pipe.vae, latents[:1])[0] + 1) * 127.5).round().byte().permute(1, 2, 0)
    assert np.array_equal(np.asarray(image), expected.numpy())


def test_make_fast_takes_a_unet_pipeline():
    with pytest.raises(TypeError, match="Stable Diffusion pipeline"):
        make_fast(object())


def test_benchmark_counts_cpu_attention_flops():
    """torch's flop counter has no formula for CPU flash attention; the benchmark adds it (else a UNet's attention
    would count as free and its share of the peak would read low)."""
    from compare.measure import count_flops
    q = torch.randn(2, 4, 64, 16)
    assert count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q)) * 1e9 == 4 * 2 * 4 * 64 * 64 * 16
    assert count_flops(lambda: q @ q.transpose(-1, -2)) * 1e9 == 2 * 2 * 4 * 64 * 64 * 16


TOME_MIN_PSNR = 30.0  # dB against the parity image at ratio 0.5 (SETTINGS, fp32): measured 34.4


def test_tome_ratio_0_is_the_plain_fast_path_and_0_5_stays_within_stated_psnr(pipe, parity_image):
    from sd_core.fast.pipeline import ToMeBlock
    plain = make_fast(pipe, bf16=False).text_to_image(PROMPT, **SETTINGS).images[0]
    wrapped = make_fast(pipe, bf16=False, tome=0.0)
    assert any(isinstance(m, ToMeBlock) for m in wrapped.pipe.unet.unet.modules())
    assert not any(isinstance(m, ToMeBlock) for m in pipe.unet.modules())  # the parity UNet's tree is untouched
    assert np.array_equal(np.asarray(wrapped.text_to_image(PROMPT, **SETTINGS).images[0]), np.asarray(plain))
    merged = make_fast(pipe, bf16=False, tome=0.5).text_to_image(PROMPT, **SETTINGS)
    assert "tome=0.5" in merged.parameters["fast"]
    assert not np.array_equal(np.asarray(merged.images[0]), np.asarray(plain))
    assert TOME_MIN_PSNR < psnr(merged.images[0], parity_image) < float("inf")
    assert np.array_equal(np.asarray(text_to_image(pipe, PROMPT, **SETTINGS).images[0]), np.asarray(parity_image))


def test_tome_merges_the_most_similar_tokens_and_unmerges_by_copying():
    from sd_core.fast.pipeline import bipartite_soft_matching
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 36, 8, generator=generator)  # 6x6 tokens: 9 destinations, 27 sources
    merge, unmerge = bipartite_soft_matching(x, 6, 6, 5, torch.Generator().manual_seed(1))
    merged = merge(x)
    assert merged.shape == (2, 31, 8)
    restored = unmerge(merged)
    # unmerge copies: every token is one of the merged tokens; kept sources and untouched destinations come back exactly
    assert all((restored[b, :, None] == merged[b, None]).all(-1).any(-1).all() for b in range(2))
    assert ((restored == x).all(dim=-1).sum(dim=1) >= 36 - 2 * 5).all()
    identity = bipartite_soft_matching(x, 6, 6, 0, torch.Generator())
    assert all(f(x) is x for f in identity)


def test_a_float16_vae_keeps_decodes_fp32_upcast_and_gets_no_bf16_copy(pipe):
    """bf16 decoding is made only from an fp32 VAE: a float16 one keeps sampling.decode's fp32 upcast rule."""
    import copy
    import dataclasses
    half = dataclasses.replace(pipe, vae=copy.deepcopy(pipe.vae).half())
    fast = make_fast(half, bf16=True)
    assert fast.pipe.vae.decoding is half.vae and fast.dtype == torch.bfloat16
