"""Textual-inversion embeddings: learned token vectors, bound to a new token usable in prompts.

    embedding = load_embedding("my-style.safetensors")
    token = add_embedding(pipe, embedding)           # "my-style", or pass token="<my-style>"
    result = text_to_image(pipe, f"a cat in {token} style")

    with embeddings_bound(pipe, [embedding]) as tokens:   # bound for the block only (a server's request)
        result = text_to_image(pipe, f"a cat in {tokens[0]} style")

Formats:
- A1111 `.pt`: {"string_to_param": {"*": (n, dim)}, "name": ...}; A1111 `.safetensors`: {"emb_params": (n, dim)}.
- diffusers `learned_embeds.safetensors`: {token: (dim,) or (n, dim)}.
- SDXL: {"clip_l": (n, 768), "clip_g": (n, 1280)}, one set of vectors per text encoder.
An embedding of n vectors becomes n tokens, `token`, `token_1`, ... (as diffusers names them); `token` in a
prompt stands for all n. Their rows are appended to the text encoder's token embedding.
"""
import copy
import dataclasses
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from sd_core.checkpoints.convert import CheckpointError
from sd_core.checkpoints.weights_files import read_weights

SDXL_KEYS = {"clip_l": "text_encoder", "clip_g": "text_encoder_2"}


@dataclasses.dataclass
class TextualInversion:
    name: str | None  # the token the file suggests: A1111's `name`, diffusers' key, else the file's stem
    vectors: dict[str, torch.Tensor]  # "text_encoder" / "text_encoder_2" -> (n, dim)


def load_embedding(source, allow_pickle: bool = False) -> TextualInversion:
    """Parse an embedding file (or its loaded dict) of any of the formats above."""
    if isinstance(source, dict):
        return parse_embedding(source, None, "the given state dict")
    path = Path(source)
    return parse_embedding(read_weights(path, allow_pickle), path.stem, str(path))


def parse_embedding(data: dict, stem: str | None, what: str) -> TextualInversion:
    if "string_to_param" in data:  # A1111 .pt
        params = data["string_to_param"]
        if list(params) != ["*"]:
            raise CheckpointError(f"{what}: string_to_param has {sorted(params)}; A1111 embeddings hold one, '*'.")
        return TextualInversion(data.get("name") or stem, {"text_encoder": as_rows(params["*"])})
    if set(data) == set(SDXL_KEYS):
        return TextualInversion(stem, {SDXL_KEYS[k]: as_rows(v) for k, v in data.items()})
    if list(data) == ["emb_params"]:  # A1111 .safetensors
        return TextualInversion(stem, {"text_encoder": as_rows(data["emb_params"])})
    if len(data) == 1 and torch.is_tensor(next(iter(data.values()))):  # diffusers: {token: vectors}
        (token, vectors), = data.items()
        return TextualInversion(token, {"text_encoder": as_rows(vectors)})
    raise CheckpointError(f"{what} is not a textual-inversion embedding: it holds {sorted(data)[:5]}. Expected "
                          f"A1111's string_to_param or emb_params, diffusers' single {{token: tensor}}, or SDXL's "
                          f"clip_l and clip_g.")


def as_rows(vectors: torch.Tensor) -> torch.Tensor:
    return vectors.detach().reshape(-1, vectors.shape[-1])


def token_embedding(text_encoder: nn.Module) -> nn.Embedding:
    """CLIPTextModel's token embedding, or CLIPTextModelWithProjection's (one level down, in `text_model`)."""
    return getattr(text_encoder, "text_model", text_encoder).embeddings.token_embedding


@torch.no_grad()
def add_embedding(pipe, embedding: TextualInversion, token: str | None = None) -> str:
    """Bind `embedding` to `token` (default: its own name) in `pipe`'s tokenizers and text encoders; returns the token.

    Every text encoder of the pipeline needs vectors of its width (an SD1 embedding does not fit SDXL); vectors
    for an encoder the pipeline lacks (SDXL's clip_l on the refiner) are not used.
    """
    token = token or embedding.name
    if not token:
        raise ValueError("This embedding carries no name; pass token='<my-token>'.")
    encoders = text_encoders(pipe)
    for name, (text_encoder, tokenizer) in encoders.items():
        vectors = embedding.vectors.get(name)
        width = token_embedding(text_encoder).embedding_dim
        if vectors is None or vectors.shape[-1] != width:
            have = {k: tuple(v.shape) for k, v in embedding.vectors.items()}
            raise ValueError(f"Embedding {token!r} has vectors {have}, but the pipeline's {name} takes {width}-wide "
                             f"vectors: it was trained for another model family.")
        if token_embedding(text_encoder).num_embeddings != len(tokenizer.vocab):
            raise ValueError(f"{name} has {token_embedding(text_encoder).num_embeddings} token embeddings but its "
                             f"tokenizer {len(tokenizer.vocab)} tokens; add embeddings only through add_embedding.")
    for name, (text_encoder, tokenizer) in encoders.items():
        tokenizer.add_token(token, count=len(embedding.vectors[name]))
        append_rows(text_encoder, embedding.vectors[name])
    return token


def append_rows(text_encoder: nn.Module, vectors: torch.Tensor):
    """Grow the token embedding by `vectors` (the new tokens' ids follow the vocabulary) and the config with it."""
    embedding = token_embedding(text_encoder)
    weight = torch.cat([embedding.weight, vectors.to(embedding.weight)])
    embedding.weight = nn.Parameter(weight, requires_grad=embedding.weight.requires_grad)
    embedding.num_embeddings = text_encoder.config.vocab_size = weight.shape[0]


def text_encoders(pipe) -> dict[str, tuple[nn.Module, object]]:
    """{"text_encoder": (encoder, tokenizer), "text_encoder_2": ...} for the encoders `pipe` has."""
    return {name: (getattr(pipe, name), getattr(pipe, name.replace("text_encoder", "tokenizer")))
            for name in ("text_encoder", "text_encoder_2") if getattr(pipe, name, None) is not None}


TOKENIZER_STATE = ("vocab", "id_to_token", "added_tokens", "added_split")  # what CLIPTokenizer.add_token changes


@contextmanager
def embeddings_bound(pipe, embeddings: list[TextualInversion]):
    """`with embeddings_bound(pipe, [embedding]) as tokens: ...` binds each embedding to its own name for the block,
    then puts back the tokenizers and the token-embedding matrices exactly as they were (the same tensors), even
    when binding or the block fails: a server's cached pipeline never keeps one request's embeddings for the next.
    The counterpart of lora.loras_applied; hold the same lock around it (nothing else may encode text meanwhile)."""
    saved = [(tokenizer, {name: copy.copy(getattr(tokenizer, name)) for name in TOKENIZER_STATE}, text_encoder,
              token_embedding(text_encoder).weight, text_encoder.config.vocab_size)
             for text_encoder, tokenizer in text_encoders(pipe).values()]
    try:
        yield [add_embedding(pipe, embedding) for embedding in embeddings]
    finally:
        for tokenizer, state, text_encoder, weight, vocab_size in saved:
            for name, value in state.items():
                setattr(tokenizer, name, value)
            embedding = token_embedding(text_encoder)
            embedding.weight, embedding.num_embeddings = weight, weight.shape[0]
            text_encoder.config.vocab_size = vocab_size
