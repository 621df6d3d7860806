"""Inpainting as diffusers' StableDiffusionInpaintPipeline does it, for both kinds of model:

- an inpainting UNet (in_channels 9: SD 1.5/2 inpainting) sees, beside the noisy latents, the mask at latent
  size and the latents of the masked image (the image with the region to repaint set to 0, i.e. gray);
- an ordinary UNet (in_channels 4) denoises the whole image and, after every step, the known region is put back
  as the original image's latents noised to the next step's level (diffusers' `init_latents_proper`).

The mask is white (>= 0.5) where to paint and black where to keep, binarized at 0.5 as diffusers' mask
processor does, and resized to the latents with nearest-neighbour interpolation.
"""
import dataclasses

import numpy as np
import torch
from PIL import Image

from sd_core.noise import randn_tensor
from sd_core.pipelines.image_io import image_to_tensor, open_image, to_grey
from sd_core.schedulers import SamplingState, Scheduler

INPAINT_CHANNELS = 9  # latents (4) + mask (1) + masked-image latents (4)


def load_mask(mask, size: tuple[int, int]) -> Image.Image:
    """The mask (a path, file or PIL image) as a grayscale PIL image of `size` (the image's), read within the
    image reader's bounds (images.open_image; 16-bit grey scaled to 8 bits): diffusers' mask processor converts
    to "L" (alpha ignored) and resamples a mask of another size with Lanczos."""
    mask = open_image(mask, convert=to_grey)
    return mask if mask.size == size else mask.resize(size, Image.LANCZOS)


def mask_to_tensor(mask: Image.Image) -> torch.Tensor:
    """(1, 1, H, W) float32: 1 where to paint, 0 where to keep (binarized at 0.5)."""
    array = torch.from_numpy(np.array(mask).astype(np.float32) / 255.0)[None, None]
    return (array >= 0.5).float()


@dataclasses.dataclass
class Inpainting:
    """What inpainting adds to a sampling run, for a batch of B images (rows)."""
    mask: torch.Tensor  # (B, 1, h, w) at latent size
    masked_latents: torch.Tensor  # (B, 4, h, w): the scaled latents of the image with the painted region zeroed
    image_latents: torch.Tensor | None  # (B, 4, h, w): the image's latents (4-channel models), else None
    noise: torch.Tensor  # (B, 4, h, w): the noise the start latents were drawn with

    def model_input(self, x: torch.Tensor) -> torch.Tensor:
        """The UNet's input: for a 9-channel model [latents, mask, masked-image latents] along channels."""
        if self.image_latents is not None:
            return x
        return torch.cat([x, self.mask.to(x.dtype), self.masked_latents.to(x.dtype)], dim=1)

    def blend(self, sampler: Scheduler, state: SamplingState, i: int, x: torch.Tensor) -> torch.Tensor:
        """After step i of a 4-channel model: the known region becomes the image's latents noised to step
        i + 1's level (none after the last step); the painted region keeps the sampler's latents."""
        if self.image_latents is None:
            return x
        known = self.image_latents
        if i < len(state.timesteps) - 1:
            at_next = dataclasses.replace(state, timesteps=state.timesteps[i + 1:],
                                          step_index=state.begin_index + i + 1)
            known = sampler.add_noise_at_start(at_next, known, self.noise)
        return (1 - self.mask) * known + self.mask * x


def prepare(pipe, sampler: Scheduler, states: list[SamplingState], image: Image.Image, mask: Image.Image, rows: int,
            strength: float, generators: list, dtype, device) -> tuple[torch.Tensor, Inpainting]:
    """(start latents, Inpainting) for `rows` images per generator (one state each). The VAE encodes the image and
    the masked image once; each generator then draws in diffusers' order: a sample of the image's posterior (a
    4-channel model, or strength < 1), the noise, a sample of the masked image's posterior."""
    channels = pipe.unet.config.in_channels
    if channels not in (4, INPAINT_CHANNELS):
        raise ValueError(f"Inpainting needs a UNet with 4 input channels (masked image to image) or "
                         f"{INPAINT_CHANNELS} (an inpainting model); this one has {channels}.")
    vae_dtype = next(pipe.vae.parameters()).dtype
    pixels = image_to_tensor(image, torch.float32, device)
    full_mask = mask_to_tensor(mask).to(device)
    image_posterior = pipe.vae.encode(pixels.to(vae_dtype)) if channels == 4 or strength < 1.0 else None
    masked_posterior = pipe.vae.encode((pixels * (full_mask < 0.5)).to(vae_dtype))
    scale = pipe.vae.config.scaling_factor  # scaled latents of a posterior sample: diffusers' `retrieve_latents`
    sample = lambda posterior, generator: (scale * posterior.sample(generator)).to(dtype).repeat(rows, 1, 1, 1)
    shape = (rows, pipe.vae.config.latent_channels, image.height // pipe.vae_scale_factor,
             image.width // pipe.vae_scale_factor)
    starts, known, noises, masked = [], [], [], []
    for generator, state in zip(generators, states, strict=True):
        image_latents = None if image_posterior is None else sample(image_posterior, generator)
        noise = randn_tensor(shape, generator, dtype, device)
        starts.append(noise * state.init_noise_sigma if strength == 1.0 else
                      sampler.add_noise_at_start(state, image_latents, noise))
        known.append(image_latents)
        noises.append(noise)
        masked.append(sample(masked_posterior, generator))
    latent_mask = torch.nn.functional.interpolate(full_mask, size=shape[-2:]).to(dtype)
    return torch.cat(starts), Inpainting(latent_mask.repeat(rows * len(generators), 1, 1, 1), torch.cat(masked),
                                         torch.cat(known) if channels == 4 else None, torch.cat(noises))
