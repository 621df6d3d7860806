"""The opt-in fast path (sd_core.fast.pipeline) and cheap previews (sd_core.pipelines.previews) against the parity path.

Figures measured on the embedded model (the tests' settings; see the README's benchmark section), each asserted
with a margin: channels_last images are identical or within a level (PSNR inf/inf/83 dB), DeepCache N=3 over
12 steps of the model's own scheduler gives 26.4 dB (N=2: 30.6, N=4: 23.3), the linear preview's mean colour error against
the full decode on encoded shapes scenes is 50.4 levels of 255, against 64.5 for a mid-gray image (this small VAE's latents are far from linear in
colour: the best any per-pixel linear map does on those very images is 46).

Doing less work, against the parity image (fp32, channels_last): guidance truncation on the embedded SD model, guided
for the first 0.8 of the schedule 32.7 dB (0.5: 30.2), adaptive at cos >= 0.999 29.3 dB (0.995: 25.2); on the
embedded DiT (20 steps, the worst of four classes) guided for the first 0.7 33.4 dB. T-GATE (cross-attention frozen
and guidance stopped at the same point) after 0.3/0.5/0.7/0.8 of the schedule 26.1/29.5/31.1/32.2 dB, against
27.0/30.2/31.7/32.7 dB for guidance truncation alone at those points. DiT caching, the worst of four
classes at the same share of block work skipped: FORA N=2 33.8 dB (N=3 24.9), reusing the whole block stack's
residual N=2 32.8 dB (N=3 24.5), DeepCache's idea adapted (first and last block fresh, the middle 4 of 6 reused) N=3
29.5 dB while doing more work than FORA N=2 (N=2: 38.0 dB, two thirds of the blocks' work). The text cache is exact.
"""
import copy
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from sd_core.training import shapes_dataset as shapes
from sd_core.checkpoints.catalog import EMBEDDED_DIT, EMBEDDED_TEXT_TO_IMAGE
from sd_core.fast.dit import FastDiT
from sd_core.fast.options import FastOptions, asked_by
from sd_core.fast.pipeline import low_precision_copies, make_fast
from sd_core.fast.precision import Precision, choose_precision, hardware_precision
from sd_core.fast.text_cache import text_cache_of
from sd_core.fast.unet import FastUNet
from sd_core.pipelines.conditioning import encode_prompt
from sd_core.pipelines.lora import apply_loras, load_lora
from sd_core.pipelines.sampling import dtype_of
from sd_core.pipelines.textual_inversion import TextualInversion, add_embedding
from sd_core.pipelines.image_io import psnr
from sd_core.checkpoints.loading import load_pipeline
from sd_core.pipelines.generate import dit_sample, text_to_image
from sd_core.pipelines.previews import fast_preview, latent_preview, latent_preview_tensor, latent_to_rgb
from sd_core.pipelines.settings import GenerationSettings

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
    """bf16 (asked) runs bf16 copies of the UNet (conv weights channels_last) and
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
    assert fast.text_to_image(PROMPT, **SETTINGS).parameters["fast"] == "channels_last,bfloat16 (asked)"


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


def test_freeze_asks_inductor_for_weight_freezing_and_refuses_a_mode_beside_it(monkeypatch, pipe):
    import sd_core.fast.options as fast_options
    asked = []
    monkeypatch.setattr(fast_options.torch, "compile", lambda fn, **kwargs: asked.append(kwargs) or fn)
    fast = make_fast(pipe, bf16=False, compile=True, freeze=True)
    assert asked == [{"backend": "inductor", "options": {"freezing": True}}] * 2 and "freeze" in fast.description
    with pytest.raises(ValueError, match="freez.*compile_mode"):
        make_fast(pipe, bf16=False, compile=True, freeze=True, compile_mode="max-autotune")


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


def test_make_fast_takes_a_stable_diffusion_or_dit_pipeline():
    with pytest.raises(TypeError, match="Stable Diffusion or DiT pipeline"):
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
    from sd_core.fast.tome import ToMeBlock
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
    from sd_core.fast.tome import bipartite_soft_matching
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


# ---------------------------------------------------------------------------- precision: the hardware's rule


def fake_cpu(monkeypatch, amx=False, avx512_bf16=False, onednn=True):
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: onednn)


@pytest.mark.parametrize("amx,avx512_bf16,onednn,expected", [
    (True, True, True, Precision(torch.bfloat16, "cpu amx")),
    (False, True, True, Precision(torch.bfloat16, "cpu avx512_bf16")),
    (False, False, True, Precision(torch.float32, "cpu without bf16 kernels")),
    (True, True, False, Precision(torch.float32, "cpu without bf16 kernels")),  # no oneDNN: no bf16 kernels
])
def test_cpu_precision_is_bf16_where_torch_reports_amx_or_avx512_bf16(monkeypatch, amx, avx512_bf16, onednn,
                                                                      expected):
    fake_cpu(monkeypatch, amx, avx512_bf16, onednn)
    assert hardware_precision("cpu") == expected


@pytest.mark.parametrize("capability,dtype", [((9, 0), torch.bfloat16), ((8, 0), torch.bfloat16),
                                              ((7, 5), torch.float16), ((6, 1), torch.float16)])
def test_cuda_precision_is_bf16_from_compute_capability_8_and_fp16_below(monkeypatch, capability, dtype):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert hardware_precision("cuda") == Precision(dtype, f"cuda compute capability {capability[0]}.{capability[1]}")


def test_auto_precision_is_the_hardwares_and_the_result_and_metadata_say_so(monkeypatch, pipe):
    fake_cpu(monkeypatch)
    assert make_fast(pipe).description == "channels_last,float32 (cpu without bf16 kernels)"
    fake_cpu(monkeypatch, amx=True)
    fast = make_fast(pipe, channels_last=False)
    assert fast.dtype == torch.bfloat16 and fast.description == "bfloat16 (cpu amx)"
    result = fast.text_to_image(PROMPT, **dict(SETTINGS, steps=2))
    assert result.parameters["fast"] == json.loads(result.images[0].info["sd_core"])["fast"] == fast.description
    assert choose_precision("auto", torch.float16, "cpu") == Precision(torch.float16, "the model's own")
    assert choose_precision(False, torch.float32, "cpu") == Precision(torch.float32, "asked")
    with pytest.raises(ValueError, match="bf16 must be 'auto', True or False"):
        choose_precision("fast", torch.float32, "cpu")


def test_the_same_precision_in_two_processes():
    """The choice reads capabilities, not a timing: every process on one machine makes the same one."""
    code = "from sd_core.fast.precision import hardware_precision; print(hardware_precision('cpu'))"
    answers = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parents[1]).stdout for _ in range(2)]
    assert answers == [f"{hardware_precision('cpu')}\n"] * 2


def test_a_float16_choice_leaves_a_force_upcast_vae_decoding_in_float32(pipe):
    fp16 = Precision(torch.float16, "cuda compute capability 7.5")
    unet, decoding = low_precision_copies(pipe.unet, pipe.vae, fp16, False)  # the shapes VAE: no force_upcast
    assert dtype_of(unet) == dtype_of(decoding) == torch.float16 and dtype_of(pipe.unet) == torch.float32
    upcast = copy.deepcopy(pipe.vae)
    upcast.config = dataclasses.replace(upcast.config, force_upcast=True)  # SDXL's VAE
    assert low_precision_copies(pipe.unet, upcast, fp16, False)[1] is None
    assert low_precision_copies(pipe.unet, upcast, Precision(torch.bfloat16, "asked"), False)[1] is not None


# --------------------------------------------------------------------------------------- guidance truncation

GUIDANCE_UNTIL_MIN_PSNR = 29.0  # SD, guided for the first 0.8 of the schedule (SETTINGS): measured 32.7 dB
TGATE_MIN_PSNR = 26.0  # SD, T-GATE after 0.5 of the schedule: measured 29.5 dB
GUIDANCE_SIMILARITY_MIN_PSNR = 26.0  # SD, guidance stopped once cos(cond, uncond) >= 0.999: measured 29.3 dB


def record_rows(model, method: str) -> list:
    """The batch size of every call of `model.<method>` (FastUNet.predict, FastDiT.step)."""
    rows, original = [], getattr(model, method)
    setattr(model, method, lambda sample, *args: rows.append(sample.shape[0]) or original(sample, *args))
    return rows


def test_a_truncated_step_is_the_conditional_half_alone(pipe):
    generator = torch.Generator().manual_seed(0)
    sample, context = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 77, 64, generator=generator)
    fast = FastUNet(pipe.unet, FastOptions(channels_last=False, bf16=False, guidance_until=0.5))
    fast.guidance.start(guided=True)
    rows = record_rows(fast, "predict")
    with torch.no_grad():
        early, late = fast(sample, torch.tensor(700), context), fast(sample, torch.tensor(300), context)
        cond = pipe.unet(sample[1:], torch.tensor(300), context[1:])
    assert rows == [2, 1] and torch.equal(early, pipe.unet(sample, torch.tensor(700), context))
    assert torch.equal(late[:1], cond) and torch.equal(late[1:], cond)


def test_guidance_until_halves_the_batch_after_the_cut_within_stated_psnr(pipe, parity_image):
    fast = make_fast(pipe, bf16=False, guidance_until=0.8)
    rows = record_rows(fast.pipe.unet, "predict")
    result = fast.text_to_image(PROMPT, **SETTINGS)
    assert rows == [2] * 10 + [1] * 2 and "guidance_until=0.8" in result.parameters["fast"]
    assert GUIDANCE_UNTIL_MIN_PSNR < psnr(result.images[0], parity_image) < float("inf")
    unguided = fast.text_to_image(PROMPT, **dict(SETTINGS, guidance_scale=1.0))  # no [uncond, cond] batch to halve
    assert rows[12:] == [1] * 12 and unguided.images


def test_adaptive_guidance_stops_once_cond_and_uncond_agree_within_stated_psnr(pipe, parity_image):
    fast = make_fast(pipe, bf16=False, guidance_similarity=0.999)
    rows = record_rows(fast.pipe.unet, "predict")
    image = fast.text_to_image(PROMPT, **SETTINGS).images[0]
    assert rows[0] == 2 and rows[-1] == 1 and rows == sorted(rows, reverse=True)  # never guided again once stopped
    assert GUIDANCE_SIMILARITY_MIN_PSNR < psnr(image, parity_image) < float("inf")


def test_tgate_freezes_cross_attention_to_the_halves_mean_after_the_gate(pipe):
    generator = torch.Generator().manual_seed(0)
    sample, context = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 77, 64, generator=generator)
    fast = FastUNet(pipe.unet, FastOptions(channels_last=False, bf16=False, tgate=0.5))
    fast.guidance.start(guided=True)
    keys = []
    handles = [module.register_forward_hook(lambda m, i, o: keys.append(o.shape[0]))
               for name, module in pipe.unet.named_modules() if name.endswith("attn2.to_k")]
    rows = record_rows(fast, "predict")
    with torch.no_grad():
        early = fast(sample, torch.tensor(700), context)
        layers = fast.gate["layers"]
        cached = [layer.cache.clone() for layer in layers]
        late = fast(sample, torch.tensor(300), context)
    for handle in handles:
        handle.remove()
    assert torch.equal(early, pipe.unet(sample, torch.tensor(700), context))  # before the gate: the UNet itself
    assert rows == [2, 1] and len(keys) == len(layers) > 0  # past it: one half, no cross-attention computed
    assert torch.equal(late[:1], late[1:]) and all(c.shape[0] == 1 for c in cached)
    assert all(torch.equal(layer.cache, c) for layer, c in zip(layers, cached))
    assert not torch.equal(late[1:], pipe.unet(sample[1:], torch.tensor(300), context[1:]))


def test_tgate_halves_the_batch_after_the_gate_within_stated_psnr_and_leaves_the_parity_tree(pipe, parity_image):
    fast = make_fast(pipe, bf16=False, tgate=0.5)
    rows = record_rows(fast.pipe.unet, "predict")
    result = fast.text_to_image(PROMPT, **SETTINGS)
    assert rows == [2] * 7 + [1] * 5 and "tgate=0.5" in result.parameters["fast"]
    assert TGATE_MIN_PSNR < psnr(result.images[0], parity_image) < float("inf")
    assert not any(type(module).__name__ == "GatedCrossAttention" for module in pipe.unet.modules())
    assert np.array_equal(np.asarray(text_to_image(pipe, PROMPT, **SETTINGS).images[0]), np.asarray(parity_image))
    again = fast.text_to_image(PROMPT, **SETTINGS)  # a second request starts with empty caches
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(result.images[0]))


def test_a_fast_pipelines_images_record_its_options_and_png_info_gives_them_back(pipe, dit_pipe):
    from sd_core.pipelines.metadata import read_png_parameters
    fast = make_fast(pipe, bf16=False, tgate=0.5, deepcache=2)
    image = fast.text_to_image(PROMPT, **dict(SETTINGS, steps=2)).images[0]
    settings = read_png_parameters(image)  # the record as it ran, though the caller's said nothing of the fast path
    assert (settings.fast, settings.tgate, settings.deepcache, settings.tome, settings.guidance_until) == (True, 0.5, 2, 0.0, 1.0)
    assert make_fast(pipe, bf16=False, **asked_by(settings)).options == fast.options
    with pytest.raises(ValueError, match=r"ask for the fast path with \{'tome': 0.5\}; this one was made with "
                                         r"\{'deepcache': 2, 'tgate': 0.5\}: use make_fast\(pipe, \*\*asked_by"):
        fast.generate(GenerationSettings(prompt=PROMPT, steps=2, fast=True, tome=0.5))
    sample = make_fast(dit_pipe, bf16=False, dit_cache=2).dit_sample([1], steps=2, seed=0).images[0]
    assert (read_png_parameters(sample).fast, read_png_parameters(sample).dit_cache) == (True, 2)


def test_tgate_on_dit_says_it_has_no_cross_attention(dit_pipe):
    with pytest.raises(ValueError, match="cross-attention.*dit_cache"):
        make_fast(dit_pipe, tgate=0.5)


# --------------------------------------------------------------------------------------------- text cache


def test_text_cache_hits_on_the_second_request_and_the_image_is_exact(pipe, parity_image):
    fast = make_fast(pipe, bf16=False, channels_last=False)
    cache = text_cache_of(pipe.text_encoder, 8)
    first = fast.text_to_image(PROMPT, **SETTINGS).images[0]
    hits, misses = cache.hits, cache.misses
    second = fast.text_to_image(PROMPT, **dict(SETTINGS, seed=5))
    assert (cache.hits - hits, cache.misses - misses) == (2, 0)  # the prompt and the empty negative
    assert np.array_equal(np.asarray(first), np.asarray(parity_image)) and second.images


def test_text_cache_misses_after_a_lora_is_merged_or_an_embedding_is_bound():
    own = load_pipeline(EMBEDDED_TEXT_TO_IMAGE)  # changed below: not the module's shared pipeline
    fast = make_fast(own, bf16=False, text_cache=2)
    cache = text_cache_of(own.text_encoder, 2)
    encode = lambda p, text=PROMPT: encode_prompt(p, [text], None, False)[0]
    before = encode(fast.pipe)
    misses = cache.misses
    assert torch.equal(encode(fast.pipe), before) and cache.misses == misses
    fc1 = own.text_encoder.encoder.layers[0].mlp.fc1.weight
    stem = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    lora = load_lora({f"{stem}.lora_down.weight": torch.full((2, fc1.shape[1]), 0.1),
                      f"{stem}.lora_up.weight": torch.full((fc1.shape[0], 2), 0.1)})
    apply_loras(own.models, [(lora, 1.0)])
    merged = encode(fast.pipe)
    assert cache.misses == misses + 1 and not torch.equal(merged, before) and torch.equal(merged, encode(own))
    token = add_embedding(own, TextualInversion("<shape>", {"text_encoder": torch.randn(1, fc1.shape[1])}))
    assert torch.equal(encode(fast.pipe, token), encode(own, token)) and cache.misses == misses + 2


# -------------------------------------------------------------------------------------- DiT: FORA, guidance

DIT_SETTINGS = {"steps": 20, "guidance_scale": 3.0, "seed": 3}
DIT_LABELS = [0, 7, 14, 3]
FORA_MIN_PSNR = 30.0  # FORA N=2, the worst of DIT_LABELS: measured 33.8 dB (N=3: 24.9; see sd_core.fast.dit)
DIT_GUIDANCE_UNTIL_MIN_PSNR = 30.0  # guided for the first 0.7 of the schedule, the worst label: measured 33.4 dB


@pytest.fixture(scope="module")
def dit_pipe():
    return load_pipeline(EMBEDDED_DIT)


@pytest.fixture(scope="module")
def dit_parity(dit_pipe):
    return dit_sample(dit_pipe, DIT_LABELS, **DIT_SETTINGS).images


def test_fast_dit_without_a_cache_is_the_transformer_forward(dit_pipe):
    generator = torch.Generator().manual_seed(0)
    x, labels = torch.randn(2, 4, 16, 16, generator=generator), torch.tensor([3, 1000])
    with torch.no_grad():
        exact = dit_pipe.transformer(x, torch.tensor([500, 500]), labels)
        fast = FastDiT(dit_pipe.transformer, FastOptions(bf16=False))(x, torch.tensor([500, 500]), labels)
    assert torch.equal(fast, exact)


def test_fora_recomputes_attention_every_n_steps_within_stated_psnr(dit_pipe, dit_parity):
    fast = make_fast(dit_pipe, bf16=False, dit_cache=2)
    calls = []
    hook = dit_pipe.transformer.transformer_blocks[0].attn1.register_forward_hook(lambda *args: calls.append(1))
    try:
        result = fast.dit_sample(DIT_LABELS, **DIT_SETTINGS)
    finally:
        hook.remove()
    assert len(calls) == 10 and "dit_cache=2" in result.parameters["fast"]  # 20 steps: attention on every other
    worst = min(psnr(a, b) for a, b in zip(result.images, dit_parity))
    assert FORA_MIN_PSNR < worst < float("inf"), worst
    again = fast.dit_sample(DIT_LABELS, **DIT_SETTINGS).images  # reset between requests: the same images
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(again, result.images))


def test_dit_guidance_until_halves_the_batch_and_the_parity_path_is_unchanged(dit_pipe, dit_parity):
    fast = make_fast(dit_pipe, bf16=False, guidance_until=0.7, dit_cache=2)
    rows = record_rows(fast.pipe.transformer, "step")
    images = fast.dit_sample(DIT_LABELS, **DIT_SETTINGS).images
    assert rows == [8] * 15 + [4] * 5  # guided while t >= round(1000 (1 - 0.7)) = 300
    fast = make_fast(dit_pipe, bf16=False, guidance_until=0.7)
    worst = min(psnr(a, b) for a, b in zip(fast.dit_sample(DIT_LABELS, **DIT_SETTINGS).images, dit_parity))
    assert DIT_GUIDANCE_UNTIL_MIN_PSNR < worst < float("inf") and images
    parity = dit_sample(dit_pipe, DIT_LABELS, **DIT_SETTINGS).images
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(parity, dit_parity))


# ------------------------------------------------------------------------------------------------------ SDXL


def test_make_fast_runs_sdxl_exactly_without_tricks_and_halves_its_time_ids(tmp_path):
    from tests import tiny
    tiny.save_pretrained(tiny.stable_diffusion("sdxl", seed=3), tmp_path)
    xl = load_pipeline(tmp_path)
    settings = {"steps": 4, "guidance_scale": 5.0, "seed": 0, "height": 64, "width": 64}
    parity = text_to_image(xl, "a cat", **settings).images[0]
    exact = make_fast(xl, bf16=False, channels_last=False)
    assert isinstance(exact.pipe.text_encoder_2, type(xl.text_encoder_2)) and exact.pipe.text_encoder_2 is not \
        xl.text_encoder_2
    assert np.array_equal(np.asarray(exact.text_to_image("a cat", **settings).images[0]), np.asarray(parity))
    fast = make_fast(xl, bf16=False, deepcache=2, guidance_until=0.5)
    rows = record_rows(fast.pipe.unet, "predict")
    assert fast.text_to_image("a cat", **settings).images and rows == [2, 2, 1, 1]
