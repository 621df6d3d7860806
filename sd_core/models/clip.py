"""CLIP text encoders: OpenAI CLIP ViT-L/14 (SD1), OpenCLIP ViT-H/14 (SD2), OpenCLIP ViT-bigG/14 (SDXL).

A pre-LayerNorm transformer over 77 token embeddings with a causal mask. The pooled output is the
hidden state at the end-of-text token after the final LayerNorm; `CLIPTextModelWithProjection`
projects it (SDXL's encoder 2 feeds it to the UNet's `add_embedding`).
"""
import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sd_core.config import ModelConfig
from sd_core.models.layers import attend

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP
    "gelu": F.gelu,  # OpenCLIP
}


@dataclasses.dataclass
class CLIPTextConfig(ModelConfig):
    size_bounds = {"vocab_size": (1, 1_000_000), "hidden_size": (1, 16384), "intermediate_size": (1, 65536),
                   "projection_dim": (1, 16384), "num_hidden_layers": (1, 256), "num_attention_heads": (1, 1024),
                   "max_position_embeddings": (1, 4096)}
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    projection_dim: int = 512
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407  # legacy configs say 2: then the pooled token is the argmax id (EOS is the largest)
    inert_keys = frozenset({"hidden_dropout_prob", "projection_dropout"})

    def __post_init__(self):
        self.require(self.hidden_act in ACTIVATIONS,
                     f"hidden_act {self.hidden_act!r} is not supported; choose one of {sorted(ACTIVATIONS)}.")
        self.require(self.hidden_size % self.num_attention_heads == 0,
                     "hidden_size must be divisible by num_attention_heads.")


class CLIPTextOutput(NamedTuple):
    last_hidden_state: torch.Tensor  # (B, N, hidden) after the final LayerNorm
    pooled_output: torch.Tensor  # (B, hidden), or (B, projection_dim) when projected
    hidden_states: tuple | None  # embeddings + every layer's output (before the final LayerNorm)


class CLIPAttention(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.heads, self.attention_backend = c.num_attention_heads, "sdpa"
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(c.hidden_size, c.hidden_size) for _ in range(4))

    def forward(self, x, padding_mask):
        return self.out_proj(attend(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, padding_mask,
                                    backend=self.attention_backend, causal=True))


class CLIPMLP(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.activation = ACTIVATIONS[c.hidden_act]
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)

    def forward(self, x):
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = CLIPAttention(c)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = CLIPMLP(c)

    def forward(self, x, padding_mask):
        x = x + self.self_attn(self.layer_norm1(x), padding_mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEmbeddings(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(c.vocab_size, c.hidden_size)
        self.position_embedding = nn.Embedding(c.max_position_embeddings, c.hidden_size)

    def forward(self, input_ids):
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPEncoder(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList([CLIPEncoderLayer(c) for _ in range(c.num_hidden_layers)])


class CLIPTextTransformer(nn.Module):
    def __init__(self, c: CLIPTextConfig):
        super().__init__()
        self.config = c
        self.embeddings = CLIPEmbeddings(c)
        self.encoder = CLIPEncoder(c)
        self.final_layer_norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False) -> CLIPTextOutput:
        c = self.config
        if input_ids.ndim != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be a (batch, length) tensor of integer token ids; got "
                             f"{input_ids.dtype} of shape {tuple(input_ids.shape)}. Tokenize the text first.")
        if input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(f"{input_ids.shape[1]} tokens exceed the model's {c.max_position_embeddings} positions; "
                             f"truncate (the tokenizer does this) or encode the prompt in chunks.")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= c.vocab_size):
            raise ValueError(f"Token ids must lie in [0, {c.vocab_size}); got [{input_ids.min()}, {input_ids.max()}].")
        padding_mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, N)
        x = self.embeddings(input_ids)
        hidden_states = [x]
        for layer in self.encoder.layers:
            x = layer(x, padding_mask)
            hidden_states.append(x)
        x = self.final_layer_norm(x)
        if c.eos_token_id == 2:  # legacy configs: EOS (49407) is the largest id
            eos_position = input_ids.argmax(dim=-1)
        else:
            eos_position = (input_ids == c.eos_token_id).int().argmax(dim=-1)
        pooled = x[torch.arange(x.shape[0], device=x.device), eos_position]
        return CLIPTextOutput(x, pooled, tuple(hidden_states) if output_hidden_states else None)


class CLIPTextModel(CLIPTextTransformer):
    """transformers' CLIPTextModel: returns (last_hidden_state, pooled_output, hidden_states).

    Like transformers 5, its parameters have no `text_model.` prefix (checkpoints from the hub do;
    sd_core.checkpoints.loading accepts both).
    """

    @classmethod
    def from_config(cls, config: dict):
        return cls(CLIPTextConfig.from_dict(config))


class CLIPTextModelWithProjection(nn.Module):
    """transformers' CLIPTextModelWithProjection: the pooled output goes through `text_projection` (no bias)."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    @classmethod
    def from_config(cls, config: dict):
        return cls(CLIPTextConfig.from_dict(config))

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False) -> CLIPTextOutput:
        out = self.text_model(input_ids, attention_mask, output_hidden_states)
        return out._replace(pooled_output=self.text_projection(out.pooled_output))
