"""`python -m tests.train_tiny text-to-image|dit|vae ...`: sd_core.training's commands on the tests' tiny models, so
the multi-process tests launch the real loop under accelerate in seconds."""
import sys

import torch

from sd_core.training import recipes as train
from sd_core.training.__main__ import main
from tests.test_train import TINY_DIT, TINY_TEXT, TINY_UNET, TINY_VAE

if __name__ == "__main__":
    torch.set_num_threads(1)
    train.VAE_CONFIG.update(TINY_VAE)
    train.TEXT_ENCODER_CONFIG.update(TINY_TEXT)
    train.UNET_CONFIG.update(TINY_UNET)
    train.DIT_CONFIG.update(TINY_DIT)
    main(sys.argv[1:])
