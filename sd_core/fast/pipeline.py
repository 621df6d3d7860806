"""The opt-in fast path: the same loaded models, run faster, with the distance from the parity path shown.

    fast = make_fast(pipe, deepcache=3)              # nothing in `pipe` changes; its parity path stays exact
    result = fast.text_to_image("a big red circle on the left on a gray background", steps=20, seed=7)
    fast_dit = make_fast(dit_pipe, dit_cache=2, guidance_until=0.6)
    result = fast_dit.dit_sample(["circle"], steps=20, seed=7)

This file composes the tricks, each in its own module and each a named option (`FastOptions`), measured by
`python -m compare benchmark` and by tests/test_fast.py against the parity image:
- precision (sd_core.fast.precision): with bf16="auto", bfloat16 where the hardware runs it natively (AMX or
  AVX512-BF16 CPUs, CUDA from compute capability 8.0), float16 on older GPUs, float32 elsewhere; copies of the
  diffusion model and the VAE's decoder in that type are made once per model and shared by every fast pipeline
  over it, never a cast of the shared ones. The choice and its reason are in `describe`, hence in the result's
  parameters and every image's metadata.
- channels_last: the UNet's and VAE decoder's activations in NHWC (oneDNN's native conv layout); a converted copy
  has its conv weights in NHWC too, so oneDNN reorders no weights per call.
- compile: `torch.compile` of the UNet (and DeepCache's shallow pass) or the DiT; graphs are reused across requests
  of the same shape; inductor's cache lives in `~/.cache/sd_core/inductor` (sd_core.fast.options).
- deepcache, tome (UNet: sd_core.fast.unet, sd_core.fast.tome); dit_cache (DiT: FORA, sd_core.fast.dit).
- guidance_until, guidance_similarity (UNet and DiT): guidance truncation, sd_core.fast.guidance.
- text_cache (sd_core.fast.text_cache): the text encoders' outputs for recent prompts, exact, on by default.
- SDPA attention: sd_core's attention layers default to SDPA; the fast path leaves the backend as it is (the
  parity tests switch to `math` explicitly).
"""
import dataclasses
import json

import torch
from torch import nn

from sd_core.checkpoints.pipeline_classes import DiTPipeline, StableDiffusionPipeline
from sd_core.fast.dit import FastDiT
from sd_core.fast.options import FastOptions, asked_by, options_asked
from sd_core.fast.precision import Precision, choose_precision
from sd_core.fast.text_cache import with_text_cache
from sd_core.fast.unet import FastUNet
from sd_core.pipelines import generate as pipelines
from sd_core.pipelines.dit_sampling import generate_dit
from sd_core.pipelines.settings import DiTSettings, GenerationSettings
from sd_core.pipelines.metadata import tag
from sd_core.pipelines.offload import execution_device
from sd_core.pipelines.sampling import converted_copy, dtype_of

__all__ = ["FastOptions", "FastPipeline", "describe", "fast_for", "make_fast"]


class FastDecoder(nn.Module):
    """The shared VAE, decoding with channels_last latents, on its bf16 copy `decoding` where one is given;
    encoding (image to image) stays the VAE's own."""

    def __init__(self, vae, options: FastOptions, decoding=None):
        super().__init__()
        self.vae, self.options, self.decoding = vae, options, decoding or vae

    @property
    def config(self):
        return self.vae.config

    @property
    def downscale_factor(self):
        return self.vae.downscale_factor

    def encode(self, x):
        return self.vae.encode(x)

    def decode(self, z):
        dtype = next(self.vae.parameters()).dtype
        z = z.to(next(self.decoding.parameters()).dtype)
        if self.options.channels_last:
            z = z.contiguous(memory_format=torch.channels_last)
        return self.decoding.decode(z).contiguous().to(dtype)  # the image in the VAE's own dtype


@dataclasses.dataclass
class FastPipeline:
    """A loaded pipeline run through the fast path. `pipe` is the pipeline the generate functions see (the
    original's components, with the diffusion model, the VAE and the text encoders wrapped); `original` is
    untouched."""
    original: object
    pipe: object
    options: FastOptions
    precision: Precision

    @property
    def dtype(self) -> torch.dtype:
        return self.precision.dtype

    @property
    def description(self) -> str:
        return describe(self.options, self.precision)

    @property
    def model(self) -> nn.Module:
        return self.pipe.transformer if isinstance(self.pipe, DiTPipeline) else self.pipe.unet

    def reset(self, guided: bool = False):
        """Before a request: the model's step caches emptied, guidance truncation told whether the batch is guided."""
        self.model.reset()
        self.model.guidance.start(guided)

    def tagged(self, result: pipelines.GenerationResult) -> pipelines.GenerationResult:
        """The result, its parameters and each image's metadata saying it came from the fast path, not the parity one."""
        result.parameters["fast"] = self.description
        for image in result.images:
            tag([image], {**json.loads(image.info["sd_core"]), "fast": result.parameters["fast"]})
        return result

    def as_run(self, settings):
        """The record as this fast path runs it: `fast` on and its options in the record's fields, so the images
        record what ran and PNG Info gives this fast path back. A record asking for other options is refused."""
        mine, asked = options_asked(self.options, type(settings)), asked_by(settings)
        if settings.fast and asked != mine:
            raise ValueError(f"These settings ask for the fast path with {asked or 'no options'}; this one was made "
                             f"with {mine or 'none'}: use make_fast(pipe, **asked_by(settings)).")
        return settings.replace(fast=True, **mine)

    def generate(self, settings: GenerationSettings, **inputs) -> pipelines.GenerationResult:
        """pipelines.generate() through the fast path; the images' metadata says "fast" and how."""
        if isinstance(self.pipe, DiTPipeline):
            raise TypeError("This is a DiT pipeline: sample classes with dit_sample(class_labels, ...).")
        settings = self.as_run(settings)
        self.reset(settings.guidance_scale > 1)
        return self.tagged(pipelines.generate(self.pipe, settings, **inputs))

    def text_to_image(self, prompt, negative_prompt=None, **options) -> pipelines.GenerationResult:
        if "image" in options:
            raise TypeError("text_to_image takes no image; use image_to_image.")
        settings, inputs = pipelines.settings_and_inputs(prompt, negative_prompt, options)
        return self.generate(settings, **inputs)

    def image_to_image(self, image, prompt, negative_prompt=None, strength: float = 0.8, **options):
        settings, inputs = pipelines.settings_and_inputs(prompt, negative_prompt, dict(options, strength=strength))
        return self.generate(settings, image=image, **inputs)

    def generate_dit(self, settings: DiTSettings, callback=None) -> pipelines.GenerationResult:
        """dit_sampling.generate_dit() through the fast path."""
        if not isinstance(self.pipe, DiTPipeline):
            raise TypeError("dit_sample needs a DiT pipeline; a Stable Diffusion one generates from prompts.")
        settings = self.as_run(settings)
        self.reset(settings.guidance_scale > 1)
        return self.tagged(generate_dit(self.pipe, settings, callback))

    def dit_sample(self, class_labels, callback=None, **options) -> pipelines.GenerationResult:
        labels = tuple(class_labels) if isinstance(class_labels, (list, tuple)) else (class_labels,)
        return self.generate_dit(DiTSettings(class_labels=labels, **options), callback)


def describe(options: FastOptions, precision: Precision) -> str:
    """The fast path's settings as one line, e.g. "channels_last,deepcache=2,bfloat16 (cpu avx512_bf16)"."""
    parts = [name for name in ("channels_last", "compile", "freeze") if getattr(options, name)]
    for name in ("deepcache", "dit_cache"):
        if getattr(options, name) > 1:
            parts.append(f"{name}={getattr(options, name)}")
    for name in ("tome", "guidance_until", "guidance_similarity", "tgate"):
        if getattr(options, name) is not None:
            parts.append(f"{name}={getattr(options, name):g}")
    parts.append(f"{precision.name} ({precision.reason})")
    return ",".join(parts)


def low_precision_copies(model: nn.Module, vae, precision: Precision, channels_last: bool):
    """(the diffusion model, the VAE to decode with or None for the VAE itself) in the chosen type: copies, made
    once per model. A float16 choice leaves a VAE whose config says force_upcast (SDXL's) decoding in float32, and
    a VAE already in half precision keeps sampling.decode's own rule."""
    if precision.dtype == dtype_of(model):
        return model, None
    model = converted_copy(model, precision.dtype, channels_last)
    upcast = precision.dtype == torch.float16 and vae.config.force_upcast
    if dtype_of(vae) != torch.float32 or upcast:
        return model, None
    return model, converted_copy(vae, precision.dtype, channels_last)


def fast_for(pipe, settings, **how) -> FastPipeline:
    """The FastPipeline over `pipe` for the options a settings record asks for (and `how`: compile, freeze, ...),
    made once and kept on the pipeline, so it goes when the pipeline does and every one shares the same
    low-precision copies. DeepCache, FORA, guidance truncation and T-GATE keep state between steps: one request at a
    time on it."""
    options = {**asked_by(settings), **how}
    made = pipe.__dict__.setdefault("fast_pipelines", {})
    key = tuple(sorted(options.items()))
    if key not in made:
        made[key] = make_fast(pipe, **options)
    return made[key]


def make_fast(pipe, options: FastOptions | None = None, **overrides) -> FastPipeline:
    """The fast path over a loaded Stable Diffusion (1.x, 2.x, XL) or DiT pipeline, sharing its models (copies of
    the diffusion model and the VAE only in another precision). `make_fast(pipe, deepcache=3)`; see FastOptions."""
    options = dataclasses.replace(options or FastOptions(), **overrides)
    if not isinstance(pipe, (StableDiffusionPipeline, DiTPipeline)):
        raise TypeError(f"make_fast takes a loaded Stable Diffusion or DiT pipeline (load_pipeline); "
                        f"got {type(pipe).__name__}.")
    dit = isinstance(pipe, DiTPipeline)
    if dit and options.tgate is not None:
        raise ValueError("tgate freezes cross-attention and a DiT has none (its class label conditions it through "
                         "adaLN): cache its blocks with dit_cache instead.")
    model = pipe.transformer if dit else pipe.unet
    precision = choose_precision(options.bf16, dtype_of(model), execution_device(model))
    model, decoding = low_precision_copies(model, pipe.vae, precision, options.channels_last)
    vae = FastDecoder(pipe.vae, options, decoding)
    if dit:
        return FastPipeline(pipe, dataclasses.replace(pipe, transformer=FastDiT(model, options), vae=vae), options,
                            precision)
    if options.text_cache < 0:
        raise ValueError(f"text_cache is a number of prompts to keep, 0 for none; got {options.text_cache!r}.")
    encoders = {slot: with_text_cache(getattr(pipe, slot), options.text_cache) for slot in ("text_encoder", "text_encoder_2")
                if options.text_cache and getattr(pipe, slot) is not None}
    fast = dataclasses.replace(pipe, unet=FastUNet(model, options), vae=vae, **encoders)
    return FastPipeline(pipe, fast, options, precision)
