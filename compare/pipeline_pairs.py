"""The benchmark's whole-pipeline pairs: sd_core's text_to_image (parity and fast path) beside diffusers' pipeline on
the same weights, for the embedded models and a real-size SD 1.5 with random weights; each fast row with its opt-ins
named and its PSNR from sd_core's parity image. compare.benchmark measures them."""
import functools

import torch

from sd_core.checkpoints.catalog import EMBEDDED_DIT, EMBEDDED_TEXT_TO_IMAGE
from sd_core.fast.precision import choose_precision
from sd_core.models import presets
from sd_core.models.clip import CLIPTextModel
from sd_core.models.unet import UNet2DConditionModel
from sd_core.models.vae import AutoencoderKL

from .measure import Pair, device
from .twins import twin


EMBEDDED_PROMPT = "a small red circle on the left on a gray background"


def trick_names(fast_options: dict, dtype: torch.dtype) -> str:
    names = [{torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")]
    names += [name for name in ("compile", "freeze", "channels_last") if fast_options.get(name, name == "channels_last")]
    names += [f"DeepCache N={fast_options['deepcache']}"] if fast_options.get("deepcache", 0) > 1 else []
    names += [f"FORA N={fast_options['dit_cache']}"] if fast_options.get("dit_cache", 0) > 1 else []
    names += [f"guidance until {fast_options['guidance_until']:g}"] if "guidance_until" in fast_options else []
    names += [f"guidance until cos >= {fast_options['guidance_similarity']:g}"] \
        if "guidance_similarity" in fast_options else []
    names += [f"T-GATE after {fast_options['tgate']:g}"] if "tgate" in fast_options else []
    names += ["no text cache"] if fast_options.get("text_cache") == 0 else []
    return " + ".join(names)


def pipeline_pairs(ours, diffusers_pipeline, prompt: str, options: dict, fast: str, variants: list[dict]) -> dict:
    """sd_core's text_to_image vs diffusers' pipeline on the same weights; then, per fast-path variant, sd_core's
    fast path beside diffusers' pipeline with the same tricks: the same dtype, channels_last UNet and VAE, and
    torch.compile where the variant compiles (DeepCache alone has no diffusers counterpart).
    `diffusers_pipeline(dtype)` gives the pipeline in that dtype (a fresh one, or the one converted in place)."""
    import numpy as np

    from sd_core.fast.pipeline import make_fast
    from sd_core.pipelines.image_io import psnr
    from sd_core.pipelines.generate import text_to_image
    size = options.get("height") or ours.default_size
    name = f"pipeline ({options['steps']} steps, CFG, {size} px)"
    run_ours = lambda: text_to_image(ours, prompt, **options)

    def run_theirs(pipe):
        return lambda: pipe(prompt, num_inference_steps=options["steps"], guidance_scale=options["guidance_scale"],
                            height=size, width=size, generator=torch.Generator().manual_seed(options["seed"])).images

    pairs = {name: lambda: Pair(run_ours, run_theirs(diffusers_pipeline(torch.float32)))}
    if fast == "none":
        return pairs

    def fast_pair(fast_options: dict):
        fast_pipe = make_fast(ours, **fast_options)
        theirs = diffusers_pipeline(fast_pipe.dtype)  # diffusers' way: the whole pipeline in that dtype
        theirs.unet.to(memory_format=torch.channels_last)
        theirs.vae.to(memory_format=torch.channels_last)
        if fast_options.get("compile"):  # the same compile for diffusers, inductor's freezing included
            theirs.unet = torch.compile(theirs.unet, options={"freezing": True} if fast_options.get("freeze") else None)
        fast_run = lambda: fast_pipe.text_to_image(prompt, **options)
        eager = make_fast(ours, **{**fast_options, "compile": False})
        return Pair(fast_run, run_theirs(theirs), flops=(lambda: eager.text_to_image(prompt, **options), run_theirs(theirs)),
                    psnr=lambda: psnr(np.asarray(fast_run().images[0]), np.asarray(parity_image())),
                    dtype=fast_pipe.dtype, baseline=name)

    @functools.cache
    def parity_image():
        return run_ours().images[0]
    compiled = [{"bf16": False, "compile": True}, {"bf16": False, "compile": True, "freeze": True}]
    for fast_options in variants + (compiled if fast == "all" else []):
        dtype = choose_precision(fast_options["bf16"], torch.float32, device()).dtype
        pairs[f"fast: pipeline, {trick_names(fast_options, dtype)}"] = functools.partial(fast_pair, fast_options)
    return pairs


def embedded_pipeline_pairs(fast: str, steps: int = 20) -> dict:
    """The shipped text-to-image model end to end (a fresh diffusers pipeline for every row)."""
    import diffusers

    from sd_core.checkpoints.loading import load_pipeline

    def diffusers_pipeline(dtype):
        pipe = diffusers.StableDiffusionPipeline.from_pretrained(EMBEDDED_TEXT_TO_IMAGE, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        return pipe.to(device(), dtype)

    variants = [{"bf16": False, "text_cache": 0}, {"bf16": False}, {"bf16": False, "deepcache": 2},
                {"bf16": False, "deepcache": 3}, {"bf16": False, "guidance_until": 0.8},
                {"bf16": False, "guidance_similarity": 0.999}, {"bf16": False, "tgate": 0.5}, {"bf16": True}]
    return pipeline_pairs(load_pipeline(EMBEDDED_TEXT_TO_IMAGE, device=device()), diffusers_pipeline,
                          EMBEDDED_PROMPT, {"steps": steps, "seed": 0, "guidance_scale": 5.0}, fast, variants)


def embedded_dit_pairs(fast: str, steps: int = 20) -> dict:
    """The shipped DiT end to end: sd_core's dit_sample beside diffusers' DiTPipeline on the same folder (two classes,
    guided), then the fast path's rows beside diffusers in the same dtype; PSNR: the worse image's."""
    import diffusers
    import numpy as np

    from sd_core.checkpoints.loading import load_pipeline
    from sd_core.fast.pipeline import make_fast
    from sd_core.pipelines.generate import dit_sample
    from sd_core.pipelines.image_io import psnr
    ours = load_pipeline(EMBEDDED_DIT, device=device())
    labels, options = [0, 7], {"steps": steps, "seed": 0, "guidance_scale": 3.0}

    def run_theirs(dtype):
        pipe = diffusers.DiTPipeline.from_pretrained(EMBEDDED_DIT, local_files_only=True).to(device(), dtype)
        pipe.set_progress_bar_config(disable=True)
        return lambda: pipe(labels, guidance_scale=options["guidance_scale"], num_inference_steps=steps,
                            generator=torch.Generator().manual_seed(options["seed"])).images
    run_ours = lambda: dit_sample(ours, labels, **options)
    parity = functools.cache(lambda: run_ours().images)
    name = f"DiT pipeline ({steps} steps, CFG, 2 images)"
    pairs = {name: lambda: Pair(run_ours, run_theirs(torch.float32))}

    def fast_pair(fast_options: dict):
        fast_pipe = make_fast(ours, **fast_options)
        run = lambda: fast_pipe.dit_sample(labels, **options)
        worst = lambda: min(psnr(np.asarray(a), np.asarray(b)) for a, b in zip(run().images, parity()))
        return Pair(run, run_theirs(fast_pipe.dtype), psnr=worst, dtype=fast_pipe.dtype, baseline=name)
    variants = [{"bf16": False, "dit_cache": 2}, {"bf16": False, "dit_cache": 3}, {"bf16": False, "guidance_until": 0.7},
                {"bf16": "auto"}]
    for fast_options in variants if fast != "none" else []:
        dtype = choose_precision(fast_options["bf16"], torch.float32, device()).dtype
        pairs[f"fast: DiT, {trick_names(fast_options, dtype)}"] = functools.partial(fast_pair, fast_options)
    return pairs


def sd15_diffusers_pipeline():
    """A real-size SD 1.5 diffusers pipeline with random weights (diffusers' init) and the CLIP tokenizer, on the
    device, DPM++ 2M."""
    import diffusers
    import transformers
    unet = diffusers.UNet2DConditionModel.from_config(presets.UNET_SD15).eval()
    vae = diffusers.AutoencoderKL.from_config(presets.VAE_SD).eval()
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(**presets.CLIP_VIT_L)).eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(EMBEDDED_TEXT_TO_IMAGE / "tokenizer")
    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(presets.SCHEDULER_SD)
    theirs = diffusers.StableDiffusionPipeline(vae, text_encoder, tokenizer, unet, scheduler, safety_checker=None,
                                               feature_extractor=None, requires_safety_checker=False).to(device())
    theirs.set_progress_bar_config(disable=True)
    return theirs


def sd_core_twin(theirs):
    """sd_core's pipeline sharing a diffusers SD 1.x pipeline's tensors (no copy)."""
    from sd_core.checkpoints.pipeline_classes import StableDiffusionPipeline
    from sd_core.tokenizer import CLIPTokenizer
    return StableDiffusionPipeline("sd1", twin(UNet2DConditionModel, theirs.unet), twin(AutoencoderKL, theirs.vae),
                                   dict(theirs.scheduler.config),
                                   twin(CLIPTextModel, theirs.text_encoder, theirs.text_encoder.config.to_dict()),
                                   CLIPTokenizer(EMBEDDED_TEXT_TO_IMAGE / "tokenizer"))


def sd15_pipeline_pairs(fast: str, latent: int, steps: int = 4) -> dict:
    """A real-size SD 1.5 pipeline end to end (random weights, shared by both stacks) at `latent` * 8 px with
    DPM++ 2M. One diffusers pipeline: the fast rows convert it in place, so they come last."""
    theirs = sd15_diffusers_pipeline()
    ours = sd_core_twin(theirs)
    options = {"steps": steps, "seed": 0, "guidance_scale": 7.5, "height": latent * 8, "width": latent * 8,
               "scheduler": "dpmpp_2m"}
    variants = [{"bf16": "auto"}, {"bf16": "auto", "deepcache": 2}, {"bf16": "auto", "tgate": 0.5},
                {"bf16": "auto", "deepcache": 2, "tgate": 0.5}]  # the hardware's precision, as make_fast chooses
    return pipeline_pairs(ours, lambda dtype: theirs.to(device(), dtype), "a photograph of an astronaut riding a horse",
                          options, fast, variants)
