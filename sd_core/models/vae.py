"""AutoencoderKL: the Stable Diffusion VAE (encoder -> diagonal Gaussian posterior -> decoder)."""
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from sd_core.config import ModelConfig
from sd_core.models.layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D
from sd_core.noise import randn_like

VAE_EPS = 1e-6  # every GroupNorm in the VAE


@dataclasses.dataclass
class AutoencoderKLConfig(ModelConfig):
    size_bounds = {"in_channels": (1, 16), "out_channels": (1, 16), "block_out_channels": (1, 8192),
                   "layers_per_block": (1, 16), "latent_channels": (1, 64), "norm_num_groups": (1, 1024),
                   "sample_size": (1, 8192)}
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple | None = None
    latents_std: tuple | None = None
    force_upcast: bool = True  # pipelines decode in fp32 when the weights are fp16 (the SDXL VAE overflows)
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        n = len(self.block_out_channels)
        self.require(self.act_fn == "silu", f"act_fn {self.act_fn!r} is not supported (only 'silu').")
        self.require(list(self.down_block_types) == ["DownEncoderBlock2D"] * n,
                     f"down_block_types must be {n} x DownEncoderBlock2D, got {self.down_block_types}.")
        self.require(list(self.up_block_types) == ["UpDecoderBlock2D"] * n,
                     f"up_block_types must be {n} x UpDecoderBlock2D, got {self.up_block_types}.")


class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, std^2), per latent element."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.mean + self.std * randn_like(self.mean, generator)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q(z|x) || N(0, I)) per latent element: (mean^2 + std^2 - 1 - log std^2) / 2."""
        return 0.5 * (self.mean ** 2 + self.std ** 2 - 1 - self.logvar)


class SpatialSelfAttention(Attention):
    """Single-head self-attention over all pixels with its own GroupNorm and residual (VAE mid block)."""

    def __init__(self, channels: int, groups: int):
        super().__init__(channels, heads=1, dim_head=channels, bias=True, upcast=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=VAE_EPS)

    def forward(self, x):
        batch, channels, height, width = x.shape
        h = self.group_norm(x).reshape(batch, channels, height * width).transpose(1, 2)  # (B, HW, C)
        h = super().forward(h)
        return x + h.transpose(1, 2).reshape(batch, channels, height, width)


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, add_attention: bool):
        super().__init__()
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)] if add_attention else [])
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, None, groups, VAE_EPS) for _ in range(2)])

    def forward(self, x):
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    """`num_layers` ResNets, then (except in the last block) the (0,1,0,1)-padded stride-2 conv."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = resnet_stack(in_channels, out_channels, num_layers, groups)
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=0)] if downsample else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.downsamplers]:
            x = layer(x)
        return x


class UpDecoderBlock2D(nn.Module):
    """`num_layers` ResNets, then (except in the last block) nearest 2x upsampling and a conv."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = resnet_stack(in_channels, out_channels, num_layers, groups)
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)] if upsample else [])

    def forward(self, x):
        for layer in [*self.resnets, *self.upsamplers]:
            x = layer(x)
        return x


def resnet_stack(in_channels: int, out_channels: int, num_layers: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, VAE_EPS)
                          for i in range(num_layers)])


class Encoder(nn.Module):
    def __init__(self, c: AutoencoderKLConfig):
        super().__init__()
        channels, groups = c.block_out_channels, c.norm_num_groups
        self.conv_in = nn.Conv2d(c.in_channels, channels[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock2D(channels[max(i - 1, 0)], channels[i], c.layers_per_block, groups,
                               i < len(channels) - 1)
            for i in range(len(channels))
        ])
        self.mid_block = MidBlock(channels[-1], groups, c.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=VAE_EPS)
        self.conv_out = nn.Conv2d(channels[-1], 2 * c.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, c: AutoencoderKLConfig):
        super().__init__()
        channels, groups = list(reversed(c.block_out_channels)), c.norm_num_groups
        self.conv_in = nn.Conv2d(c.latent_channels, channels[0], 3, padding=1)
        self.mid_block = MidBlock(channels[0], groups, c.mid_block_add_attention)
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock2D(channels[max(i - 1, 0)], channels[i], c.layers_per_block + 1, groups,
                             i < len(channels) - 1)
            for i in range(len(channels))
        ])
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=VAE_EPS)
        self.conv_out = nn.Conv2d(channels[-1], c.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(nn.Module):
    """x (B, 3, H, W) in [-1, 1]  <->  z (B, latent_channels, H/2^(n-1), W/2^(n-1))."""

    def __init__(self, config: AutoencoderKLConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        latent2 = 2 * config.latent_channels
        if config.use_quant_conv:
            self.quant_conv = nn.Conv2d(latent2, latent2, 1)
        if config.use_post_quant_conv:
            self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)

    @classmethod
    def from_config(cls, config: dict) -> "AutoencoderKL":
        return cls(AutoencoderKLConfig.from_dict(config))

    @property
    def downscale_factor(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def _check(self, x: torch.Tensor, channels: int, what: str):
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{what} must be (batch, {channels}, height, width); got shape {tuple(x.shape)}.")

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        self._check(x, self.config.in_channels, "The image")
        factor = self.downscale_factor
        if x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"Image height and width must be multiples of {factor}; got {tuple(x.shape[-2:])}. "
                             f"Resize or crop the image first.")
        moments = self.encoder(x)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self._check(z, self.config.latent_channels, "The latents")
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample_posterior: bool = False, generator=None) -> torch.Tensor:
        posterior = self.encode(x)
        return self.decode(posterior.sample(generator) if sample_posterior else posterior.mode())
