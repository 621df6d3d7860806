"""UNet2DConditionModel: the denoiser of SD 1.x, 2.x and XL, built in loops over a diffusers config.

conv_in -> down blocks (ResNets, optional cross-attention transformers, stride-2 downsample) -> mid
block -> up blocks (each ResNet also eats the matching down-path skip) -> GroupNorm/SiLU/conv_out.
The timestep (and, for SDXL, the pooled text embedding plus six size/crop ids) enter every ResNet
through a time embedding; the text enters every transformer through cross-attention.
"""
import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from sd_core.config import ModelConfig, per_block
from sd_core.models.layers import (Downsample2D, ResnetBlock2D, TimestepEmbedding, Transformer2DModel, Upsample2D,
                     broadcast_timesteps, timestep_embedding)

DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")


@dataclasses.dataclass
class UNet2DConditionConfig(ModelConfig):
    size_bounds = {"sample_size": (1, 1024), "in_channels": (1, 64), "out_channels": (1, 64),
                   "block_out_channels": (1, 8192), "layers_per_block": (1, 16), "norm_num_groups": (1, 1024),
                   "cross_attention_dim": (1, 16384), "transformer_layers_per_block": (1, 64),
                   "attention_head_dim": (1, 4096), "num_attention_heads": (1, 1024),
                   "addition_time_embed_dim": (1, 4096), "projection_class_embeddings_input_dim": (1, 65536),
                   "num_class_embeds": (1, 1_000_000), "time_embedding_dim": (1, 16384)}
    sample_size: int | None = None
    in_channels: int = 4  # 9 for inpainting: latents, mask, masked-image latents
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    only_cross_attention: bool = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int | tuple = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | tuple = 1280
    transformer_layers_per_block: int | tuple = 1
    reverse_transformer_layers_per_block: tuple | None = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | tuple = 8  # diffusers' historical misnomer: this is the number of heads
    num_attention_heads: int | tuple | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: str | None = None
    addition_embed_type: str | None = None  # "text_time" for SDXL
    addition_time_embed_dim: int | None = None
    num_class_embeds: int | None = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    time_embedding_act_fn: str | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None
    addition_embed_type_num_heads: int = 64
    inert_keys = frozenset({"dropout"})

    def __post_init__(self):
        unsupported = {  # field: the only value sd_core implements (the one every SD 1/2/XL release uses)
            "only_cross_attention": False, "dual_cross_attention": False, "class_embed_type": None,
            "num_class_embeds": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
            "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
            "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
            "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
            "attention_type": "default", "class_embeddings_concat": False, "cross_attention_norm": None,
            "act_fn": "silu", "mid_block_scale_factor": 1.0, "reverse_transformer_layers_per_block": None,
        }
        for name, value in unsupported.items():
            self.require(getattr(self, name) == value, f"{name}={getattr(self, name)!r} is not supported "
                                                       f"(sd_core implements {value!r}).")
        self.require(self.addition_embed_type in (None, "text_time"),
                     f"addition_embed_type={self.addition_embed_type!r} is not supported (None or 'text_time').")
        self.require(self.mid_block_type in (None, "UNetMidBlock2DCrossAttn"),
                     f"mid_block_type={self.mid_block_type!r} is not supported.")
        n = len(self.block_out_channels)
        self.require(len(self.down_block_types) == n and len(self.up_block_types) == n,
                     "down_block_types, up_block_types and block_out_channels must have the same length.")
        self.require(set(self.down_block_types) <= set(DOWN_BLOCKS), f"down_block_types must be in {DOWN_BLOCKS}.")
        self.require(set(self.up_block_types) <= set(UP_BLOCKS), f"up_block_types must be in {UP_BLOCKS}.")


class DownBlock(nn.Module):
    """`layers` x (ResNet [+ transformer]) then an optional stride-2 downsample; returns every output as a skip."""

    def __init__(self, in_channels, out_channels, temb_channels, layers, attention, downsample, c, heads,
                 transformer_layers, cross_attention_dim):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels, c.norm_num_groups,
                          c.norm_eps) for i in range(layers)
        ])
        self.attentions = nn.ModuleList([
            Transformer2DModel(heads, out_channels // heads, out_channels, transformer_layers, cross_attention_dim,
                               c.norm_num_groups, c.use_linear_projection, c.upcast_attention) for _ in range(layers)
        ] if attention else [])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, c.downsample_padding)] if downsample else [])

    def forward(self, x, temb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions:
                x = self.attentions[i](x, context)
            skips.append(x)
        for downsampler in self.downsamplers:
            x = downsampler(x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    """`layers` x (concat a skip, ResNet [+ transformer]) then an optional nearest x2 upsample."""

    def __init__(self, in_channels, prev_output_channels, out_channels, temb_channels, layers, attention, upsample,
                 c, heads, transformer_layers, cross_attention_dim):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D((prev_output_channels if i == 0 else out_channels)
                          + (in_channels if i == layers - 1 else out_channels),
                          out_channels, temb_channels, c.norm_num_groups, c.norm_eps) for i in range(layers)
        ])
        self.attentions = nn.ModuleList([
            Transformer2DModel(heads, out_channels // heads, out_channels, transformer_layers, cross_attention_dim,
                               c.norm_num_groups, c.use_linear_projection, c.upcast_attention) for _ in range(layers)
        ] if attention else [])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)] if upsample else [])

    def forward(self, x, skips, temb, context):
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions:
                x = self.attentions[i](x, context)
        for upsampler in self.upsamplers:
            x = upsampler(x, size=skips[-1].shape[2:])  # odd latent sizes: back to the next skip's size
        return x


class MidBlock(nn.Module):
    """ResNet, then (transformer, ResNet) pairs at the lowest resolution."""

    def __init__(self, channels, temb_channels, c, heads, transformer_layers, cross_attention_dim):
        super().__init__()
        self.attentions = nn.ModuleList([
            Transformer2DModel(heads, channels // heads, channels, transformer_layers, cross_attention_dim,
                               c.norm_num_groups, c.use_linear_projection, c.upcast_attention)
        ])
        self.resnets = nn.ModuleList([
            ResnetBlock2D(channels, channels, temb_channels, c.norm_num_groups, c.norm_eps) for _ in range(2)
        ])

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        for attention, resnet in zip(self.attentions, self.resnets[1:]):
            x = resnet(attention(x, context), temb)
        return x


class UNet2DConditionModel(nn.Module):
    """(sample (B, in_channels, h, w), timestep, encoder_hidden_states (B, N, cross_attention_dim)) -> (B, out_channels, h, w)."""

    def __init__(self, config: UNet2DConditionConfig):
        super().__init__()
        c = self.config = config
        n = len(c.block_out_channels)
        channels = list(c.block_out_channels)
        heads = per_block(c.num_attention_heads or c.attention_head_dim, n, "attention_head_dim")
        layers = per_block(c.layers_per_block, n, "layers_per_block")
        depth = per_block(c.transformer_layers_per_block, n, "transformer_layers_per_block")
        context_dims = per_block(c.cross_attention_dim, n, "cross_attention_dim")
        temb_channels = channels[0] * 4

        self.conv_in = nn.Conv2d(c.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb_channels)
        if c.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, temb_channels)

        self.down_blocks = nn.ModuleList([
            DownBlock(channels[max(i - 1, 0)], channels[i], temb_channels, layers[i],
                      c.down_block_types[i] == "CrossAttnDownBlock2D", i < n - 1, c, heads[i], depth[i],
                      context_dims[i])
            for i in range(n)
        ])
        if c.mid_block_type is not None:
            self.mid_block = MidBlock(channels[-1], temb_channels, c, heads[-1], depth[-1], context_dims[-1])

        up = list(reversed(range(n)))  # block index on the way down, for each up block
        self.up_blocks = nn.ModuleList([
            UpBlock(channels[up[min(i + 1, n - 1)]], channels[up[max(i - 1, 0)]], channels[up[i]], temb_channels,
                    layers[up[i]] + 1, c.up_block_types[i] == "CrossAttnUpBlock2D", i < n - 1, c, heads[up[i]],
                    depth[up[i]], context_dims[up[i]])
            for i in range(n)
        ])
        self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, channels[0], eps=c.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], c.out_channels, 3, padding=1)

    @classmethod
    def from_config(cls, config: dict) -> "UNet2DConditionModel":
        return cls(UNet2DConditionConfig.from_dict(config))

    def check_inputs(self, sample, encoder_hidden_states, added_cond_kwargs):
        c = self.config
        if sample.ndim != 4 or sample.shape[1] != c.in_channels:
            raise ValueError(f"sample must be (batch, {c.in_channels}, height, width); got {tuple(sample.shape)}.")
        context_dim = per_block(c.cross_attention_dim, len(c.block_out_channels), "cross_attention_dim")[0]
        if encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[-1] != context_dim:
            raise ValueError(f"encoder_hidden_states must be (batch, tokens, {context_dim}); "
                             f"got {tuple(encoder_hidden_states.shape)}.")
        if c.addition_embed_type == "text_time":
            if not added_cond_kwargs or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
                raise ValueError("This SDXL-style UNet (addition_embed_type='text_time') needs added_cond_kwargs="
                                 "{'text_embeds': pooled text embedding (B, D), 'time_ids': (B, 6) size/crop ids}.")

    def time_conditioning(self, timestep, batch: int, dtype, device, added_cond_kwargs=None) -> torch.Tensor:
        c = self.config
        t = broadcast_timesteps(timestep, batch, device)
        t_emb = timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift).to(dtype)
        emb = self.time_embedding(t_emb)
        if c.addition_embed_type == "text_time":
            text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
            time_embeds = timestep_embedding(time_ids.flatten(), c.addition_time_embed_dim, c.flip_sin_to_cos,
                                             c.freq_shift).reshape(text_embeds.shape[0], -1)  # (B, 6 * 256)
            emb = emb + self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype))
        return emb

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs=None,
                down_block_additional_residuals=None, mid_block_additional_residual=None) -> torch.Tensor:
        """The two residuals are a ControlNet's outputs (diffusers' names): added to every skip and to the mid
        block's output."""
        self.check_inputs(sample, encoder_hidden_states, added_cond_kwargs)
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = self.time_conditioning(timestep, sample.shape[0], sample.dtype, sample.device, added_cond_kwargs)
        return self.blocks(sample, emb, encoder_hidden_states, down_block_additional_residuals,
                           mid_block_additional_residual)[0]

    def blocks(self, sample, emb, encoder_hidden_states, down_residuals=None, mid_residual=None):
        """conv_in, the down blocks (keeping their skips), the mid block, the up blocks, the output conv; also
        returns the last up block's input (the deep features DeepCache reuses, sd_core.fast.pipeline)."""
        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, emb, encoder_hidden_states)
            skips.extend(block_skips)
        if (down_residuals is None) != (mid_residual is None) or (down_residuals is not None
                                                                  and len(down_residuals) != len(skips)):
            raise ValueError(f"A ControlNet's residuals come as a pair: down_block_additional_residuals ("
                             f"{len(skips)} tensors, one per skip) and mid_block_additional_residual; pass both.")
        if down_residuals is not None:
            skips = [skip + residual for skip, residual in zip(skips, down_residuals)]
        if self.config.mid_block_type is not None:
            x = self.mid_block(x, emb, encoder_hidden_states)
        if mid_residual is not None:
            x = x + mid_residual
        for block in self.up_blocks[:-1]:
            x = block(x, skips, emb, encoder_hidden_states)
        deep = x
        x = self.up_blocks[-1](x, skips, emb, encoder_hidden_states)
        return self.conv_out(F.silu(self.conv_norm_out(x))), deep
