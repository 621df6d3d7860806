"""DiT: Scalable Diffusion Models with Transformers (Peebles & Xie), in diffusers' parameter names.

Patchify the latent, add a fixed 2-D sin-cos position embedding, run adaLN-Zero transformer blocks
conditioned on timestep + class label, modulate and project each token back to a patch, unpatchify.
With learned sigma the output has 2x the input channels: noise prediction and variance interpolation.
"""
import dataclasses
import functools

import torch
import torch.nn.functional as F
from torch import nn

from sd_core.config import ModelConfig
from sd_core.models.layers import Attention, FeedForward, TimestepEmbedding, broadcast_timesteps, timestep_embedding

# The paper's model sizes: (depth, hidden size, heads).
DIT_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
# `downscale_freq_shift` of `timestep_embedding` for each DiTConfig.timestep_frequencies: the divisor is half - shift.
TIMESTEP_FREQUENCY_SHIFT = {"diffusers": 1, "original": 0}


@dataclasses.dataclass
class DiTConfig(ModelConfig):
    size_bounds = {"num_attention_heads": (1, 1024), "attention_head_dim": (1, 4096), "in_channels": (1, 64),
                   "out_channels": (1, 128), "num_layers": (1, 256), "sample_size": (1, 1024), "patch_size": (1, 64),
                   "num_embeds_ada_norm": (1, 1_000_000)}
    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int | None = None  # 2 * in_channels with learned sigma
    num_layers: int = 28
    norm_num_groups: int = 32  # unused by DiT, kept so diffusers configs load
    attention_bias: bool = True
    sample_size: int = 32  # latent size the position embedding was made for
    patch_size: int = 2
    activation_fn: str = "gelu-approximate"
    num_embeds_ada_norm: int = 1000  # number of classes; id num_embeds_ada_norm is the null class
    upcast_attention: bool = False
    norm_type: str = "ada_norm_zero"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-5
    # Timestep frequencies exp(-ln(10000) * i / divisor), i < half = 128: "diffusers" divides by half - 1
    # (diffusers' DiT), "original" by half (facebookresearch/DiT, whose released weights were trained so).
    # Not a diffusers field: saved only when "original" (diffusers then warns and ignores it).
    timestep_frequencies: str = "diffusers"
    inert_keys = frozenset({"dropout"})
    # Older DiT folders (facebook/DiT-XL-2-*) use the generic Transformer2DModel config: its extra
    # fields are accepted only at the values that make it a DiT.
    legacy_fields = {"cross_attention_dim": None, "use_linear_projection": False, "only_cross_attention": False,
                     "double_self_attention": False, "num_vector_embeds": None, "attention_type": "default",
                     "caption_channels": None, "interpolation_scale": None, "use_additional_conditions": None}

    @classmethod
    def from_dict(cls, config):
        config = dict(config)
        for name, neutral in cls.legacy_fields.items():
            if name in config and config.pop(name) != neutral:
                raise ValueError(f"DiTConfig: a DiT has {name}={neutral!r}; this config is for another transformer.")
        return super().from_dict(config)

    def __post_init__(self):
        self.require(self.norm_type == "ada_norm_zero", f"norm_type={self.norm_type!r} is not supported.")
        self.require(self.timestep_frequencies in TIMESTEP_FREQUENCY_SHIFT,
                     f"timestep_frequencies={self.timestep_frequencies!r}; choose one of "
                     f"{sorted(TIMESTEP_FREQUENCY_SHIFT)} (\"original\" for facebookresearch/DiT checkpoints).")
        self.out_channels = self.out_channels or self.in_channels

    def to_dict(self) -> dict:
        """The config as diffusers writes it: `timestep_frequencies` only where it departs from diffusers."""
        config = super().to_dict()
        if config["timestep_frequencies"] == "diffusers":
            del config["timestep_frequencies"]
        return config

    @property
    def hidden_size(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def null_class(self) -> int:
        return self.num_embeds_ada_norm


def dit_config(name: str = "DiT-XL/2", image_size: int = 256, num_classes: int = 1000, learn_sigma: bool = True) -> dict:
    """diffusers config of a named DiT size, e.g. `dit_config("DiT-B/4", image_size=512)`."""
    size, _, patch = name.removeprefix("DiT-").partition("/")
    if size not in DIT_SIZES or patch not in ("2", "4", "8"):
        raise ValueError(f"Unknown DiT size {name!r}; choose DiT-{{{','.join(DIT_SIZES)}}}/{{2,4,8}}.")
    depth, hidden, heads = DIT_SIZES[size]
    return {"num_attention_heads": heads, "attention_head_dim": hidden // heads, "num_layers": depth,
            "patch_size": int(patch), "sample_size": image_size // 8, "in_channels": 4,
            "out_channels": 8 if learn_sigma else 4, "num_embeds_ada_norm": num_classes}


@functools.lru_cache(maxsize=16)
def sincos_position_embedding(dim: int, height: int, width: int, base_size: int) -> torch.Tensor:
    """(height * width, dim): first half encodes the column, second half the row, each [sin, cos] (float64 math)."""
    def embed_1d(positions):
        omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4.0))
        angles = torch.outer(positions.double(), omega)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    rows = torch.arange(height, dtype=torch.float32) / (height / base_size)
    cols = torch.arange(width, dtype=torch.float32) / (width / base_size)
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")
    return torch.cat([embed_1d(grid_cols.reshape(-1)), embed_1d(grid_rows.reshape(-1))], dim=1).float()


class PatchEmbed(nn.Module):
    def __init__(self, c: DiTConfig):
        super().__init__()
        self.patch_size, self.base_size = c.patch_size, c.sample_size // c.patch_size
        self.proj = nn.Conv2d(c.in_channels, c.hidden_size, c.patch_size, stride=c.patch_size)

    def forward(self, x):
        height, width = x.shape[2] // self.patch_size, x.shape[3] // self.patch_size
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, hw, D)
        position = sincos_position_embedding(tokens.shape[-1], height, width, self.base_size).to(tokens.device)
        return (tokens + position).to(tokens.dtype)


class LabelEmbedding(nn.Module):
    """One vector per class, plus the null class (id num_classes) used for classifier-free guidance."""

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)


class CombinedTimestepLabelEmbeddings(nn.Module):
    def __init__(self, c: DiTConfig):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, c.hidden_size)
        self.class_embedder = LabelEmbedding(c.num_embeds_ada_norm, c.hidden_size)
        self.frequency_shift = TIMESTEP_FREQUENCY_SHIFT[c.timestep_frequencies]

    def forward(self, timestep, class_labels, dtype):
        # [cos, sin] in both conventions; they differ only in the frequency divisor (DiTConfig.timestep_frequencies).
        t = timestep_embedding(timestep, 256, flip_sin_to_cos=True, downscale_freq_shift=self.frequency_shift).to(dtype)
        return self.timestep_embedder(t) + self.class_embedder.embedding_table(class_labels)


class AdaLayerNormZero(nn.Module):
    """Conditioning -> SiLU -> linear into six (shift, scale, gate) vectors; a LayerNorm without affine."""

    def __init__(self, c: DiTConfig):
        super().__init__()
        self.emb = CombinedTimestepLabelEmbeddings(c)
        self.linear = nn.Linear(c.hidden_size, 6 * c.hidden_size)
        self.norm = nn.LayerNorm(c.hidden_size, elementwise_affine=False, eps=1e-6)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    """x += gate * attention(modulated norm(x)); x += gate * mlp(modulated norm(x)). Each block embeds the
    conditioning with its own copy of the embedders, as diffusers stores them."""

    def __init__(self, c: DiTConfig):
        super().__init__()
        self.norm1 = AdaLayerNormZero(c)
        self.attn1 = Attention(c.hidden_size, c.num_attention_heads, c.attention_head_dim, bias=c.attention_bias,
                               upcast=c.upcast_attention)
        self.norm3 = nn.LayerNorm(c.hidden_size, eps=c.norm_eps, elementwise_affine=c.norm_elementwise_affine)
        self.ff = FeedForward(c.hidden_size, c.activation_fn)

    def forward(self, x, timestep, class_labels):
        conditioning = self.norm1.emb(timestep, class_labels, x.dtype)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \
            self.norm1.linear(F.silu(conditioning))[:, None].chunk(6, dim=-1)
        x = x + gate_msa * self.attn1(modulate(self.norm1.norm(x), shift_msa, scale_msa))
        return x + gate_mlp * self.ff(modulate(self.norm3(x), shift_mlp, scale_mlp))


class DiTTransformer2DModel(nn.Module):
    """(latents (B, C, H, W), timestep, class_labels (B,)) -> (B, out_channels, H, W)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        c = self.config = config
        self.pos_embed = PatchEmbed(c)
        self.transformer_blocks = nn.ModuleList([DiTBlock(c) for _ in range(c.num_layers)])
        self.norm_out = nn.LayerNorm(c.hidden_size, elementwise_affine=False, eps=1e-6)
        self.proj_out_1 = nn.Linear(c.hidden_size, 2 * c.hidden_size)
        self.proj_out_2 = nn.Linear(c.hidden_size, c.patch_size * c.patch_size * c.out_channels)

    @torch.no_grad()
    def initialize_weights(self):
        """The DiT paper's initialisation for training from scratch (adaLN-Zero): Xavier-uniform linears and
        patch projection, N(0, 0.02) label tables and timestep MLPs, and zero for every modulation and the
        output projection, so each block starts as the identity. PyTorch's default init trains far slower."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.xavier_uniform_(self.pos_embed.proj.weight.view(self.pos_embed.proj.weight.shape[0], -1))
        nn.init.zeros_(self.pos_embed.proj.bias)
        for block in self.transformer_blocks:
            embedders = block.norm1.emb
            nn.init.normal_(embedders.class_embedder.embedding_table.weight, std=0.02)
            nn.init.normal_(embedders.timestep_embedder.linear_1.weight, std=0.02)
            nn.init.normal_(embedders.timestep_embedder.linear_2.weight, std=0.02)
            nn.init.zeros_(block.norm1.linear.weight)
            nn.init.zeros_(block.norm1.linear.bias)
        for layer in (self.proj_out_1, self.proj_out_2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        return self

    @classmethod
    def from_config(cls, config: dict) -> "DiTTransformer2DModel":
        return cls(DiTConfig.from_dict(config))

    def check_inputs(self, x, class_labels):
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"Latents must be (batch, {c.in_channels}, height, width); got {tuple(x.shape)}.")
        if x.shape[2] % c.patch_size or x.shape[3] % c.patch_size:
            raise ValueError(f"Latent height and width must be multiples of the patch size {c.patch_size}; "
                             f"got {tuple(x.shape[2:])}.")
        if class_labels.shape != (x.shape[0],) or class_labels.dtype.is_floating_point:
            raise ValueError(f"class_labels must be {x.shape[0]} integer ids; got {tuple(class_labels.shape)} "
                             f"{class_labels.dtype}.")
        if class_labels.min() < 0 or class_labels.max() > c.null_class:
            raise ValueError(f"Class labels must lie in [0, {c.num_embeds_ada_norm - 1}] (or {c.null_class}, the "
                             f"null class for guidance); got [{class_labels.min()}, {class_labels.max()}].")

    def forward(self, hidden_states, timestep, class_labels) -> torch.Tensor:
        c = self.config
        class_labels = torch.as_tensor(class_labels, device=hidden_states.device).reshape(-1)
        self.check_inputs(hidden_states, class_labels)
        batch, _, height, width = hidden_states.shape
        timestep = broadcast_timesteps(timestep, batch, hidden_states.device)
        x = self.pos_embed(hidden_states)
        for block in self.transformer_blocks:
            x = block(x, timestep, class_labels)
        conditioning = self.transformer_blocks[0].norm1.emb(timestep, class_labels, x.dtype)
        shift, scale = self.proj_out_1(F.silu(conditioning))[:, None].chunk(2, dim=-1)
        x = self.proj_out_2(modulate(self.norm_out(x), shift, scale))  # (B, hw, p * p * C_out)
        p, h, w = c.patch_size, height // c.patch_size, width // c.patch_size
        x = x.reshape(batch, h, w, p, p, c.out_channels)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(batch, c.out_channels, h * p, w * p)
