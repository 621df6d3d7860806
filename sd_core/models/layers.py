"""Building blocks shared by the VAE, UNet and DiT.

Attribute names mirror diffusers' parameter names (`to_q`, `to_out.0`, `time_emb_proj`, ...) so the
reference state_dicts load with `strict=True` and no mapping table.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_BACKENDS = ("sdpa", "math")


def timestep_embedding(timesteps: torch.Tensor, dim: int, flip_sin_to_cos: bool, downscale_freq_shift: float,
                       max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) timesteps: [sin, cos], or [cos, sin] when `flip_sin_to_cos`.

    Frequencies are exp(-log(max_period) * i / (half - downscale_freq_shift)): the UNet uses shift 0,
    diffusers' DiT shift 1 (the original DiT code divides by `half`, i.e. shift 0).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device)
    frequencies = torch.exp(exponent / (half - downscale_freq_shift))
    angles = timesteps[:, None].float() * frequencies[None, :]  # (B, half)
    sin, cos = torch.sin(angles), torch.cos(angles)
    embedding = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return F.pad(embedding, (0, dim % 2))


def broadcast_timesteps(timestep, batch_size: int, device) -> torch.Tensor:
    """Accept an int, float, 0-d or per-batch tensor and return a (batch_size,) tensor."""
    if not torch.is_tensor(timestep):
        dtype = torch.float32 if isinstance(timestep, float) else torch.int64
        timestep = torch.tensor([timestep], dtype=dtype, device=device)
    timestep = timestep.to(device).reshape(-1)
    if timestep.numel() not in (1, batch_size):
        raise ValueError(f"Got {timestep.numel()} timesteps for a batch of {batch_size}; pass one or one per sample.")
    return timestep.expand(batch_size)


class TimestepEmbedding(nn.Module):
    """MLP on the sinusoidal embedding: linear_1 -> SiLU -> linear_2."""

    def __init__(self, in_channels: int, time_embed_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


def attend(q, k, v, heads: int, mask=None, upcast: bool = False, backend: str = "sdpa", causal: bool = False):
    """Multi-head scaled dot-product attention on (B, N, heads * d) tensors.

    `math` is the parity reference (softmax in fp32 when `upcast`); `sdpa` is PyTorch's fused kernel.
    `mask` is boolean (True = attend) or additive, broadcastable to (B, heads, N, M). `causal` adds the
    lower-triangular mask; with no other mask SDPA gets `is_causal=True` instead (as transformers calls it).
    """
    batch = q.shape[0]
    q, k, v = (t.reshape(batch, t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, heads, N, d)
    if causal and (mask is not None or backend != "sdpa"):
        causal_mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool, device=q.device).tril()
        mask, causal = causal_mask if mask is None else causal_mask & mask, False
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    elif backend == "math":
        out = probabilities(q, k, mask, upcast).to(v.dtype) @ v
    else:
        raise ValueError(f"Unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}.")
    return out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[3])


def probabilities(q, k, mask=None, upcast: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) on (B, heads, N, d) tensors: the math path's attention weights (B, heads, N, M)."""
    scores = (q.float() @ k.float().transpose(-1, -2)) if upcast else (q @ k.transpose(-1, -2))
    scores = scores * q.shape[-1] ** -0.5
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores.float().softmax(dim=-1) if upcast else scores.softmax(dim=-1)


def set_attention_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switch every attention layer in `model` to `sdpa` (fast) or `math` (reference)."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"Unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}.")
    for module in model.modules():
        if hasattr(module, "attention_backend"):
            module.attention_backend = backend
    return model


class Attention(nn.Module):
    """Self- or cross-attention with diffusers' names: to_q, to_k, to_v, to_out.0."""

    def __init__(self, query_dim: int, heads: int, dim_head: int, cross_attention_dim: int | None = None,
                 bias: bool = False, upcast: bool = False):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = cross_attention_dim or query_dim
        self.heads, self.upcast, self.attention_backend = heads, upcast, "sdpa"
        self.recorder = None  # recorder(probabilities (B, heads, N, M)): set by an analysis (the Lab's DAAM)
        self.to_q = nn.Linear(query_dim, inner_dim, bias=bias)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner_dim, query_dim)])

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        if self.recorder is not None:  # the weights as the math path computes them; the output is unchanged
            self.recorder(probabilities(*(t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)
                                          for t in (q, k)), upcast=self.upcast))
        return self.to_out[0](attend(q, k, v, self.heads, upcast=self.upcast, backend=self.attention_backend))


class ResnetBlock2D(nn.Module):
    """GroupNorm -> SiLU -> conv, (+ time embedding), GroupNorm -> SiLU -> conv, plus a (1x1) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, temb_channels: int | None, groups: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        if temb_channels is not None:
            self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        if temb is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = self.conv_shortcut(x) if hasattr(self, "conv_shortcut") else x
        return shortcut + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv. padding=1 pads symmetrically (UNet); padding=0 pads (0,1,0,1) first (VAE encoder)."""

    def __init__(self, channels: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))  # right and bottom only: the original LDM encoder's asymmetric pad
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        """`size`: the skip connection's size, when the latent was not divisible all the way down (as diffusers)."""
        if size is not None and tuple(size) != (2 * x.shape[2], 2 * x.shape[3]):
            return self.conv(F.interpolate(x, size=tuple(size), mode="nearest"))
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class GEGLU(nn.Module):
    """Gated linear unit with exact GELU: proj(x) = [h, gate] -> h * gelu(gate)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class GELU(nn.Module):
    """Linear then GELU; `approximate="tanh"` is DiT's variant."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str = "none"):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x):
        return F.gelu(self.proj(x), approximate=self.approximate)


FEED_FORWARD_ACTIVATIONS = {
    "geglu": GEGLU,
    "gelu": GELU,
    "gelu-approximate": lambda dim_in, dim_out: GELU(dim_in, dim_out, approximate="tanh"),
}


class FeedForward(nn.Module):
    """net.0: activation projection, net.1: dropout (identity at inference), net.2: output linear."""

    def __init__(self, dim: int, activation_fn: str = "geglu", mult: int = 4):
        super().__init__()
        if activation_fn not in FEED_FORWARD_ACTIVATIONS:
            raise ValueError(f"Unknown activation_fn {activation_fn!r}; sd_core supports {sorted(FEED_FORWARD_ACTIVATIONS)}.")
        inner_dim = dim * mult
        self.net = nn.ModuleList([
            FEED_FORWARD_ACTIVATIONS[activation_fn](dim, inner_dim), nn.Dropout(0.0), nn.Linear(inner_dim, dim)
        ])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention on the text, then a GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, dim_head: int, cross_attention_dim: int, upcast_attention: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head, upcast=upcast_attention)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, cross_attention_dim, upcast=upcast_attention)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, "geglu")

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm (eps 1e-6) -> proj_in -> transformer blocks on H*W tokens -> proj_out, plus the residual.

    proj_in/proj_out are 1x1 convs (SD1) or linears on the tokens (SD2/SDXL, `use_linear_projection`).
    """

    def __init__(self, heads: int, dim_head: int, in_channels: int, num_layers: int, cross_attention_dim: int,
                 norm_num_groups: int, use_linear_projection: bool, upcast_attention: bool):
        super().__init__()
        inner_dim = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6)
        make_projection = nn.Linear if use_linear_projection else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = make_projection(in_channels, inner_dim)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(inner_dim, heads, dim_head, cross_attention_dim, upcast_attention)
            for _ in range(num_layers)
        ])
        self.proj_out = make_projection(inner_dim, in_channels)

    def forward(self, x, context):
        batch, _, height, width = x.shape
        h = self.norm(x)
        if not self.use_linear_projection:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(batch, height * width, -1)  # (B, C, H, W) -> (B, HW, C)
        if self.use_linear_projection:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.use_linear_projection:
            h = self.proj_out(h)
        h = h.reshape(batch, height, width, -1).permute(0, 3, 1, 2).contiguous()
        if not self.use_linear_projection:
            h = self.proj_out(h)
        return h + x
