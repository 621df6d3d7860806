import pytest
import torch
import transformers

from sd_core.models import presets
from sd_core.models.clip import CLIPTextModel, CLIPTextModelWithProjection
from tests.helpers import parameter_shapes, randomize, relative_diff

SMALL = dict(vocab_size=1000, hidden_size=32, intermediate_size=64, num_attention_heads=4,
             max_position_embeddings=77, projection_dim=24, eos_token_id=999, bos_token_id=998, pad_token_id=0)
SMALL_CONFIGS = {
    "clip_l_like_quick_gelu_1_layer": dict(SMALL, num_hidden_layers=1, hidden_act="quick_gelu"),
    "openclip_like_gelu_2_layers": dict(SMALL, num_hidden_layers=2, hidden_act="gelu"),
    "bigg_like_gelu_4_layers": dict(SMALL, num_hidden_layers=4, hidden_act="gelu", layer_norm_eps=1e-6),
    "legacy_eos_id_2": dict(SMALL, num_hidden_layers=2, hidden_act="quick_gelu", eos_token_id=2),
}
PAIRS = [(CLIPTextModel, transformers.CLIPTextModel),
         (CLIPTextModelWithProjection, transformers.CLIPTextModelWithProjection)]


def build_pair(ours_class, reference_class, config: dict, seed: int = 0):
    reference_config = transformers.CLIPTextConfig(**config)
    reference_config._attn_implementation = "eager"
    reference = randomize(reference_class(reference_config), seed)
    ours = ours_class.from_config(reference_config.to_dict())
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours.eval(), reference


def token_batch(eos_token_id: int, batch: int = 3, length: int = 77):
    """BOS, random words, EOS, then padding with EOS (CLIP-L style) or 0 (OpenCLIP style), varied lengths."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.zeros(batch, length, dtype=torch.long)
    for row, (n, pad) in enumerate(zip([5, 20, 75], [eos_token_id, 0, eos_token_id])):
        ids[row] = pad
        ids[row, 0] = 998
        ids[row, 1:n + 1] = torch.randint(3, 990, (n,), generator=generator)
        ids[row, n + 1] = 999  # EOS is also the largest id, so legacy argmax pooling finds it
    return ids[:, :length]


@pytest.mark.parametrize("name", SMALL_CONFIGS)
@pytest.mark.parametrize("ours_class,reference_class", PAIRS, ids=["plain", "with_projection"])
@torch.no_grad()
def test_clip_text_outputs_match_transformers(name, ours_class, reference_class):
    config = SMALL_CONFIGS[name]
    ours, reference = build_pair(ours_class, reference_class, config)
    ids = token_batch(config["eos_token_id"])
    out = ours(ids, output_hidden_states=True)
    ref = reference(ids, output_hidden_states=True)
    assert relative_diff(out.last_hidden_state, ref.last_hidden_state) <= 1e-5
    ref_pooled = ref.text_embeds if ours_class is CLIPTextModelWithProjection else ref.pooler_output
    assert relative_diff(out.pooled_output, ref_pooled) <= 1e-5
    assert len(out.hidden_states) == len(ref.hidden_states) == config["num_hidden_layers"] + 1
    for ours_state, ref_state in zip(out.hidden_states, ref.hidden_states):
        assert relative_diff(ours_state, ref_state) <= 1e-5


@pytest.mark.parametrize("backend", ["sdpa", "math"])
@torch.no_grad()
def test_clip_attention_mask_matches_transformers(backend):
    """Padding keys masked on top of the causal mask, in both attention paths."""
    from sd_core.models.layers import set_attention_backend
    ours, reference = build_pair(CLIPTextModel, transformers.CLIPTextModel, SMALL_CONFIGS["openclip_like_gelu_2_layers"])
    set_attention_backend(ours, backend)
    ids = token_batch(999)
    mask = (torch.arange(77)[None] < torch.tensor([[7], [22], [77]])).long()
    out, ref = ours(ids, attention_mask=mask), reference(ids, attention_mask=mask)
    assert relative_diff(out.last_hidden_state[mask.bool()], ref.last_hidden_state[mask.bool()]) <= 1e-5


@torch.no_grad()
def test_clip_math_and_sdpa_attention_agree():
    from sd_core.models.layers import set_attention_backend
    ours, _ = build_pair(CLIPTextModel, transformers.CLIPTextModel, SMALL_CONFIGS["openclip_like_gelu_2_layers"])
    ids = token_batch(999)
    fast = ours(ids).last_hidden_state
    reference_path = set_attention_backend(ours, "math")(ids).last_hidden_state
    assert relative_diff(fast, reference_path) <= 1e-5


@torch.no_grad()
def test_clip_l_uses_quick_gelu_and_openclip_uses_exact_gelu():
    """Swapping the two activations changes the output: each family must keep its own."""
    config = SMALL_CONFIGS["clip_l_like_quick_gelu_1_layer"]
    ours, reference = build_pair(CLIPTextModel, transformers.CLIPTextModel, config)
    ids = token_batch(999)
    swapped = CLIPTextModel.from_config({**config, "hidden_act": "gelu"})
    swapped.load_state_dict(reference.state_dict())
    ref = reference(ids).last_hidden_state
    assert relative_diff(ours(ids).last_hidden_state, ref) <= 1e-5
    assert relative_diff(swapped(ids).last_hidden_state, ref) > 1e-4
    x = torch.linspace(-3, 3, 7)
    assert torch.allclose(ours.encoder.layers[0].mlp.activation(x), x * torch.sigmoid(1.702 * x))


def test_clip_rejects_float_and_out_of_range_ids_and_unknown_config():
    ours, _ = build_pair(CLIPTextModel, transformers.CLIPTextModel, SMALL_CONFIGS["clip_l_like_quick_gelu_1_layer"])
    with pytest.raises(ValueError, match="integer token ids"):
        ours(torch.zeros(1, 77))
    with pytest.raises(ValueError, match=r"\[0, 1000\)"):
        ours(torch.full((1, 77), 5000))
    with pytest.raises(ValueError, match="exceed"):
        ours(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match="does not know the config field"):
        CLIPTextModel.from_config({**SMALL, "num_hidden_layers": 1, "rope_theta": 1.0})


@pytest.mark.parametrize("name,config,projected", [
    ("clip_vit_l", presets.CLIP_VIT_L, False),
    ("openclip_vit_h", presets.OPENCLIP_VIT_H, False),
    ("openclip_vit_bigg", presets.OPENCLIP_VIT_BIGG, True),
])
def test_real_size_text_encoder_names_and_shapes_match_transformers(name, config, projected):
    ours_class, reference_class = PAIRS[1] if projected else PAIRS[0]
    with torch.device("meta"):
        reference = reference_class(transformers.CLIPTextConfig(**config))
        ours = ours_class.from_config(reference.config.to_dict())
    assert parameter_shapes(ours) == parameter_shapes(reference)
