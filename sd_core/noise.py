"""Gaussian noise drawn as diffusers draws it (Contract 3): models, samplers and pipelines all draw through here."""
import torch


def randn_tensor(shape, generator: torch.Generator | None, dtype, device) -> torch.Tensor:
    """Gaussian noise drawn on the generator's device (CPU by default) then moved, as diffusers' randn_tensor
    draws it, so one seed gives the same noise in both stacks whatever the compute device."""
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


def randn_like(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return randn_tensor(x.shape, generator, x.dtype, x.device)
