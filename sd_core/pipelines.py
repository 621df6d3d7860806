"""Pipelines: the functions that generate with a model's components.

Each follows diffusers' pipeline step for step (same noise order, same CFG batch order, same casts), so
the same seed gives the same 8-bit image in both stacks. Every pipeline prepares its inputs and a
`predict(model_input, t)` closure, then runs the one shared loop, `denoise`:

    pipe = load_pipeline("sd_core/weights/shapes-sd")
    result = text_to_image(pipe, "a big red circle on the left on a gray background", steps=20, seed=7)
    save_image(result.images[0], "out.png")      # PNG text metadata reproduces it
"""
import copy
import dataclasses
import math
import random
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image

from . import catalog
from .components import DiTPipeline, StableDiffusionPipeline
from .embeddings import add_embedding, load_embedding
from .images import crop_to_multiple, image_to_tensor, load_image, psnr, tag, to_pil
from .layers import randn_tensor
from .lora import apply_loras, load_lora
from .offload import execution_device
from .prompts import conditioning_states, encode_weighted_prompt, encode_weighted_prompt_sdxl
from .schedulers import DIFFUSERS_CLASS_NAMES, Scheduler, SamplingState, make_scheduler
from .tokenizer import CLIPTokenizer
from .vae import AutoencoderKL

PROMPT_SYNTAXES = ("plain", "a1111")
DEFAULT_SCHEDULER = "dpmpp_2m"  # for configs written for a sampler sd_core does not implement
MAX_SEED = 2 ** 32 - 1
# callback(step, timestep, latents, predicted x0): called after every denoising step.
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]


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
    """The sampler asked for, or the one the model's config names; a config written for a sampler
    sd_core lacks falls back to DPM-Solver++ 2M, with a warning that says so."""
    if name:
        return name
    class_name = config.get("_class_name")
    if class_name and class_name not in DIFFUSERS_CLASS_NAMES:
        warnings.warn(f"The model's scheduler {class_name} is not implemented in sd_core; sampling with "
                      f"{DEFAULT_SCHEDULER} instead (pass scheduler= to choose another).", stacklevel=3)
    return DIFFUSERS_CLASS_NAMES.get(class_name, DEFAULT_SCHEDULER)


def image_seeds(seed: int, count: int, seed_per_image: bool) -> list[int]:
    """A1111's batch rule: image k of a batch with seed S is drawn from seed S + k (wrapping at 2**32), so it is
    the image a single run with that seed gives. Without seed_per_image, one seed draws the whole batch."""
    return [(seed + k) % (MAX_SEED + 1) for k in range(count)] if seed_per_image else [seed]


def display_name(source) -> str:
    """A model's name for metadata, never a server's path: the catalog's name for a model it lists (the embedded
    ones), the repo id for a hub download (its cache folder is models--owner--name/snapshots/<commit>), else the
    folder's or file's name."""
    source = str(source)
    for model in [*catalog.EMBEDDED.values(), *catalog.HUB.values()]:
        if source == model.source or (Path(source).exists() and Path(model.source).exists()
                                      and Path(source).resolve() == Path(model.source).resolve()):
            return model.name
    parts = Path(source).parts
    for i, part in enumerate(parts):
        if part.startswith("models--") and i + 1 < len(parts) and parts[i + 1] == "snapshots":
            return part.removeprefix("models--").replace("--", "/")
    return Path(source).name if Path(source).exists() else source


def customize(pipe, loras=(), embeddings=(), allow_pickle: bool = False) -> list[str]:
    """Apply LoRA files [(path, scale), ...] (merged into the weights, sd_core.lora) and bind textual-inversion
    files [path, ...] to their tokens (sd_core.embeddings); returns the tokens to write in prompts.
    The CLI and the app both customize a loaded pipeline through this."""
    for path, scale in loras:
        if not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"The LoRA scale for {path} must be a finite number; got {scale!r}.")
    if loras:
        apply_loras(pipe.models, [(load_lora(path, allow_pickle), float(scale)) for path, scale in loras])
    return [add_embedding(pipe, load_embedding(path, allow_pickle)) for path in embeddings]


def check_common(steps, guidance_scale, batch):
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}.")
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a number >= 0 (and finite); got {guidance_scale!r}.")
    if batch < 1:
        raise ValueError("Nothing to generate: give at least one prompt (or class) and images_per_prompt >= 1.")


def dtype_of(model: torch.nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def check_size(pipe, height: int, width: int):
    factor = pipe.vae_scale_factor
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value < factor or value % factor:
            raise ValueError(f"{name} must be a positive multiple of {factor}; got {value!r}.")
        if value > 4096:
            raise ValueError(f"{name}={value} is too large (at most 4096).")


def decode(vae: AutoencoderKL, latents: torch.Tensor) -> list:
    """Latents (scaled as the diffusion model sees them) -> 8-bit PIL images. A float16 VAE whose config says
    force_upcast (SDXL's overflows in fp16) decodes in float32, as diffusers' SDXL pipelines do, on a private
    fp32 copy so the shared model is never changed under a concurrent request (diffusers' SD 1.x/2.x pipelines
    decode in fp16 regardless: there sd_core is the more accurate)."""
    if dtype_of(vae) == torch.float16 and vae.config.force_upcast:
        vae, latents = copy.deepcopy(vae).float(), latents.float()
    return to_pil(check_finite(vae.decode(latents / vae.config.scaling_factor), "the VAE's decoded image"))


def check_finite(tensor: torch.Tensor, stage: str) -> torch.Tensor:
    """`tensor`, unless it holds NaN or infinity: then an error naming the stage, instead of a black image."""
    if not torch.isfinite(tensor).all():
        raise FloatingPointError(
            f"NaN or infinity in {stage}: in float16 the model overflowed (try float32 or bfloat16), or its weights "
            f"hold NaN/inf values (check the checkpoint).")
    return tensor


# ------------------------------------------------------------------------------------ guidance and loop


def guide(uncond: torch.Tensor, cond: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022): uncond + scale (cond - uncond). With rescale > 0,
    Lin et al. (2023, eq. 15-16): match the guided prediction's std to cond's, blended by `rescale`."""
    guided = uncond + scale * (cond - uncond)
    if rescale > 0:
        dims = list(range(1, cond.ndim))
        rescaled = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
        guided = rescale * rescaled + (1 - rescale) * guided
    return guided


def denoise(sampler: Scheduler, states, x: torch.Tensor, predict: Callable, generators,
            callback: StepCallback | None = None) -> torch.Tensor:
    """The sampling loop every pipeline shares: scale the input, predict, step; report each step.

    `states` and `generators` are one of each for the whole batch (diffusers), or lists with one per image
    (a seed per image): the model still sees the whole batch, and each image steps with its own sampler state
    and generator, so a stochastic sampler draws the noise a single run with that image's seed would."""
    states = states if isinstance(states, list) else [states]
    generators = generators if isinstance(generators, list) else [generators]
    for i, t in enumerate(states[0].timesteps):
        output = predict(sampler.scale_model_input(states[0], x), t)
        if len(states) == 1:
            x, x0 = sampler.step(states[0], output, x, generators[0])
        else:
            steps = [sampler.step(state, out, xi, generator) for state, out, xi, generator in
                     zip(states, output.chunk(len(states)), x.chunk(len(states)), generators, strict=True)]
            x, x0 = torch.cat([step[0] for step in steps]), torch.cat([step[1] for step in steps])
        if callback is not None:
            callback(i, t, x, x0)
    return x


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


def embed_text(pipe: StableDiffusionPipeline, texts: list[str], clip_skip: int = 0):
    """(hidden states, pooled projection or None) as the family's reference pipeline builds them: the last
    hidden state, or the penultimate ones of every encoder concatenated (SDXL). clip_skip > 0 takes the
    layer diffusers' clip_skip takes (`prompts.conditioning_states`)."""
    device = execution_device(pipe.unet)
    penultimate = pipe.traits.hidden_states == "penultimate"
    states, pooled = [], None
    for slot in pipe.traits.text_encoders:
        encoder, tokenizer = getattr(pipe, slot.component), getattr(pipe, slot.tokenizer)
        if clip_skip:
            hidden, slot_pooled = conditioning_states(encoder, encode_text(tokenizer, texts, device), clip_skip,
                                                      penultimate)
            states.append(hidden)
            pooled = slot_pooled if slot.projected else pooled
            continue
        if not penultimate:
            states.append(encoder(encode_text(tokenizer, texts, device)).last_hidden_state)
            continue
        out = encoder(encode_text(tokenizer, texts, device), output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out.pooled_output if slot.projected else pooled
    return torch.cat(states, dim=-1), pooled


def embed_weighted_text(pipe: StableDiffusionPipeline, texts: list[str], clip_skip: int = 0):
    """A1111's syntax (sd_core.prompts): all `texts` encoded in one call, so they share one chunk count."""
    slots = pipe.traits.text_encoders
    if pipe.traits.hidden_states == "penultimate":
        return encode_weighted_prompt_sdxl([getattr(pipe, slot.tokenizer) for slot in slots],
                                           [getattr(pipe, slot.component) for slot in slots], texts, clip_skip)
    (slot,) = slots
    return encode_weighted_prompt(getattr(pipe, slot.tokenizer), getattr(pipe, slot.component), texts, clip_skip), None


def encode_prompt(pipe: StableDiffusionPipeline, prompts: list[str], negatives: list[str] | None, guided: bool,
                  prompt_syntax: str = "plain", clip_skip: int = 0):
    """Text conditioning (embeddings, pooled); with guidance batched as [uncond, cond].

    clip_skip applies to the negative prompt too. (diffusers 0.42 applies it to the positive prompt only, so its
    guidance subtracts conditioning from two different layers; A1111 and ComfyUI encode both from the same
    layer, which is what guidance assumes. With clip_skip=0 both readings agree.)"""
    if prompt_syntax not in PROMPT_SYNTAXES:
        raise ValueError(f"prompt_syntax must be one of {PROMPT_SYNTAXES}; got {prompt_syntax!r}.")
    zeros = guided and negatives is None and pipe.traits.zeros_for_empty_negative
    if prompt_syntax == "a1111":
        if not guided or zeros:
            embeddings, pooled = embed_weighted_text(pipe, prompts, clip_skip)
        else:  # negatives and prompts in one call: they share a chunk count
            both, both_pooled = embed_weighted_text(pipe, (negatives or [""] * len(prompts)) + prompts, clip_skip)
            return both, both_pooled
    else:
        embeddings, pooled = embed_text(pipe, prompts, clip_skip)
    if not guided:
        return embeddings, pooled
    if zeros:
        negative, negative_pooled = torch.zeros_like(embeddings), torch.zeros_like(pooled)
    else:
        negative, negative_pooled = embed_text(pipe, negatives or [""] * len(prompts), clip_skip)
    embeddings = torch.cat([negative, embeddings])
    pooled = torch.cat([negative_pooled, pooled]) if pooled is not None else None
    return embeddings, pooled


def as_list(prompt, what: str) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{what} must be a string or a list of strings.")
    return prompts


# ------------------------------------------------------------------------------ text / image to image


@torch.no_grad()
def generate(pipe: StableDiffusionPipeline, prompt, negative_prompt=None, *, image=None, strength: float = 0.8,
             height: int | None = None, width: int | None = None, steps: int = 30, guidance_scale: float = 7.5,
             guidance_rescale: float = 0.0, scheduler: str | None = None, seed: int | None = None,
             images_per_prompt: int = 1, latents: torch.Tensor | None = None, eta: float = 0.0,
             original_size=None, crops_coords_top_left=(0, 0), target_size=None, prompt_syntax: str = "plain",
             clip_skip: int = 0, seed_per_image: bool = False,
             callback: StepCallback | None = None) -> GenerationResult:
    """Text to image, or image to image when `image` is given (then `strength` in [0, 1] says how much to
    change). `eta` is DDIM's (0: deterministic); other samplers ignore it.

    prompt_syntax "plain" encodes as diffusers does (one 77-token window, brackets are text); "a1111" reads
    AUTOMATIC1111's weights, BREAK and long prompts (sd_core.prompts). clip_skip counts as diffusers counts it
    (0: the family's usual layer; 1: one layer earlier) and applies to the negative prompt as well.

    seed_per_image=False (the default, diffusers' rule, which the parity tests pin) draws the whole batch's noise
    from one generator; True is A1111's rule: image k uses seed + k and is the image a single run with that
    seed makes. Each image's metadata carries its own seed; `result.parameters` carries the first."""
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
    height = pipe.default_size if height is None else height
    width = pipe.default_size if width is None else width
    check_size(pipe, height, width)
    seed = resolve_seed(seed)
    seeds = image_seeds(seed, batch, seed_per_image)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    name = scheduler_name(pipe.scheduler_config, scheduler)
    sampler = make_scheduler(name, pipe.scheduler_config, eta=eta)
    states = [sampler.set_timesteps(steps, strength if image is not None else 1.0) for _ in seeds]
    guided = guidance_scale > 1
    device, dtype = execution_device(pipe.unet), dtype_of(pipe.unet)

    embeddings, pooled = encode_prompt(pipe, prompts, negatives, guided, prompt_syntax, clip_skip)
    embeddings = embeddings.repeat_interleave(images_per_prompt, dim=0).to(dtype)
    added = None
    if pipe.unet.config.addition_embed_type == "text_time":
        time_ids = torch.tensor([list((original_size or (height, width)) + tuple(crops_coords_top_left)
                                     + (target_size or (height, width)))], dtype=embeddings.dtype, device=device)
        added = {"text_embeds": pooled.repeat_interleave(images_per_prompt, dim=0).to(dtype),
                 "time_ids": time_ids.repeat(embeddings.shape[0], 1)}

    shape = (batch // len(seeds), pipe.unet.config.in_channels, height // pipe.vae_scale_factor,
             width // pipe.vae_scale_factor)
    if image is not None:  # encode (sampling the posterior) then noise to the first step, as diffusers does
        posterior = pipe.vae.encode(image_to_tensor(image, dtype_of(pipe.vae), device))
        x = []
        for generator, state in zip(generators, states):
            x0 = (pipe.vae.config.scaling_factor * posterior.sample(generator)).to(dtype).repeat(shape[0], 1, 1, 1)
            x.append(sampler.add_noise_at_start(state, x0, randn_tensor(shape, generator, dtype, device)))
        x = torch.cat(x)
    elif latents is not None:
        if tuple(latents.shape) != (batch, *shape[1:]):
            raise ValueError(f"latents must have shape {(batch, *shape[1:])}; got {tuple(latents.shape)}.")
        x = latents.to(device=device, dtype=dtype) * states[0].init_noise_sigma
    else:
        x = torch.cat([randn_tensor(shape, generator, dtype, device) for generator in generators])
        x = x * states[0].init_noise_sigma

    def predict(model_input, t):
        if not guided:
            return pipe.unet(model_input, t, embeddings, added)
        uncond, cond = pipe.unet(torch.cat([model_input] * 2), t, embeddings, added).chunk(2)
        return guide(uncond, cond, guidance_scale, guidance_rescale)

    x = denoise(sampler, states if seed_per_image else states[0], x, predict,
                generators if seed_per_image else generators[0], callback)
    check_finite(x, "the latents after denoising (UNet)")
    parameters = {"prompt": prompts, "negative_prompt": negatives, "seed": seed, "steps": steps,
                  "scheduler": name, "guidance_scale": guidance_scale, "guidance_rescale": guidance_rescale,
                  "height": height, "width": width, "images_per_prompt": images_per_prompt,
                  "strength": strength if image is not None else None, "prompt_syntax": prompt_syntax,
                  "clip_skip": clip_skip, "seed_per_image": seed_per_image, "model": display_name(pipe.source),
                  "family": pipe.family}
    return GenerationResult(tag(decode(pipe.vae, x), parameters, seeds), x, parameters)


def text_to_image(pipe: StableDiffusionPipeline, prompt, negative_prompt=None, **kwargs) -> GenerationResult:
    if "image" in kwargs:
        raise TypeError("text_to_image takes no image; use image_to_image.")
    return generate(pipe, prompt, negative_prompt, **kwargs)


def image_to_image(pipe: StableDiffusionPipeline, image, prompt, negative_prompt=None, strength: float = 0.8,
                   **kwargs) -> GenerationResult:
    return generate(pipe, prompt, negative_prompt, image=image, strength=strength, **kwargs)


def preview(pipe, x0: torch.Tensor, size: int = 128) -> Image.Image:
    """A small picture of a predicted x0 (latents), decoded by the VAE, for progress and trajectory views."""
    with torch.no_grad():
        image = decode(pipe.vae, x0[:1].to(dtype_of(pipe.vae)))[0]
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


@torch.no_grad()
def vae_roundtrip(vae: AutoencoderKL, image, sample: bool = False, seed: int | None = None,
                  difference_gain: float = 4.0) -> RoundTrip:
    """image -> posterior (mean/std) -> mode or a sample -> decoded image. Any input size: centre-cropped
    to a multiple of the VAE's downscale factor; RGBA/grayscale/palette converted, EXIF orientation applied."""
    image = crop_to_multiple(load_image(image), vae.downscale_factor)
    device = execution_device(vae)
    posterior = vae.encode(image_to_tensor(image, dtype_of(vae), device))
    z = posterior.sample(torch.Generator("cpu").manual_seed(resolve_seed(seed))) if sample else posterior.mode()
    reconstruction = to_pil(vae.decode(z))[0]
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


def class_ids(pipe: DiTPipeline, labels) -> list[int]:
    """Class ids from ids or names (case-insensitive; an id2label entry may list several names, "a, b").

    A model whose id2label names fewer classes than it embeds (the embedded DiT names 18 of 1001 rows; the rest
    were never trained) accepts only the named ids; an unknown name is answered with the valid names."""
    names = {name.strip().lower(): i for i, label in pipe.id2label.items() for name in label.split(",")}
    num_classes = pipe.transformer.config.num_embeds_ada_norm
    valid = sorted(pipe.id2label) if 0 < len(pipe.id2label) < num_classes else range(num_classes)
    ids = []
    for label in labels:
        if isinstance(label, str) and label.strip().lower() in names:
            ids.append(names[label.strip().lower()])
        elif isinstance(label, int) or (isinstance(label, str) and label.strip().isdigit()):
            ids.append(int(label))
        else:
            close = [n for n in names if str(label).strip().lower() in n][:5]
            listing = f" Did you mean {close}?" if close else \
                f" This model's classes: {sorted(names, key=names.get)}." if len(names) <= 50 else ""
            raise ValueError(f"Unknown class label {label!r}.{listing}")
    for i in ids:
        if not 0 <= i < num_classes:
            raise ValueError(f"Class id {i} is outside this model's {num_classes} classes [0, {num_classes - 1}].")
        if i not in valid:
            raise ValueError(f"Class id {i} has no label: this model names only the classes "
                             f"{[f'{j}: {pipe.id2label[j]}' for j in valid]}.")
    return ids


@torch.no_grad()
def dit_sample(pipe: DiTPipeline, class_labels, *, guidance_scale: float = 4.0, steps: int = 25,
               scheduler: str | None = None, seed: int | None = None, guided_channels: str = "all",
               seed_per_image: bool = False, callback: StepCallback | None = None) -> GenerationResult:
    """Class-conditional sampling. Guidance is on all latent channels (diffusers) or, with
    guided_channels="first3", on the first three only, as the original DiT code does. A learned-sigma
    model's variance channels reach the sampler (DDPM samples with them; the others ignore them).
    seed_per_image: image k uses seed + k (A1111's rule), as in `generate`; default: diffusers' one generator."""
    if guided_channels not in GUIDED_CHANNELS:
        raise ValueError(f"guided_channels must be one of {GUIDED_CHANNELS}; got {guided_channels!r}.")
    labels = class_ids(pipe, class_labels if isinstance(class_labels, (list, tuple)) else [class_labels])
    check_common(steps, guidance_scale, len(labels))
    c = pipe.transformer.config
    seed = resolve_seed(seed)
    seeds = image_seeds(seed, len(labels), seed_per_image)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    name = scheduler_name(pipe.scheduler_config, scheduler)
    sampler = make_scheduler(name, pipe.scheduler_config)
    states = [sampler.set_timesteps(steps) for _ in seeds]
    device, dtype = execution_device(pipe.transformer), dtype_of(pipe.transformer)
    guided = guidance_scale > 1
    shape = (len(labels) // len(seeds), c.in_channels, c.sample_size, c.sample_size)
    x = torch.cat([randn_tensor(shape, generator, dtype, device) for generator in generators])
    x = x * states[0].init_noise_sigma
    ids = torch.tensor(labels, device=device)
    guided_ids = torch.cat([ids, torch.full_like(ids, c.null_class)])  # DiT's order: [cond, uncond]
    split = c.in_channels if guided_channels == "all" else 3

    def predict(model_input, t):
        if not guided:
            return pipe.transformer(model_input, torch.as_tensor(t, device=device).reshape(1).expand(len(labels)),
                                    ids)
        timesteps = torch.as_tensor(t, device=device).reshape(1).expand(2 * len(labels))
        cond, uncond = pipe.transformer(torch.cat([model_input, model_input]), timesteps, guided_ids).chunk(2)
        return torch.cat([guide(uncond[:, :split], cond[:, :split], guidance_scale), cond[:, split:]], dim=1)

    x = denoise(sampler, states if seed_per_image else states[0], x, predict,
                generators if seed_per_image else generators[0], callback)
    check_finite(x, "the latents after denoising (DiT)")
    names = [pipe.id2label.get(i, str(i)) for i in labels]
    parameters = {"class_labels": labels, "class_names": names, "seed": seed, "steps": steps, "scheduler": name,
                  "guidance_scale": guidance_scale, "guided_channels": guided_channels,
                  "seed_per_image": seed_per_image, "model": display_name(pipe.source), "family": pipe.family}
    return GenerationResult(tag(decode(pipe.vae, x), parameters, seeds), x, parameters)
