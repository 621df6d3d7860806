"""Crafted model folders and checkpoints: each refused fast, with a message that names the problem, and
never by reading a file outside the model (issue: hostile files)."""
import json
import os
import shutil

import pytest
import safetensors.torch
import torch

from sd_core.checkpoints.catalog import EMBEDDED_TEXT_TO_IMAGE
from sd_core.models.dit import DiTTransformer2DModel
from sd_core.checkpoints.loading import load_pipeline
from sd_core.tokenizer import CLIPTokenizer


@pytest.fixture()
def world(tmp_path):
    """A copy of the embedded model, and a secret file outside it that no loader may open."""
    model = tmp_path / "models" / "shapes"
    shutil.copytree(EMBEDDED_TEXT_TO_IMAGE, model)
    secret = tmp_path / "outside" / "secret.safetensors"
    secret.parent.mkdir()
    shutil.copy(model / "vae" / "diffusion_pytorch_model.safetensors", secret)
    return model, secret


def shard_index(model, secret, name):
    unet = model / "unet"
    weights = safetensors.torch.load_file(unet / "diffusion_pytorch_model.safetensors")
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    (unet / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {key: name(secret) for key in weights}}))


def vae_link_out(model, secret):
    shutil.rmtree(model / "vae")
    os.symlink(secret.parent, model / "vae")
    shutil.copy(EMBEDDED_TEXT_TO_IMAGE / "vae" / "config.json", secret.parent / "config.json")
    os.replace(secret, secret.parent / "diffusion_pytorch_model.safetensors")


def weights_link_out(model, secret):
    (model / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    os.symlink(secret, model / "vae" / "diffusion_pytorch_model.safetensors")


def set_config(component, **fields):
    def craft(model, _):
        path = model / component / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))
    return craft


def set_index_entry(name, value):
    def craft(model, _):
        path = model / "model_index.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), name: value}))
    return craft


CRAFTED = [  # (what, how the folder is crafted, the message expected)
    ("shard index naming ../../outside", lambda m, s: shard_index(m, s, lambda p: f"../../../outside/{p.name}"),
     "points outside it"),
    ("shard index naming an absolute path", lambda m, s: shard_index(m, s, str), "points outside it"),
    ("vae/ a link out of the model", vae_link_out, "points outside it"),
    ("weights file a link out of the model", weights_link_out, "points outside it"),
    ("layers_per_block 10^4", set_config("unet", layers_per_block=10_000), r"layers_per_block=10000 is out of range"),
    ("layers_per_block 10^9", set_config("unet", layers_per_block=10 ** 9), "out of range"),
    ("a negative width", set_config("vae", block_out_channels=[16, -32, 64]), "out of range"),
    ("a width given as text", set_config("text_encoder", hidden_size="64"), "out of range"),
    ("config.json a list", lambda m, _: (m / "unet" / "config.json").write_text("[1, 2]"), "not a JSON object"),
    ("model_index entry of the wrong type", set_index_entry("unet", "UNet2DConditionModel"),
     r"must be \[library, class name\]"),
    ("no text encoder", set_index_entry("text_encoder", [None, None]), "needs a text_encoder"),
    ("truncated weights", lambda m, _: (m / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x08\x00"),
     "not a valid safetensors file"),
]


@pytest.mark.parametrize("what,craft,message", CRAFTED, ids=[c[0] for c in CRAFTED])
def test_crafted_folder_is_refused_with_a_clear_message(world, what, craft, message):
    model, secret = world
    craft(model, secret)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_pipeline(model)


def test_checkpoint_claiming_100000_dit_blocks_is_refused_before_anything_is_built(tmp_path, monkeypatch):
    path = tmp_path / "dit.safetensors"
    safetensors.torch.save_file({"x_embedder.proj.weight": torch.zeros(8, 4, 2, 2),
                                 "y_embedder.embedding_table.weight": torch.zeros(3, 8),
                                 "final_layer.linear.weight": torch.zeros(32, 8),
                                 "blocks.99999.attn.qkv.weight": torch.zeros(1)}, path)
    def build_nothing(*args, **kwargs):
        raise AssertionError("a model was built from the crafted architecture")
    monkeypatch.setattr(DiTTransformer2DModel, "__init__", build_nothing)
    with pytest.raises(ValueError, match=r"num_layers=100000 is out of range: each must be a whole number in \[1, 256\]"):
        load_pipeline(path)


@pytest.mark.parametrize("length", [int(1e30), 1e30, "77", None])
def test_tokenizer_with_transformers_unknown_length_sentinel_uses_clips_77(tmp_path, length):
    CLIPTokenizer().save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": length}))
    tokenizer = CLIPTokenizer(tmp_path)
    assert tokenizer.model_max_length == 77
    assert tokenizer(["a red circle"]).shape == (1, 77)
