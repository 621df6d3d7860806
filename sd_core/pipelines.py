"""Pipelines: the components of a Stable Diffusion or DiT model, and the functions that generate with them.

Each function follows diffusers' pipeline step for step (same noise order, same CFG batch order, same
casts), so the same seed gives the same 8-bit image in both stacks:

    pipe = load_pipeline("sd_core/weights/shapes")
    result = text_to_image(pipe, "a small red circle on the left", steps=20, seed=7)
    save_image(result.images[0], "out.png")      # PNG text metadata reproduces it
"""
import dataclasses
import json
import math
import os
import random
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin

from .clip import CLIPTextModel, CLIPTextModelWithProjection
from .dit import DiTTransformer2DModel
from .layers import randn_tensor
from .schedulers import DIFFUSERS_CLASS_NAMES, SCHEDULERS, make_scheduler
from .tokenizer import CLIPTokenizer
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL

DEFAULT_SCHEDULER = "dpmpp_2m"  # for configs written for a sampler sd_core does not implement (e.g. PNDM)
MAX_SEED = 2 ** 32 - 1
# callback(step, timestep, latents, predicted x0): called after every denoising step.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


@dataclasses.dataclass
class StableDiffusionPipeline:
    """SD 1.x / 2.x (one CLIP encoder), SDXL (CLIP-L + OpenCLIP bigG), SDXL refiner (bigG only)."""
    family: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    scheduler_config: dict
    text_encoder: CLIPTextModel | None = None
    tokenizer: CLIPTokenizer | None = None
    text_encoder_2: CLIPTextModelWithProjection | None = None
    tokenizer_2: CLIPTokenizer | None = None
    source: str = ""

    @property
    def models(self) -> dict:
        names = ("unet", "vae", "text_encoder", "text_encoder_2")
        return {name: getattr(self, name) for name in names if getattr(self, name) is not None}

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def default_size(self) -> int:
        return (self.unet.config.sample_size or 64) * self.vae_scale_factor


@dataclasses.dataclass
class DiTPipeline:
    """Class-conditional DiT on the SD VAE's latents; `id2label` names the classes."""
    transformer: DiTTransformer2DModel
    vae: AutoencoderKL
    scheduler_config: dict
    id2label: dict = dataclasses.field(default_factory=dict)
    source: str = ""
    family: str = "dit"

    @property
    def models(self) -> dict:
        return {"transformer": self.transformer, "vae": self.vae}

    def label_ids(self, labels) -> list[int]:
        """Class ids from ids or names (case-insensitive; an id2label entry may list several names)."""
        names = {name.strip().lower(): i for i, label in self.id2label.items() for name in label.split(",")}
        ids = []
        for label in labels:
            if isinstance(label, str) and label.strip().lower() in names:
                ids.append(names[label.strip().lower()])
            elif isinstance(label, int) or (isinstance(label, str) and label.strip().isdigit()):
                ids.append(int(label))
            else:
                close = [n for n in names if str(label).lower() in n][:5]
                raise ValueError(f"Unknown class label {label!r}." + (f" Did you mean {close}?" if close else ""))
        num_classes = self.transformer.config.num_embeds_ada_norm
        for i in ids:
            if not 0 <= i < num_classes:
                raise ValueError(f"Class id {i} is outside this model's {num_classes} classes [0, {num_classes - 1}].")
        return ids


@dataclasses.dataclass
class GenerationResult:
    images: list  # PIL images, each carrying its parameters in .info["sd_core"]
    latents: torch.Tensor
    parameters: dict


# ---------------------------------------------------------------------------------------------- helpers


def resolve_seed(seed: int | None) -> int:
    if seed is None or seed < 0:
        return random.randint(0, MAX_SEED)
    if not isinstance(seed, int) or seed > MAX_SEED:
        raise ValueError(f"seed must be an integer in [0, {MAX_SEED}]; got {seed!r}.")
    return seed


def scheduler_name(config: dict, name: str | None) -> str:
    """The sampler asked for, or the one the model's config names (falling back to DPM-Solver++ 2M)."""
    return name or DIFFUSERS_CLASS_NAMES.get(config.get("_class_name"), DEFAULT_SCHEDULER)


def scheduler_for(pipe, name: str | None):
    name = scheduler_name(pipe.scheduler_config, name)
    return make_scheduler(name, pipe.scheduler_config), name


def check_common(steps, guidance_scale, batch):
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}.")
    if not isinstance(guidance_scale, (int, float)) or math.isnan(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a number >= 0; got {guidance_scale!r}.")
    if batch < 1:
        raise ValueError("Nothing to generate: give at least one prompt (or class) and images_per_prompt >= 1.")


def dtype_of(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def to_pil(images: torch.Tensor, denormalize: Callable) -> list:
    """(B, 3, H, W) in [-1, 1] -> 8-bit PIL images, rounding as diffusers does."""
    array = denormalize(images).cpu().permute(0, 2, 3, 1).float().numpy()
    return [Image.fromarray(image) for image in (array * 255).round().astype("uint8")]


def tag(images: list, parameters: dict) -> list:
    for image in images:
        image.info["sd_core"] = json.dumps(parameters)
    return images


def save_image(image: Image.Image, path) -> Path:
    """Write a PNG with its generation parameters as text metadata; atomic, never half-written."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"The folder {path.parent} does not exist; create it or choose another output path.")
    info = PngImagePlugin.PngInfo()
    for key in ("sd_core",):
        if key in image.info:
            info.add_text(key, image.info[key])
    temporary = path.with_name(f".{path.name}.partial")
    image.save(temporary, format="PNG", pnginfo=info)
    os.replace(temporary, path)
    return path


def load_image(image) -> Image.Image:
    """An RGB PIL image from a path or PIL image: EXIF orientation applied, alpha composited on white,
    palette and grayscale converted."""
    if not isinstance(image, Image.Image):
        try:
            image = Image.open(image)
            image.load()
        except (OSError, ValueError) as error:
            raise ValueError(f"Cannot read {image!r} as an image ({error}). Use a PNG, JPEG or WebP file.") from None
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def crop_to_multiple(image: Image.Image, multiple: int) -> Image.Image:
    """Centre-crop to the largest size that is a multiple of `multiple` (no resampling: pixels stay 1:1)."""
    width, height = (image.width // multiple) * multiple, (image.height // multiple) * multiple
    if width == 0 or height == 0:
        raise ValueError(f"The image ({image.width}x{image.height}) is smaller than {multiple} pixels.")
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def image_to_tensor(image: Image.Image, dtype, device) -> torch.Tensor:
    array = np.array(image).astype(np.float32) / 255.0
    return (2.0 * torch.from_numpy(array).permute(2, 0, 1)[None] - 1.0).to(device=device, dtype=dtype)


def check_size(pipe, height: int, width: int):
    factor = pipe.vae_scale_factor
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value < factor or value % factor:
            raise ValueError(f"{name} must be a positive multiple of {factor}; got {value!r}.")
        if value > 4096:
            raise ValueError(f"{name}={value} is too large (at most 4096).")


# ------------------------------------------------------------------------------------------------ text


def encode_text(tokenizer: CLIPTokenizer, prompts: list[str], device) -> torch.Tensor:
    """Padded ids of each prompt, warning (with the dropped text) when one is truncated."""
    tokens = [tokenizer.tokenize(prompt) for prompt in prompts]
    room = tokenizer.model_max_length - 2
    for prompt_tokens in tokens:
        if len(prompt_tokens) > room:
            warnings.warn(f"The prompt is longer than CLIP's {tokenizer.model_max_length} tokens and was truncated; "
                          f"this part was ignored: {tokenizer.decode(prompt_tokens[room:])!r}", stacklevel=3)
    return tokenizer.pad(tokens).to(device)


def encode_prompt(pipe: StableDiffusionPipeline, prompts: list[str], negatives: list[str] | None, guided: bool):
    """Text conditioning as each family's reference pipeline builds it: (embeddings, pooled), CFG as [uncond, cond]."""
    device = pipe.unet.conv_in.weight.device
    if pipe.family in ("sd1", "sd2"):  # last hidden state (SD2's config already stops at the penultimate layer)
        def embed(texts):
            return pipe.text_encoder(encode_text(pipe.tokenizer, texts, device)).last_hidden_state, None
    else:  # SDXL: penultimate hidden states of each encoder, concatenated; pooled projection of the last one
        def embed(texts):
            states, pooled = [], None
            for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
                if encoder is None:
                    continue
                out = encoder(encode_text(tokenizer, texts, device), output_hidden_states=True)
                states.append(out.hidden_states[-2])
                if isinstance(encoder, CLIPTextModelWithProjection):
                    pooled = out.pooled_output
            return torch.cat(states, dim=-1), pooled

    embeddings, pooled = embed(prompts)
    if not guided:
        return embeddings, pooled
    if negatives is None and pipe.family == "sdxl":  # force_zeros_for_empty_prompt
        negative, negative_pooled = torch.zeros_like(embeddings), torch.zeros_like(pooled)
    else:
        negative, negative_pooled = embed(negatives or [""] * len(prompts))
    embeddings = torch.cat([negative, embeddings])
    pooled = torch.cat([negative_pooled, pooled]) if pooled is not None else None
    return embeddings, pooled


def as_list(prompt, what: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{what} must be a string or a list of strings.")
    return prompts


def rescale_guidance(guided: torch.Tensor, text: torch.Tensor, factor: float) -> torch.Tensor:
    """Lin et al. (2023): match the guided prediction's std to the text prediction's, blended by `factor`."""
    dims = list(range(1, text.ndim))
    rescaled = guided * (text.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return factor * rescaled + (1 - factor) * guided


@torch.no_grad()
def generate(pipe: StableDiffusionPipeline, prompt, negative_prompt=None, *, image=None, strength: float = 0.8,
             height: int | None = None, width: int | None = None, steps: int = 30, guidance_scale: float = 7.5,
             guidance_rescale: float = 0.0, scheduler: str | None = None, seed: int | None = None,
             images_per_prompt: int = 1, latents: torch.Tensor | None = None, eta: float = 0.0,
             original_size=None, crops_coords_top_left=(0, 0), target_size=None,
             callback: StepCallback | None = None) -> GenerationResult:
    """Text to image, or image to image when `image` is given (then `strength` in [0, 1] says how much to change)."""
    prompts = as_list(prompt, "prompt")
    negatives = None if negative_prompt is None else as_list(negative_prompt, "negative_prompt")
    if negatives is not None and len(negatives) == 1 and len(prompts) > 1:
        negatives = negatives * len(prompts)
    if negatives is not None and len(negatives) != len(prompts):
        raise ValueError(f"Got {len(negatives)} negative prompts for {len(prompts)} prompts.")
    batch = len(prompts) * images_per_prompt
    check_common(steps, guidance_scale, batch)
    if image is not None:
        image = crop_to_multiple(load_image(image), pipe.vae_scale_factor)
        height, width = image.height, image.width
    height, width = height or pipe.default_size, width or pipe.default_size
    check_size(pipe, height, width)
    seed = resolve_seed(seed)
    generator = torch.Generator("cpu").manual_seed(seed)
    sampler, scheduler_name = scheduler_for(pipe, scheduler)
    state = sampler.set_timesteps(steps, strength if image is not None else 1.0)
    guided = guidance_scale > 1
    device, dtype = pipe.unet.conv_in.weight.device, pipe.unet.conv_in.weight.dtype

    embeddings, pooled = encode_prompt(pipe, prompts, negatives, guided)
    embeddings = embeddings.repeat_interleave(images_per_prompt, dim=0).to(dtype)
    added = None
    if pipe.unet.config.addition_embed_type == "text_time":
        time_ids = torch.tensor([list((original_size or (height, width)) + tuple(crops_coords_top_left)
                                     + (target_size or (height, width)))], dtype=embeddings.dtype, device=device)
        added = {"text_embeds": pooled.repeat_interleave(images_per_prompt, dim=0).to(dtype),
                 "time_ids": time_ids.repeat(embeddings.shape[0], 1)}

    shape = (batch, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    if image is not None:  # encode (sampling the posterior) then noise to the first step, as diffusers does
        encoded = pipe.vae.encode(image_to_tensor(image, dtype_of(pipe.vae), device)).sample(generator)
        x0 = (pipe.vae.config.scaling_factor * encoded).to(dtype).repeat(batch, 1, 1, 1)
        x = sampler.add_noise_at_start(state, x0, randn_tensor(shape, generator, dtype, device))
    elif latents is not None:
        if tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}; got {tuple(latents.shape)}.")
        x = latents.to(device=device, dtype=dtype) * state.init_noise_sigma
    else:
        x = randn_tensor(shape, generator, dtype, device) * state.init_noise_sigma

    step_kwargs = {"eta": eta} if scheduler_name == "ddim" else {}
    for i, t in enumerate(state.timesteps):
        model_input = torch.cat([x] * 2) if guided else x
        noise_pred = pipe.unet(sampler.scale_model_input(state, model_input), t, embeddings, added)
        if guided:
            uncond, text = noise_pred.chunk(2)
            noise_pred = uncond + guidance_scale * (text - uncond)
            if guidance_rescale > 0:
                noise_pred = rescale_guidance(noise_pred, text, guidance_rescale)
        x, x0_estimate = sampler.step(state, noise_pred, x, generator, **step_kwargs)
        if callback is not None:
            callback(i, t, x, x0_estimate)

    decoded = pipe.vae.decode(x / pipe.vae.config.scaling_factor)
    parameters = {"prompt": prompts, "negative_prompt": negatives, "seed": seed, "steps": steps,
                  "scheduler": scheduler_name, "guidance_scale": guidance_scale, "guidance_rescale": guidance_rescale,
                  "height": height, "width": width, "images_per_prompt": images_per_prompt,
                  "strength": strength if image is not None else None, "model": pipe.source, "family": pipe.family}
    images = to_pil(decoded, lambda d: (d * 0.5 + 0.5).clamp(0, 1))
    return GenerationResult(tag(images, parameters), x, parameters)


def text_to_image(pipe: StableDiffusionPipeline, prompt, negative_prompt=None, **kwargs) -> GenerationResult:
    if "image" in kwargs:
        raise TypeError("text_to_image takes no image; use image_to_image.")
    return generate(pipe, prompt, negative_prompt, **kwargs)


def image_to_image(pipe: StableDiffusionPipeline, image, prompt, negative_prompt=None, strength: float = 0.8,
                   **kwargs) -> GenerationResult:
    return generate(pipe, prompt, negative_prompt, image=image, strength=strength, **kwargs)


def preview(pipe, x0: torch.Tensor, size: int = 128) -> Image.Image:
    """A small picture of a predicted x0 (latents), decoded by the VAE, for progress and trajectory views."""
    vae = pipe.vae
    with torch.no_grad():
        decoded = vae.decode((x0[:1] / vae.config.scaling_factor).to(dtype_of(vae)))
    image = to_pil(decoded, lambda d: (d * 0.5 + 0.5).clamp(0, 1))[0]
    image.thumbnail((size, size))
    return image


# ----------------------------------------------------------------------------------------------- VAE


@dataclasses.dataclass
class RoundTrip:
    original: Image.Image  # the input after conversion and cropping
    reconstruction: Image.Image
    difference: Image.Image  # |original - reconstruction|, amplified
    psnr: float  # dB, on the 8-bit images
    latents: torch.Tensor  # the (scaled) latents that were decoded
    latent_channels: list  # one grayscale image per latent channel
    mean: torch.Tensor
    std: torch.Tensor


def psnr(a: Image.Image, b: Image.Image) -> float:
    error = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float("inf") if error == 0 else 10 * math.log10(255.0 ** 2 / error)


@torch.no_grad()
def vae_roundtrip(vae: AutoencoderKL, image, sample: bool = False, seed: int | None = None,
                  difference_gain: float = 4.0) -> RoundTrip:
    """image -> posterior (mean/std) -> mode or a sample -> decoded image. Any input size: centre-cropped
    to a multiple of the VAE's downscale factor; RGBA/grayscale/palette converted, EXIF orientation applied."""
    image = crop_to_multiple(load_image(image), vae.downscale_factor)
    device = vae.encoder.conv_in.weight.device
    posterior = vae.encode(image_to_tensor(image, dtype_of(vae), device))
    z = posterior.sample(torch.Generator("cpu").manual_seed(resolve_seed(seed))) if sample else posterior.mode()
    reconstruction = to_pil(vae.decode(z), lambda d: (d * 0.5 + 0.5).clamp(0, 1))[0]
    difference = np.abs(np.asarray(image, dtype=np.int16) - np.asarray(reconstruction, dtype=np.int16))
    difference = Image.fromarray(np.clip(difference * difference_gain, 0, 255).astype(np.uint8))
    channels = []
    for channel in z[0].float().cpu():
        low, high = channel.min(), channel.max()
        scaled = ((channel - low) / (high - low).clamp_min(1e-8) * 255).round().byte().numpy()
        channels.append(Image.fromarray(scaled, mode="L"))
    return RoundTrip(image, reconstruction, difference, psnr(image, reconstruction), z * vae.config.scaling_factor,
                     channels, posterior.mean, posterior.std)


# ----------------------------------------------------------------------------------------------- DiT

GUIDED_CHANNELS = ("all", "first3")


@torch.no_grad()
def dit_sample(pipe: DiTPipeline, class_labels, *, guidance_scale: float = 4.0, steps: int = 25,
               scheduler: str | None = None, seed: int | None = None, guided_channels: str = "all",
               callback: StepCallback | None = None) -> GenerationResult:
    """Class-conditional sampling. Guidance is on all latent channels (diffusers) or, with
    guided_channels="first3", on the first three only, as the original DiT code does. With the `ddpm`
    sampler and a learned-sigma model, the predicted variance is used (learned_range)."""
    if guided_channels not in GUIDED_CHANNELS:
        raise ValueError(f"guided_channels must be one of {GUIDED_CHANNELS}; got {guided_channels!r}.")
    labels = pipe.label_ids(class_labels if isinstance(class_labels, (list, tuple)) else [class_labels])
    check_common(steps, guidance_scale, len(labels))
    c = pipe.transformer.config
    seed = resolve_seed(seed)
    generator = torch.Generator("cpu").manual_seed(seed)
    learned_sigma = c.out_channels == 2 * c.in_channels
    config = dict(pipe.scheduler_config)
    name = scheduler_name(config, scheduler)
    if name == "ddpm" and learned_sigma:
        config["variance_type"] = "learned_range"
    sampler = make_scheduler(name, config)
    state = sampler.set_timesteps(steps)
    device, dtype = pipe.transformer.proj_out_2.weight.device, pipe.transformer.proj_out_2.weight.dtype
    guided = guidance_scale > 1
    x = randn_tensor((len(labels), c.in_channels, c.sample_size, c.sample_size), generator, dtype, device)
    x = x * state.init_noise_sigma
    class_ids = torch.tensor(labels, device=device)
    if guided:  # DiT orders the guidance batch [cond, uncond]; the null class is id num_embeds_ada_norm
        class_ids = torch.cat([class_ids, torch.full_like(class_ids, c.null_class)])
    for i, t in enumerate(state.timesteps):
        model_input = sampler.scale_model_input(state, torch.cat([x, x]) if guided else x)
        timesteps = torch.as_tensor(t, device=device).reshape(1).expand(model_input.shape[0])
        out = pipe.transformer(model_input, timesteps, class_ids)
        if guided:
            split = c.in_channels if guided_channels == "all" else 3
            eps, rest = out[:, :split], out[:, split:]
            cond, uncond = eps.chunk(2)
            out = torch.cat([uncond + guidance_scale * (cond - uncond), rest[: len(labels)]], dim=1)
        if learned_sigma and name != "ddpm":
            out = out[:, :c.in_channels]
        x, x0_estimate = sampler.step(state, out, x, generator)
        if callback is not None:
            callback(i, t, x, x0_estimate)
    decoded = pipe.vae.decode(1 / pipe.vae.config.scaling_factor * x)
    names = [pipe.id2label.get(i, str(i)) for i in labels]
    parameters = {"class_labels": labels, "class_names": names, "seed": seed, "steps": steps, "scheduler": name,
                  "guidance_scale": guidance_scale, "guided_channels": guided_channels, "model": pipe.source}
    images = to_pil(decoded, lambda d: (d / 2 + 0.5).clamp(0, 1))
    return GenerationResult(tag(images, parameters), x, parameters)


SCHEDULER_NAMES = sorted([*SCHEDULERS, "dpmpp_2m_karras"])
