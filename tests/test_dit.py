import json
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel as ReferenceDiT

from sd_core.checkpoints import convert
from sd_core.models.dit import DiTTransformer2DModel, dit_config
from sd_core.models.layers import set_attention_backend
from sd_core.checkpoints.loading import dit_config_from_weights
from sd_core.checkpoints.saving import save_model
from tests import tiny
from tests.helpers import parameter_shapes, randomize, relative_diff, twin

SMALL = dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, sample_size=8, num_embeds_ada_norm=10)
SMALL_CONFIGS = {
    "patch2_learned_sigma": dict(SMALL, patch_size=2, in_channels=4, out_channels=8),
    "patch4_learned_sigma": dict(SMALL, patch_size=4, in_channels=4, out_channels=8),
    "patch2_no_sigma": dict(SMALL, patch_size=2, in_channels=4, out_channels=4),
    "patch1_no_sigma": dict(SMALL, patch_size=1, in_channels=4, out_channels=4),  # the embedded shapes-dit
    "patch4_no_sigma_three_layers": dict(SMALL, patch_size=4, in_channels=4, out_channels=None, num_layers=3),
}


def build_pair(name: str, seed: int = 0):
    reference = randomize(ReferenceDiT(**SMALL_CONFIGS[name]), seed)  # eval(): no random label dropout
    return twin(DiTTransformer2DModel, reference), reference


def dit_inputs(size: int = 8, batch: int = 3):
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(batch, 4, size, size, generator=generator)
    labels = torch.tensor([0, 9, 10])[:batch]  # 10 is the null class
    return latents, labels


@pytest.mark.parametrize("timestep", [torch.tensor(999), 250, torch.tensor([0, 400, 999])],
                         ids=["0d_tensor", "int", "per_batch"])
@pytest.mark.parametrize("name", SMALL_CONFIGS)
@torch.no_grad()
def test_dit_matches_diffusers(name, timestep):
    ours, reference = build_pair(name)
    latents, labels = dit_inputs()
    t = timestep if torch.is_tensor(timestep) and timestep.ndim else torch.as_tensor(timestep).repeat(3)
    expected = reference(latents, t, labels).sample
    out = ours(latents, timestep, labels)
    assert out.shape == expected.shape
    assert relative_diff(out, expected) <= 1e-5


@torch.no_grad()
def test_dit_at_a_latent_size_other_than_the_config_matches_diffusers():
    ours, reference = build_pair("patch2_learned_sigma")
    latents, labels = dit_inputs(size=16)
    t = torch.tensor([5, 5, 5])
    assert relative_diff(ours(latents, t, labels), reference(latents, t, labels).sample) <= 1e-5


@torch.no_grad()
def test_dit_math_and_sdpa_attention_agree():
    ours, _ = build_pair("patch2_learned_sigma")
    latents, labels = dit_inputs()
    fast = ours(latents, 10, labels)
    assert relative_diff(set_attention_backend(ours, "math")(latents, 10, labels), fast) <= 1e-5


@torch.no_grad()
def test_dit_feed_forward_uses_tanh_gelu():
    ours, _ = build_pair("patch2_learned_sigma")
    gelu = ours.transformer_blocks[0].ff.net[0]
    x = torch.randn(3, gelu.proj.in_features)
    assert torch.equal(gelu(x), torch.nn.functional.gelu(gelu.proj(x), approximate="tanh"))
    assert not torch.allclose(gelu(x), torch.nn.functional.gelu(gelu.proj(x)), atol=1e-6)


@torch.no_grad()
def test_dit_timestep_embedding_uses_frequency_shift_1_like_diffusers():
    ours, reference = build_pair("patch2_no_sigma")
    t, labels = torch.tensor([1, 500, 999]), torch.tensor([1, 2, 3])
    ours_emb = ours.transformer_blocks[0].norm1.emb(t, labels, torch.float32)
    ref_emb = reference.transformer_blocks[0].norm1.emb(t, labels, hidden_dtype=torch.float32)
    assert relative_diff(ours_emb, ref_emb) <= 1e-6


@torch.no_grad()
def test_initialize_weights_starts_every_block_and_the_output_at_zero():
    """adaLN-Zero: zero gates make each block the identity and the zeroed output layer predicts 0."""
    torch.manual_seed(0)
    model = DiTTransformer2DModel.from_config(SMALL_CONFIGS["patch2_no_sigma"]).initialize_weights()
    latents, labels = dit_inputs()
    t = torch.tensor([1, 500, 999])
    tokens = model.pos_embed(latents)
    for block in model.transformer_blocks:
        assert torch.equal(block(tokens, t, labels), tokens)
    assert torch.equal(model(latents, t, labels), torch.zeros_like(latents))
    table = model.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.weight
    assert 0.015 < table.std() < 0.025  # N(0, 0.02), not nn.Embedding's N(0, 1)
    assert model.transformer_blocks[0].attn1.to_q.weight.abs().max() > 0


@pytest.mark.parametrize("image_size", [256, 512])
def test_real_size_dit_xl_2_parameter_names_and_shapes_match_diffusers(image_size):
    config = dit_config("DiT-XL/2", image_size=image_size)
    with torch.device("meta"):
        reference = ReferenceDiT(**config)
        ours = DiTTransformer2DModel.from_config(dict(reference.config))
    assert parameter_shapes(ours) == parameter_shapes(reference)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in reference.parameters())


@pytest.mark.parametrize("name,hidden,depth", [("DiT-S/8", 384, 12), ("DiT-B/4", 768, 12), ("DiT-L/2", 1024, 24)])
def test_named_dit_sizes(name, hidden, depth):
    config = dit_config(name)
    assert config["num_attention_heads"] * config["attention_head_dim"] == hidden and config["num_layers"] == depth
    assert config["patch_size"] == int(name[-1])


def test_dit_rejects_bad_inputs():
    ours, _ = build_pair("patch4_learned_sigma")
    latents, labels = dit_inputs()
    with pytest.raises(ValueError, match=r"\[0, 9\]"):
        ours(latents, 1, torch.tensor([0, 1, 11]))
    with pytest.raises(ValueError, match="patch size 4"):
        ours(latents[..., :6], 1, labels)
    with pytest.raises(ValueError, match="3 integer ids"):
        ours(latents, 1, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="Unknown DiT size"):
        dit_config("DiT-M/3")


def paper_timestep_frequencies(t: torch.Tensor, dim: int = 256, max_period: int = 10000) -> torch.Tensor:
    """facebookresearch/DiT's TimestepEmbedder.timestep_embedding, restated: frequencies
    exp(-ln(max_period) * i / half) for i < half, embedding cat([cos(t f), sin(t f)])."""
    half = dim // 2
    frequencies = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    angles = t[:, None].float() * frequencies[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


def original_layout_dit():
    """(original facebookresearch/DiT state dict, its diffusers config) of a small seeded DiT."""
    reference = tiny.dit().transformer
    config = dict(reference.config)
    return convert.export_component(reference.state_dict(), convert.dit_rules(config)), config


def dit_from_original(original: dict, timestep_frequencies: str) -> DiTTransformer2DModel:
    config = {**dit_config_from_weights(original), "timestep_frequencies": timestep_frequencies}
    model = DiTTransformer2DModel.from_config(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state_dict, _ = convert.convert_component(original, convert.dit_rules(config), expected, "DiT")
    model.load_state_dict(state_dict, strict=True)
    return model.eval()


def original_conditioning(original: dict, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The original model's c = t_embedder(t) + y_embedder(y): Linear -> SiLU -> Linear on the paper's embedding."""
    mlp = {k.removeprefix("t_embedder.mlp."): v for k, v in original.items() if k.startswith("t_embedder.mlp.")}
    hidden = F.linear(paper_timestep_frequencies(t), mlp["0.weight"], mlp["0.bias"])
    t_emb = F.linear(F.silu(hidden), mlp["2.weight"], mlp["2.bias"])
    return t_emb + original["y_embedder.embedding_table.weight"][labels]


@torch.no_grad()
def test_original_timestep_frequencies_follow_the_dit_paper_code():
    original, _ = original_layout_dit()
    t, labels = torch.tensor([1, 250, 999]), torch.tensor([0, 3, 10])
    expected = original_conditioning(original, t, labels)
    for block in dit_from_original(original, "original").transformer_blocks:
        assert relative_diff(block.norm1.emb(t, labels, torch.float32), expected) <= 1e-6
    # diffusers' divisor (half - 1) is measurably another embedding, so the check above can tell them apart.
    diffusers_style = dit_from_original(original, "diffusers").transformer_blocks[0].norm1.emb(t, labels, torch.float32)
    assert relative_diff(diffusers_style, expected) > 1e-3


@torch.no_grad()
def test_timestep_frequencies_change_only_the_timestep_embedding():
    original, _ = original_layout_dit()
    paper, diffusers_style = dit_from_original(original, "original"), dit_from_original(original, "diffusers")
    latents, labels = dit_inputs()
    assert torch.equal(paper(latents, 0, labels), diffusers_style(latents, 0, labels))  # t = 0: every angle is 0
    assert not torch.equal(paper(latents, 500, labels), diffusers_style(latents, 500, labels))


def test_a_diffusers_config_keeps_diffusers_timestep_frequencies():
    _, reference = build_pair("patch2_no_sigma")
    assert DiTTransformer2DModel.from_config(dict(reference.config)).config.timestep_frequencies == "diffusers"
    with pytest.raises(ValueError, match="timestep_frequencies='paper'.*'original'"):
        DiTTransformer2DModel.from_config({**SMALL_CONFIGS["patch2_no_sigma"], "timestep_frequencies": "paper"})


@pytest.mark.parametrize("timestep_frequencies", ["diffusers", "original"])
def test_saved_dit_folder_loads_in_diffusers_and_keeps_its_timestep_frequencies(timestep_frequencies, tmp_path):
    original, _ = original_layout_dit()
    folder = tmp_path / "transformer"
    save_model(dit_from_original(original, timestep_frequencies), folder, "DiTTransformer2DModel")
    saved = json.loads((folder / "config.json").read_text())
    assert ("timestep_frequencies" in saved) == (timestep_frequencies == "original")  # diffusers' keys only, by default
    ReferenceDiT.from_pretrained(folder)  # diffusers ignores the extra key (with a warning)
    assert DiTTransformer2DModel.from_config(saved).config.timestep_frequencies == timestep_frequencies
