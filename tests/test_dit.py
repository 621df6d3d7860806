import pytest
import torch
from diffusers import DiTTransformer2DModel as ReferenceDiT

from sd_core.dit import DiTTransformer2DModel, dit_config
from sd_core.layers import set_attention_backend
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
