"""ControlNetModel (Zhang, Rao & Agrawala 2023): a trainable copy of the UNet's encoder, steered by an image.

The paper's block equation, for the locked UNet block F(.; Θ) and its trainable copy F(.; Θc):

    y_c = F(x; Θ) + Z(F(x + Z(c; Θz1); Θc); Θz2)

Here, for the whole encoder at once: the hint c (an edge map, a pose, a depth map) goes through a small conv
encoder E whose last conv is zero-initialised (`controlnet_cond_embedding`, Z(c; Θz1)) and is added to the
copy's `conv_in(x)`; the copy (`down_blocks`, `mid_block`: the UNet's own blocks, loaded from the UNet at the
start of training) runs on that sum; every feature map the UNet keeps as a skip, and the mid block's output,
goes through its own zero-initialised 1x1 conv (`controlnet_down_blocks`, `controlnet_mid_block`, Z(.; Θz2)).
The UNet adds these residuals to its skips and mid block (its `down_block_additional_residuals` and
`mid_block_additional_residual`), which is the `F(x; Θ) +` of the equation. At initialisation every Z is zero,
so the ControlNet changes nothing until it has learned something.
"""
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from sd_core.config import ModelConfig, per_block
from sd_core.models.layers import TimestepEmbedding
from sd_core.models.unet import DOWN_BLOCKS, DownBlock, MidBlock, UNet2DConditionConfig, UNet2DConditionModel


@dataclasses.dataclass
class ControlNetConfig(ModelConfig):
    size_bounds = {**UNet2DConditionConfig.size_bounds, "conditioning_channels": (1, 64),
                   "conditioning_embedding_out_channels": (1, 4096),
                   "transformer_layers_per_block": (0, 64)}  # 0: SDXL's mid and small ControlNets
    in_channels: int = 4
    conditioning_channels: int = 3  # the hint image's channels
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    only_cross_attention: bool = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 1280
    transformer_layers_per_block: int | tuple = 1
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple = 8  # diffusers' historical misnomer: this is the number of heads
    num_attention_heads: int | tuple | None = None
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None  # "text_time" for SDXL
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    projection_class_embeddings_input_dim: int | None = None
    controlnet_conditioning_channel_order: str = "rgb"  # "bgr": the hint's channels are flipped first
    conditioning_embedding_out_channels: tuple = (16, 32, 96, 256)  # E's widths; each step after the first halves
    global_pool_conditions: bool = False  # residuals averaged over space (the shuffle ControlNet)
    addition_embed_type_num_heads: int = 64  # read only by addition_embed_type="text", which sd_core refuses

    def __post_init__(self):
        unsupported = {  # field: the only value sd_core implements (the one every SD 1/2/XL ControlNet uses)
            "only_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
            "class_embed_type": None, "num_class_embeds": None, "resnet_time_scale_shift": "default",
            "act_fn": "silu", "mid_block_scale_factor": 1.0, "mid_block_type": "UNetMidBlock2DCrossAttn",
        }
        for name, value in unsupported.items():
            self.require(getattr(self, name) == value, f"{name}={getattr(self, name)!r} is not supported "
                                                       f"(sd_core implements {value!r}).")
        self.require(self.addition_embed_type in (None, "text_time"),
                     f"addition_embed_type={self.addition_embed_type!r} is not supported (None or 'text_time').")
        self.require(self.controlnet_conditioning_channel_order in ("rgb", "bgr"),
                     f"controlnet_conditioning_channel_order={self.controlnet_conditioning_channel_order!r} must be "
                     f"'rgb' or 'bgr'.")
        self.require(len(self.down_block_types) == len(self.block_out_channels),
                     "down_block_types and block_out_channels must have the same length.")
        self.require(set(self.down_block_types) <= set(DOWN_BLOCKS), f"down_block_types must be in {DOWN_BLOCKS}.")
        self.require(isinstance(self.layers_per_block, int), "layers_per_block must be one number (as in diffusers).")
        self.require(len(self.conditioning_embedding_out_channels or ()) >= 1,
                     "conditioning_embedding_out_channels needs at least one width.")

    @property
    def hint_downscale(self) -> int:
        """How much larger than the latent the hint image is: each of E's stride-2 convs halves it."""
        return 2 ** (len(self.conditioning_embedding_out_channels) - 1)


class ControlNetConditioningEmbedding(nn.Module):
    """E(c): conv_in, then (3x3 conv, stride-2 3x3 conv) per width step, each followed by SiLU, then conv_out,
    zero-initialised, to the UNet's first width. The paper's 4x4 stride-2 convs became 3x3 in the release."""

    def __init__(self, conditioning_embedding_channels: int, conditioning_channels: int, block_out_channels):
        super().__init__()
        widths = list(block_out_channels)
        self.conv_in = nn.Conv2d(conditioning_channels, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            self.blocks.append(nn.Conv2d(width_in, width_in, 3, padding=1))
            self.blocks.append(nn.Conv2d(width_in, width_out, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(widths[-1], conditioning_embedding_channels, 3, padding=1)

    def forward(self, conditioning):
        h = F.silu(self.conv_in(conditioning))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


def zero_conv(channels: int) -> nn.Conv2d:
    """Z: a 1x1 conv the ControlNet's output passes through (zero at initialisation, see `zero_init`)."""
    return nn.Conv2d(channels, channels, 1)


class ControlNetModel(nn.Module):
    """(sample, timestep, encoder_hidden_states, controlnet_cond (B, C, 8h, 8w)) -> (down residuals, mid residual)."""

    # The time (and SDXL size/text) conditioning and the input checks are the UNet's own: same config fields,
    # same module names (time_embedding, add_embedding).
    time_conditioning = UNet2DConditionModel.time_conditioning
    check_unet_inputs = UNet2DConditionModel.check_inputs

    def __init__(self, config: ControlNetConfig):
        super().__init__()
        c = self.config = config
        n = len(c.block_out_channels)
        channels = list(c.block_out_channels)
        heads = per_block(c.num_attention_heads or c.attention_head_dim, n, "attention_head_dim")
        depth = per_block(c.transformer_layers_per_block, n, "transformer_layers_per_block")
        temb_channels = channels[0] * 4

        self.conv_in = nn.Conv2d(c.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb_channels)
        if c.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, temb_channels)
        self.controlnet_cond_embedding = ControlNetConditioningEmbedding(channels[0], c.conditioning_channels,
                                                                         c.conditioning_embedding_out_channels)
        # The trainable copy of the UNet's encoder: the UNet's own block classes, so its weights load as they are.
        self.down_blocks = nn.ModuleList([
            DownBlock(channels[max(i - 1, 0)], channels[i], temb_channels, c.layers_per_block,
                      c.down_block_types[i] == "CrossAttnDownBlock2D", i < n - 1, c, heads[i], depth[i],
                      c.cross_attention_dim)
            for i in range(n)
        ])
        self.mid_block = MidBlock(channels[-1], temb_channels, c, heads[-1], depth[-1], c.cross_attention_dim)
        # One zero conv per UNet skip: conv_in's output, each resnet's, each downsampler's.
        skip_channels = [channels[0]] + [channels[i] for i in range(n)
                                         for _ in range(c.layers_per_block + (i < n - 1))]
        self.controlnet_down_blocks = nn.ModuleList([zero_conv(width) for width in skip_channels])
        self.controlnet_mid_block = zero_conv(channels[-1])
        self.zero_init()

    @torch.no_grad()
    def zero_init(self):
        """Zero every Z (the hint encoder's last conv and the output 1x1 convs): an untrained ControlNet adds
        nothing to the UNet, and the first gradient steps cannot push noise into it."""
        for module in [self.controlnet_cond_embedding.conv_out, *self.controlnet_down_blocks, self.controlnet_mid_block]:
            for parameter in module.parameters():
                parameter.zero_()

    @classmethod
    def from_config(cls, config: dict) -> "ControlNetModel":
        return cls(ControlNetConfig.from_dict(config))

    @classmethod
    def from_unet(cls, unet: UNet2DConditionModel, conditioning_channels: int = 3,
                  conditioning_embedding_out_channels=(16, 32, 96, 256)) -> "ControlNetModel":
        """The paper's start of training: the copy's weights are the UNet's, every Z is zero."""
        shared_fields = {f.name for f in dataclasses.fields(ControlNetConfig)}
        config = {k: v for k, v in unet.config.to_dict().items() if k in shared_fields}
        controlnet = cls.from_config({**config, "conditioning_channels": conditioning_channels,
                                      "conditioning_embedding_out_channels": conditioning_embedding_out_channels})
        copied = {k: v for k, v in unet.state_dict().items()
                  if k.split(".")[0] in ("conv_in", "time_embedding", "add_embedding", "down_blocks", "mid_block")}
        controlnet.load_state_dict({**controlnet.state_dict(), **copied}, strict=True)  # E and the Zs keep their init
        weight = next(unet.parameters())
        return controlnet.to(device=weight.device, dtype=weight.dtype)

    def check_fits(self, unet: UNet2DConditionModel):
        """Refuse, before any step, a ControlNet made for another UNet (an SDXL ControlNet on SD 1.5): its residuals
        must have the UNet's skip widths and its text and size conditioning must be the UNet's."""
        ours, theirs = self.config, unet.config
        levels = len(theirs.block_out_channels)
        unet_context = per_block(theirs.cross_attention_dim, levels, "cross_attention_dim")[0]
        mismatches = [name for name, mine, its in [
            ("cross_attention_dim", ours.cross_attention_dim, unet_context),
            ("block_out_channels", list(ours.block_out_channels), list(theirs.block_out_channels)),
            ("layers_per_block", [ours.layers_per_block] * len(ours.block_out_channels),
             per_block(theirs.layers_per_block, levels, "layers_per_block")),
            ("addition_embed_type", ours.addition_embed_type, theirs.addition_embed_type)] if mine != its]
        if mismatches:
            family = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
            raise ValueError(f"This ControlNet, made for {family.get(ours.cross_attention_dim, 'other')} models, does "
                             f"not fit this {family.get(unet_context, 'other')} model's UNet (its "
                             f"{', '.join(mismatches)} differ). Choose a ControlNet made for this model's family.")

    def check_inputs(self, sample, encoder_hidden_states, controlnet_cond, added_cond_kwargs):
        self.check_unet_inputs(sample, encoder_hidden_states, added_cond_kwargs)
        c = self.config
        expected = (c.conditioning_channels, sample.shape[2] * c.hint_downscale, sample.shape[3] * c.hint_downscale)
        if controlnet_cond.ndim != 4 or tuple(controlnet_cond.shape[1:]) != expected:
            raise ValueError(f"controlnet_cond must be (batch, {expected[0]}, {expected[1]}, {expected[2]}): the "
                             f"control image at {c.hint_downscale}x the latent's size; got "
                             f"{tuple(controlnet_cond.shape)}. Prepare it with sd_core.pipelines.control_images.")

    def forward(self, sample, timestep, encoder_hidden_states, controlnet_cond, conditioning_scale: float = 1.0,
                added_cond_kwargs=None, guess_mode: bool = False) -> tuple[tuple, torch.Tensor]:
        self.check_inputs(sample, encoder_hidden_states, controlnet_cond, added_cond_kwargs)
        emb = self.time_conditioning(timestep, sample.shape[0], sample.dtype, sample.device, added_cond_kwargs)
        if self.config.controlnet_conditioning_channel_order == "bgr":
            controlnet_cond = controlnet_cond.flip(1)
        x = self.conv_in(sample) + self.controlnet_cond_embedding(controlnet_cond)  # x + Z(c; Θz1)
        features = [x]  # F(.; Θc): the copy's feature maps, where the UNet keeps its skips
        for block in self.down_blocks:
            x, block_features = block(x, emb, encoder_hidden_states)
            features.extend(block_features)
        x = self.mid_block(x, emb, encoder_hidden_states)
        down = [zero(f) for zero, f in zip(self.controlnet_down_blocks, features)]  # Z(.; Θz2)
        return self.scale(down, self.controlnet_mid_block(x), conditioning_scale, guess_mode)

    def scale(self, down: list, mid: torch.Tensor, conditioning_scale: float, guess_mode: bool):
        """Every residual times `conditioning_scale`; in guess mode (the ControlNet sees the image but not the
        prompt's guidance) the scale grows from 0.1 at the first skip to 1 at the mid block, log-spaced, as
        diffusers does. `global_pool_conditions`: each residual averaged over space."""
        if guess_mode and not self.config.global_pool_conditions:
            scales = torch.logspace(-1, 0, len(down) + 1, device=mid.device) * conditioning_scale
        else:
            scales = [conditioning_scale] * (len(down) + 1)
        down = [residual * s for residual, s in zip(down, scales)]
        mid = mid * scales[-1]
        if self.config.global_pool_conditions:
            down = [residual.mean(dim=(2, 3), keepdim=True) for residual in down]
            mid = mid.mean(dim=(2, 3), keepdim=True)
        return tuple(down), mid
