#!/usr/bin/env bash
# The GPU checks of issue 32, for when a GPU machine is lent (one call; about 6-8 minutes on an H100):
# half-precision parity (cosine distance of outputs and latents, 8-bit image difference) and speed against diffusers,
# SD 1.5, SDXL and DiT-XL/2 at real size with random weights. Run from the repository root:  bash compare/gpu-check.sh
set -euo pipefail
export HF_HUB_OFFLINE=1
python -c "import torch; assert torch.cuda.is_available(), 'no GPU here'; print(torch.cuda.get_device_name())"
python -m compare gpu-parity --configs sd15,sdxl,dit-xl-2 --dtypes fp16,bf16 --latent 64
python -m compare benchmark --configs sd15,sdxl,dit-xl-2 --dtypes fp16,bf16 --latent 64 --repeats 5
