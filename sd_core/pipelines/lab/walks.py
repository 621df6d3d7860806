"""Walks: N pictures between two seeds (spherical interpolation of the starting noise) or between two prompts
(linear interpolation of the text encoders' outputs), each through generate(), as an animation and a strip.

    walk = seed_walk(pipe, GenerationSettings(prompt="a big red circle ..."), 1, 2, frames=8)
    walk.animation("walk.webp"); walk.strip      # the frames side by side, each captioned
"""
import dataclasses
import io
from pathlib import Path

import torch

from sd_core.noise import randn_tensor
from sd_core.pipelines.generate import generate
from sd_core.pipelines.lab.drawing import strip
from sd_core.pipelines.lab.text_encoders import encoder_of, with_encoders
from sd_core.pipelines.sampling import dtype_of, resolve_seed
from sd_core.pipelines.settings import GenerationSettings, whole_number

MAX_FRAMES = 32


@dataclasses.dataclass
class Walk:
    frames: list  # PIL images, each with its own settings in its metadata
    captions: list[str]

    @property
    def strip(self):
        return strip(self.frames, self.captions)

    def animation(self, path=None, format: str = "WEBP", frame_ms: int = 250) -> bytes:
        """The frames as a looping animation (WEBP or GIF), also written to `path` when given."""
        if format.upper() not in ("WEBP", "GIF"):
            raise ValueError(f"An animation is WEBP or GIF; got {format!r}.")
        buffer = io.BytesIO()
        self.frames[0].save(buffer, format=format.upper(), save_all=True, append_images=self.frames[1:],
                            duration=frame_ms, loop=0, **({"lossless": True} if format.upper() == "WEBP" else {}))
        if path is not None:
            Path(path).write_bytes(buffer.getvalue())
        return buffer.getvalue()


def fractions(frames) -> list[float]:
    count = whole_number(frames, "frames", 2, MAX_FRAMES)
    return [i / (count - 1) for i in range(count)]


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation (Shoemake 1985) between two noise tensors: the frames keep the norm a Gaussian
    draw has, which a straight blend would shrink (washed-out middle frames)."""
    if t in (0, 1):
        return a if t == 0 else b
    a64, b64 = a.double().flatten(), b.double().flatten()
    cosine = torch.dot(a64, b64) / (a64.norm() * b64.norm())
    omega = torch.arccos(cosine.clamp(-1, 1))
    if omega.abs() < 1e-6:
        return (1 - t) * a + t * b
    mixed = (torch.sin((1 - t) * omega) * a64 + torch.sin(t * omega) * b64) / torch.sin(omega)
    return mixed.reshape(a.shape).to(a.dtype)


def seed_walk(pipe, settings: GenerationSettings, seed_a, seed_b, frames: int = 8, callback=None) -> Walk:
    """Frames from seed_a's starting noise to seed_b's (the first and last frames are those seeds' pictures)."""
    seed_a, seed_b = resolve_seed(seed_a), resolve_seed(seed_b)
    settings = settings.replace(images_per_prompt=1, seed=seed_a)
    size = (settings.height or pipe.default_size, settings.width or pipe.default_size)
    shape = (1, pipe.vae.config.latent_channels, size[0] // pipe.vae_scale_factor, size[1] // pipe.vae_scale_factor)
    dtype, device = dtype_of(pipe.unet), next(pipe.unet.parameters()).device
    a, b = (randn_tensor(shape, torch.Generator("cpu").manual_seed(seed), dtype, device) for seed in (seed_a, seed_b))
    pictures, captions = [], []
    for t in fractions(frames):
        image = generate(pipe, settings, latents=slerp(a, b, t), callback=callback).images[0]
        pictures.append(image)
        captions.append(f"seed {seed_a} to {seed_b}: {t:.2f}")
    return Walk(pictures, captions)


def prompt_walk(pipe, settings: GenerationSettings, prompt_b: str, frames: int = 8, callback=None) -> Walk:
    """Frames from settings.prompt to `prompt_b` with the same seed: each frame's text conditioning is
    (1 - t) * A + t * B of every output of the text encoders (hidden states, pooled), the negative prompt kept."""
    if not isinstance(settings.prompt, str) or settings.prompt_syntax != "plain":
        raise ValueError("A prompt walk goes from one plain prompt to another (prompt syntax 'plain').")
    settings = settings.replace(images_per_prompt=1, seed=resolve_seed(settings.seed))
    prompt_b = GenerationSettings(prompt=prompt_b).prompt
    pictures, captions = [], []
    for t in fractions(frames):
        view = with_encoders(pipe, blending(pipe, settings.prompt, prompt_b, t))
        pictures.append(generate(view, settings, callback=callback).images[0])
        captions.append(f"{t:.2f}")
    return Walk(pictures, [f"{settings.prompt!r} to {prompt_b!r}: {c}" if i in (0, len(captions) - 1) else c
                           for i, c in enumerate(captions)])


def blending(pipe, prompt_a: str, prompt_b: str, t: float):
    """An encoder answer that gives, for prompt A's token ids, the blend of A's and B's outputs."""
    tokens = {id(encoder_of(getattr(pipe, slot))): getattr(pipe, tokenizer) for slot, tokenizer in
              (("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")) if getattr(pipe, slot, None) is not None}

    def answer(encoder, input_ids, options):
        out = encoder(input_ids, **options)
        tokenizer = tokens[id(encoder)]
        ids_a, ids_b = (tokenizer.pad([tokenizer.tokenize(p)]).to(input_ids.device) for p in (prompt_a, prompt_b))
        rows = [i for i in range(input_ids.shape[0]) if torch.equal(input_ids[i:i + 1], ids_a)]
        if not rows:
            return out
        other = encoder(ids_b.expand(len(rows), -1), **options)
        return type(out)(*(mix(field, other_field, rows, t) for field, other_field in zip(out, other)))
    return answer


def mix(field, other, rows: list[int], t: float):
    """`field` with its `rows` blended toward `other` (tensors, or tuples of them: every layer's hidden states)."""
    if field is None:
        return None
    if isinstance(field, tuple):
        return tuple(mix(f, o, rows, t) for f, o in zip(field, other))
    mixed = field.clone()
    mixed[rows] = torch.lerp(field[rows], other.to(field.dtype), t)
    return mixed
