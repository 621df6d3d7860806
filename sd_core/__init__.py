"""sd_core: Stable Diffusion 1.x/2.x/XL and DiT from scratch in PyTorch, number for number with diffusers."""
