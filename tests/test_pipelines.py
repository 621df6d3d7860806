import json
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image

from sd_core.checkpoints.loading import load_pipeline
from sd_core.pipelines.image_io import load_image, save_image
from sd_core.pipelines.generate import dit_sample, image_to_image, text_to_image, vae_roundtrip
from tests import tiny
from tests.helpers import assert_images_match, slow_unless

REFERENCE_SCHEDULERS = {"ddim": diffusers.DDIMScheduler, "euler": diffusers.EulerDiscreteScheduler,
                        "euler_ancestral": diffusers.EulerAncestralDiscreteScheduler,
                        "dpmpp_2m": diffusers.DPMSolverMultistepScheduler}
PROMPTS = ["a small red circle on the left", "a big blue square, top right!"]
NEGATIVES = ["blurry", "green"]


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """family -> (diffusers pipeline, sd_core pipeline loaded from its saved folder)."""
    out = {}
    for family in ("sd1", "sd2", "sdxl"):
        reference = tiny.stable_diffusion(family, seed=3)
        folder = tmp_path_factory.mktemp(family)
        tiny.save_pretrained(reference, folder)
        out[family] = (reference, load_pipeline(folder))
    reference = tiny.dit(seed=4, num_classes=1000)  # DiTPipeline's null class is id 1000
    folder = tmp_path_factory.mktemp("dit")
    tiny.save_pretrained(reference, folder)
    out["dit"] = (reference, load_pipeline(folder))
    return out


def use_scheduler(reference, ours, name):
    """The same scheduler config on both sides: the one saved in the folder sd_core loaded."""
    reference.scheduler = REFERENCE_SCHEDULERS[name].from_config(ours.scheduler_config)


def reference_run(reference, ours, scheduler, **kwargs):
    use_scheduler(reference, ours, scheduler)
    latents = reference(**kwargs, generator=torch.Generator().manual_seed(11), output_type="latent").images
    images = reference(**kwargs, generator=torch.Generator().manual_seed(11), output_type="np").images
    return latents, images


CASES = [(family, scheduler, negative) for family in ("sd1", "sd2", "sdxl") for scheduler in REFERENCE_SCHEDULERS
         for negative in (False, True)]


@pytest.mark.parametrize("family,scheduler,negative", slow_unless(CASES, [("sd1", "ddim", False), ("sd1", "euler_ancestral", True),
                                                                  ("sd2", "dpmpp_2m", True), ("sdxl", "euler", True)]))
def test_text_to_image_equals_diffusers(pipelines, family, scheduler, negative):
    reference, ours = pipelines[family]
    kwargs = dict(prompt=PROMPTS, negative_prompt=NEGATIVES if negative else None, num_inference_steps=6,
                  guidance_scale=6.0, height=24, width=32)
    latents, images = reference_run(reference, ours, scheduler, **kwargs)
    result = text_to_image(ours, PROMPTS, NEGATIVES if negative else None, steps=6, guidance_scale=6.0, height=24,
                           width=32, scheduler=scheduler, seed=11)
    assert (result.latents - latents).abs().max() <= 1e-5 * max(1.0, latents.abs().max().item())
    assert_images_match(result.images, images)


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_images_per_prompt_guidance_rescale_and_given_latents_equal_diffusers(pipelines, family):
    reference, ours = pipelines[family]
    given = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    use_scheduler(reference, ours, "euler")
    expected = reference(PROMPTS, num_inference_steps=4, guidance_scale=5.0, guidance_rescale=0.7, height=16, width=16,
                         num_images_per_prompt=2, latents=given, output_type="np").images
    result = text_to_image(ours, PROMPTS, steps=4, guidance_scale=5.0, guidance_rescale=0.7, height=16, width=16,
                           images_per_prompt=2, latents=given, scheduler="euler")
    assert_images_match(result.images, expected)


@pytest.mark.parametrize("family,scheduler", slow_unless([("sd1", "ddim"), ("sd1", "euler_ancestral"), ("sd2", "dpmpp_2m"),
                                                          ("sdxl", "euler")], [("sd1", "ddim"), ("sdxl", "euler")]))
def test_image_to_image_equals_diffusers(pipelines, family, scheduler):
    reference, ours = pipelines[family]
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 32, 3), dtype=np.uint8))
    components = dict(reference.components)
    img2img_class = diffusers.StableDiffusionXLImg2ImgPipeline if family == "sdxl" \
        else diffusers.StableDiffusionImg2ImgPipeline
    img2img = img2img_class(**components)
    img2img.scheduler = REFERENCE_SCHEDULERS[scheduler].from_config(ours.scheduler_config)
    expected = img2img(PROMPTS[0], image=image, strength=0.6, num_inference_steps=10, guidance_scale=4.0,
                       generator=torch.Generator().manual_seed(2), output_type="np").images
    result = image_to_image(ours, image, PROMPTS[0], strength=0.6, steps=10, guidance_scale=4.0, seed=2,
                            scheduler=scheduler)
    assert_images_match(result.images, expected)


# Not Euler: diffusers' DiTPipeline never multiplies the initial noise by init_noise_sigma, which sigma-based
# samplers need; sd_core does (a deliberate difference, see README).
@pytest.mark.parametrize("scheduler", ["ddim", "dpmpp_2m"])
def test_dit_sampling_equals_diffusers(pipelines, scheduler):
    reference, ours = pipelines["dit"]
    use_scheduler(reference, ours, scheduler)
    expected = reference([3, 999], guidance_scale=4.0, num_inference_steps=8,
                         generator=torch.Generator().manual_seed(9), output_type="np").images
    result = dit_sample(ours, [3, 999], guidance_scale=4.0, steps=8, scheduler=scheduler, seed=9)
    assert_images_match(result.images, expected)


def original_dit_loop(pipe, labels, guidance_scale, steps, seed):
    """The facebookresearch/DiT forward_with_cfg: guidance on the first three channels only, DDIM steps."""
    transformer, c = pipe.transformer, pipe.transformer.config
    scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler_config)
    scheduler.set_timesteps(steps)
    x = torch.randn(len(labels), 4, c.sample_size, c.sample_size, generator=torch.Generator().manual_seed(seed))
    y = torch.tensor(labels + [1000] * len(labels))
    for t in scheduler.timesteps:
        half = x
        combined = torch.cat([half, half])
        model_out = transformer(combined, t.repeat(len(combined)), y)
        eps, rest = model_out[:, :3], model_out[:, 3:]
        cond_eps, uncond_eps = torch.split(eps, len(eps) // 2, dim=0)
        half_eps = uncond_eps + guidance_scale * (cond_eps - uncond_eps)
        eps = torch.cat([half_eps, half_eps], dim=0)
        out = torch.cat([eps, rest], dim=1)[: len(labels), :4]
        x = scheduler.step(out, t, x).prev_sample
    return x


@torch.no_grad()
def test_dit_first3_guidance_follows_the_original_code_and_differs_only_where_expected(pipelines):
    _, ours = pipelines["dit"]
    result = dit_sample(ours, [3, 7], guidance_scale=4.0, steps=6, scheduler="ddim", seed=1, guided_channels="first3")
    assert (result.latents - original_dit_loop(ours, [3, 7], 4.0, 6, 1)).abs().max() <= 1e-5
    first_steps = {}
    for mode in ("all", "first3"):
        dit_sample(ours, [3, 7], guidance_scale=4.0, steps=6, scheduler="ddim", seed=1, guided_channels=mode,
                   callback=lambda i, t, x, x0, mode=mode: first_steps.setdefault(mode, x.clone()))
    # DDIM updates each channel from that channel alone: after one step only channel 3 differs.
    assert torch.equal(first_steps["all"][:, :3], first_steps["first3"][:, :3])
    assert not torch.allclose(first_steps["all"][:, 3], first_steps["first3"][:, 3])


@torch.no_grad()
def test_dit_ddpm_samples_with_the_learned_variance(pipelines):
    _, ours = pipelines["dit"]
    result = dit_sample(ours, ["class 5"], guidance_scale=1.0, steps=5, scheduler="ddpm", seed=0)
    assert result.images[0].size == (16, 16) and result.parameters["class_labels"] == [5]
    ddpm = diffusers.DDPMScheduler.from_config({**ours.scheduler_config, "variance_type": "learned_range"})
    ddpm.set_timesteps(5)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    for t in ddpm.timesteps:
        out = ours.transformer(x, t.reshape(1), torch.tensor([5]))  # 8 channels: eps and variance
        x = ddpm.step(out, t, x, generator=generator).prev_sample
    assert (result.latents - x).abs().max() <= 1e-5


def test_seed_reproduces_and_png_metadata_records_parameters(pipelines, tmp_path):
    _, ours = pipelines["sd1"]
    first = text_to_image(ours, "a red circle", steps=3, height=16, width=16, seed=None)
    again = text_to_image(ours, "a red circle", steps=3, height=16, width=16, seed=first.parameters["seed"])
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))
    path = save_image(first.images[0], tmp_path / "out.png")
    parameters = json.loads(Image.open(path).text["sd_core"])
    assert parameters["seed"] == first.parameters["seed"] and parameters["prompt"] == ["a red circle"]
    assert parameters["steps"] == 3 and parameters["scheduler"]


def test_step_callback_receives_latents_and_x0_each_step(pipelines):
    _, ours = pipelines["sd1"]
    seen = []
    text_to_image(ours, "x", steps=4, height=16, width=16, seed=1,
                  callback=lambda i, t, x, x0: seen.append((i, int(t), x.shape, x0.shape)))
    assert [s[0] for s in seen] == [0, 1, 2, 3] and seen[0][2] == seen[0][3] == (1, 4, 8, 8)


def test_long_prompts_are_truncated_with_a_warning(pipelines):
    _, ours = pipelines["sd1"]
    with pytest.warns(UserWarning, match="truncated; this part was ignored"):
        text_to_image(ours, " ".join(["circle"] * 90), steps=1, height=16, width=16, seed=0)


def test_vae_roundtrip_handles_any_input_and_reports_psnr(pipelines, tmp_path):
    _, ours = pipelines["sd1"]
    rgba = Image.new("RGBA", (21, 15), (255, 0, 0, 0))
    out = vae_roundtrip(ours.vae, rgba)
    assert out.original.size == (20, 14) and out.reconstruction.size == (20, 14)
    assert np.asarray(out.original)[0, 0].tolist() == [255, 255, 255]  # transparent -> white
    assert len(out.latent_channels) == 4 and out.latent_channels[0].size == (10, 7)
    assert out.psnr > 0 and out.difference.size == (20, 14)
    palette = Image.new("P", (16, 16))
    gray = Image.new("L", (16, 16), 128)
    assert vae_roundtrip(ours.vae, palette).original.mode == "RGB"
    assert vae_roundtrip(ours.vae, gray).original.mode == "RGB"
    rotated = Image.new("RGB", (16, 8), (0, 0, 0))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    rotated.save(tmp_path / "rotated.jpg", exif=exif)
    assert load_image(tmp_path / "rotated.jpg").size == (8, 16)
    sampled = vae_roundtrip(ours.vae, gray, sample=True, seed=3)
    assert not torch.equal(sampled.latents, vae_roundtrip(ours.vae, gray).latents)


def test_bad_input_gives_clear_errors_and_writes_nothing(pipelines, tmp_path):
    _, ours = pipelines["sd1"]
    _, dit = pipelines["dit"]
    with pytest.raises(ValueError, match="height must be a positive multiple of 2"):
        text_to_image(ours, "x", height=99, width=16, steps=1)
    with pytest.raises(ValueError, match="steps must be a whole number from 1 to 1000; got 0"):
        text_to_image(ours, "x", steps=0, height=16, width=16)
    for guidance in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="guidance_scale must be a number from 0 to 100; got (-1|nan)"):
            text_to_image(ours, "x", steps=1, guidance_scale=guidance, height=16, width=16)
    with pytest.raises(ValueError, match="scheduler must be one of .*dpmpp_2m.*; got 'plms'"):
        text_to_image(ours, "x", steps=1, scheduler="plms", height=16, width=16)
    with pytest.raises(ValueError, match="prompt must hold 1 to 64 prompts; got 0"):
        text_to_image(ours, [], steps=1, height=16, width=16)
    with pytest.raises(ValueError, match="Unknown class label 'unicorn'"):
        dit_sample(dit, ["unicorn"], steps=1)
    with pytest.raises(ValueError, match="outside this model's 1000 classes"):
        dit_sample(dit, [1000], steps=1)
    (tmp_path / "not_an_image.png").write_text("hello")
    with pytest.raises(ValueError, match="Cannot read .* as an image"):
        image_to_image(ours, tmp_path / "not_an_image.png", "x", steps=1)
    image = text_to_image(ours, "x", steps=1, height=16, width=16, seed=0).images[0]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_image(image, tmp_path / "missing" / "out.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["not_an_image.png"]


# ------------------------------------------------------------------ prompt modes, clip_skip, batch seeds


def reference_embeddings(reference, family, prompt, negative, clip_skip):
    """diffusers' own prompt encoding at clip_skip, positive and negative each from that layer."""
    if family == "sdxl":
        pos, _, pooled, _ = reference.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False,
                                                     clip_skip=clip_skip)
        neg, _, neg_pooled, _ = reference.encode_prompt(negative, device="cpu", do_classifier_free_guidance=False,
                                                         clip_skip=clip_skip)
        return dict(prompt_embeds=pos, negative_prompt_embeds=neg, pooled_prompt_embeds=pooled,
                    negative_pooled_prompt_embeds=neg_pooled)
    # diffusers 0.42 reaches the final LayerNorm through `text_encoder.text_model`, which transformers 5's
    # CLIPTextModel no longer has: give it back as a plain attribute (as tests/test_prompts.py does).
    object.__setattr__(reference.text_encoder, "text_model", reference.text_encoder)
    pos, _ = reference.encode_prompt(prompt, "cpu", 1, False, clip_skip=clip_skip)
    neg, _ = reference.encode_prompt(negative, "cpu", 1, False, clip_skip=clip_skip)
    return dict(prompt_embeds=pos, negative_prompt_embeds=neg)


# Not SDXL here: its clip_skip=1 takes hidden_states[-3], the embeddings of the tiny 2-layer encoders.
@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_clip_skip_equals_diffusers_clip_skip_with_the_negative_from_the_same_layer(pipelines, family):
    reference, ours = pipelines[family]
    use_scheduler(reference, ours, "euler")
    given = reference_embeddings(reference, family, PROMPTS[0], NEGATIVES[0], clip_skip=1)
    expected = reference(**given, num_inference_steps=4, guidance_scale=5.0, height=16, width=16,
                         generator=torch.Generator().manual_seed(3), output_type="np").images
    result = text_to_image(ours, PROMPTS[0], NEGATIVES[0], steps=4, guidance_scale=5.0, height=16, width=16, seed=3,
                           scheduler="euler", clip_skip=1)
    assert_images_match(result.images, expected)
    assert result.parameters["clip_skip"] == 1 and result.parameters["prompt_syntax"] == "plain"
    unskipped = text_to_image(ours, PROMPTS[0], NEGATIVES[0], steps=4, guidance_scale=5.0, height=16, width=16,
                              seed=3, scheduler="euler")
    assert not np.array_equal(np.asarray(unskipped.images[0]), np.asarray(result.images[0]))


LONG_PROMPT = "a (big:1.4) red circle, " + ", ".join(["on the left"] * 30) + " BREAK [gray] background"


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_a1111_syntax_encodes_negative_and_prompt_together_and_equals_diffusers_given_those_embeddings(
        pipelines, family):
    from sd_core.pipelines.prompt_syntax import encode_weighted_prompt, encode_weighted_prompt_sdxl
    reference, ours = pipelines[family]
    use_scheduler(reference, ours, "dpmpp_2m")
    if family == "sdxl":
        states, pooled = encode_weighted_prompt_sdxl([ours.tokenizer, ours.tokenizer_2],
                                                     [ours.text_encoder, ours.text_encoder_2], ["blurry", LONG_PROMPT])
        given = dict(prompt_embeds=states[1:], negative_prompt_embeds=states[:1], pooled_prompt_embeds=pooled[1:],
                     negative_pooled_prompt_embeds=pooled[:1])
    else:
        states = encode_weighted_prompt(ours.tokenizer, ours.text_encoder, ["blurry", LONG_PROMPT])
        given = dict(prompt_embeds=states[1:], negative_prompt_embeds=states[:1])
    assert states.shape[1] == 3 * 77  # the negative was padded to the prompt's three chunks
    expected = reference(**given, num_inference_steps=4, guidance_scale=5.0, height=16, width=16,
                         generator=torch.Generator().manual_seed(4), output_type="np").images
    result = text_to_image(ours, LONG_PROMPT, "blurry", steps=4, guidance_scale=5.0, height=16, width=16, seed=4,
                           scheduler="dpmpp_2m", prompt_syntax="a1111")
    assert_images_match(result.images, expected)
    assert result.parameters["prompt_syntax"] == "a1111"


def test_a1111_syntax_of_a_short_plain_prompt_is_the_plain_image_and_weights_change_it(pipelines):
    _, ours = pipelines["sd1"]
    run = lambda prompt, syntax: np.asarray(text_to_image(  # noqa: E731
        ours, prompt, "blurry", steps=3, guidance_scale=5.0, height=16, width=16, seed=2, prompt_syntax=syntax).images[0])
    assert np.array_equal(run("a red circle", "a1111"), run("a red circle", "plain"))
    assert not np.array_equal(run("a (red:1.5) circle", "a1111"), run("a red circle", "a1111"))
    with pytest.raises(ValueError, match="prompt_syntax must be one of"):
        run("x", "comfy")


@pytest.mark.parametrize("scheduler", ["euler_ancestral", "dpmpp_2m"])
def test_seed_per_image_makes_image_k_the_single_run_with_seed_plus_k(pipelines, scheduler):
    _, ours = pipelines["sd1"]
    settings = dict(steps=4, guidance_scale=5.0, height=16, width=16, scheduler=scheduler)
    batch = text_to_image(ours, ["a red circle", "a blue square"], images_per_prompt=2, seed=40, seed_per_image=True,
                          **settings)
    singles = [text_to_image(ours, prompt, seed=40 + k, **settings).images[0]
               for k, prompt in enumerate(["a red circle", "a red circle", "a blue square", "a blue square"])]
    for image, single in zip(batch.images, singles, strict=True):
        assert_images_match([image], np.asarray(single)[None] / 255.0)
    assert [json.loads(image.info["sd_core"])["seed"] for image in batch.images] == [40, 41, 42, 43]
    assert batch.parameters["seed"] == 40
    diffusers_rule = text_to_image(ours, ["a red circle", "a blue square"], images_per_prompt=2, seed=40, **settings)
    assert not np.array_equal(np.asarray(diffusers_rule.images[1]), np.asarray(singles[1]))


def test_seed_per_image_in_image_to_image_and_dit(pipelines):
    _, ours = pipelines["sd1"]
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    settings = dict(strength=0.7, steps=5, guidance_scale=4.0, scheduler="euler_ancestral")
    batch = image_to_image(ours, image, "a cat", images_per_prompt=2, seed=8, seed_per_image=True, **settings)
    single = image_to_image(ours, image, "a cat", seed=9, **settings)
    assert_images_match(batch.images[1:], np.asarray(single.images[0])[None] / 255.0)
    _, dit = pipelines["dit"]
    batch = dit_sample(dit, [3, 3], steps=4, scheduler="ddpm", seed=5, seed_per_image=True)
    single = dit_sample(dit, [3], steps=4, scheduler="ddpm", seed=6)
    assert_images_match(batch.images[1:], np.asarray(single.images[0])[None] / 255.0)


def test_dit_refuses_ids_without_a_label_and_lists_the_valid_names(pipelines):
    import dataclasses
    _, dit = pipelines["dit"]
    named = dataclasses.replace(dit, id2label={0: "red circle", 1: "blue square"})
    assert dit_sample(named, ["Blue Square", 0], steps=1, seed=0).parameters["class_labels"] == [1, 0]
    with pytest.raises(ValueError, match=r"Class id 5 has no label.*'0: red circle', '1: blue square'"):
        dit_sample(named, [5], steps=1)
    with pytest.raises(ValueError, match=r"Unknown class label 'unicorn'. This model's classes: \['red circle', "
                                         r"'blue square'\]"):
        dit_sample(named, ["unicorn"], steps=1)


def test_metadata_names_the_model_not_its_path(pipelines, tmp_path):
    from sd_core.checkpoints.catalog import EMBEDDED_TEXT_TO_IMAGE
    from sd_core.pipelines.generate import display_name
    _, ours = pipelines["sd1"]
    assert text_to_image(ours, "x", steps=1, height=16, width=16, seed=0).parameters["model"] == \
        Path(ours.source).name
    assert display_name(EMBEDDED_TEXT_TO_IMAGE) == "embedded: shapes (text to image)"
    snapshot = tmp_path / "hub" / "models--stabilityai--sd-turbo" / "snapshots" / "0123abc"
    assert display_name(snapshot) == "stabilityai/sd-turbo"
    assert display_name("owner/model") == "owner/model"
