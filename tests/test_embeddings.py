"""Textual-inversion embeddings in sd_core give the token ids, text-encoder outputs and images of diffusers'
load_textual_inversion."""
import diffusers
import pytest
import safetensors.torch
import torch
import transformers

from sd_core.checkpoints.convert import CheckpointError
from sd_core.pipelines.textual_inversion import add_embedding, load_embedding
from sd_core.checkpoints.loading import load_pipeline
from sd_core.pipelines.generate import text_to_image
from sd_core.tokenizer import CLIPTokenizer
from tests import tiny
from tests.helpers import assert_images_match, relative_diff

PROMPTS = ["a photo of {} on the left", "{}{} and a <{}> square, {}!"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {family: tiny.save_pretrained(tiny.stable_diffusion(family, seed=3), tmp_path_factory.mktemp(family))
            for family in ("sd1", "sdxl")}


def vectors(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, tiny.TEXT["hidden_size"], generator=torch.Generator().manual_seed(seed))


def test_added_tokens_split_the_prompt_as_transformers_added_tokens_do():
    ours, reference = CLIPTokenizer(tiny.tokenizer_folder(None)), transformers.CLIPTokenizer.from_pretrained(
        tiny.tokenizer_folder(None))
    for token in ("<my-emb>", "style", "Style_x", "<x>"):  # "style" is in the vocabulary: refused by both
        if token in reference.get_vocab():
            with pytest.raises(ValueError, match="already in the vocabulary"):
                ours.add_token(token)
            continue
        reference.add_tokens(token)
        ours.add_token(token)
    for prompt in ["a <my-emb> cat", "A <MY-EMB>x and STYLE_X, style_xy", "concat<my-emb>dog<x><x>", "  <x>   y "]:
        assert ours.encode(prompt) == reference(prompt).input_ids, prompt


def write(kind: str, folder, n: int) -> tuple[str, str]:
    """(path, the token diffusers is told) of an embedding file of each format, `n` seeded vectors."""
    if kind == "a1111_pt":
        path = folder / "a1111.pt"
        torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors(n, 1)}, "name": "my-emb",
                    "step": 500, "sd_checkpoint": "0123abcd", "sd_checkpoint_name": "v1-5"}, path)
        return str(path), "my-emb"
    if kind == "a1111_safetensors":
        path = folder / "odd-style.safetensors"
        safetensors.torch.save_file({"emb_params": vectors(n, 2)}, path)
        return str(path), "odd-style"  # diffusers would call it "emb_params": it is told the stem sd_core uses
    path = folder / "learned_embeds.safetensors"
    safetensors.torch.save_file({"<cat-toy>": vectors(n, 3)[0] if n == 1 else vectors(n, 3)}, path)
    return str(path), "<cat-toy>"


@torch.no_grad()
def assert_text_matches(ours, reference, token: str, pairs: list[tuple[str, str]]):
    """For each (tokenizer, text encoder) name pair: equal ids of the prompts (diffusers rewrites them for
    multi-vector tokens), and equal encoder outputs on them."""
    for tokenizer_name, encoder_name in pairs:
        for prompt in (p.format(token, token, token.strip("<>"), token) for p in PROMPTS):
            tokenizer = getattr(reference, tokenizer_name)
            expected = tokenizer(reference.maybe_convert_prompt(prompt, tokenizer), padding="max_length",
                                 max_length=77, return_tensors="pt").input_ids
            ids = getattr(ours, tokenizer_name)([prompt])
            assert torch.equal(ids, expected), prompt
            assert relative_diff(getattr(ours, encoder_name)(ids).last_hidden_state,
                                 getattr(reference, encoder_name)(ids).last_hidden_state) <= 1e-6


def assert_images_equal(ours, reference, prompt: str):
    result = text_to_image(ours, prompt, steps=3, guidance_scale=5.0, height=16, width=16, scheduler="ddim", seed=2)
    images = reference(prompt, num_inference_steps=3, guidance_scale=5.0, height=16, width=16,
                       generator=torch.Generator().manual_seed(2), output_type="np").images
    assert_images_match(result.images, images)


@pytest.mark.parametrize("kind", ["a1111_pt", pytest.param("a1111_safetensors", marks=pytest.mark.slow), "diffusers"])
@pytest.mark.parametrize("n", [1, pytest.param(3, marks=pytest.mark.slow)])
def test_embedding_equals_diffusers_load_textual_inversion(folders, tmp_path, kind, n):
    path, token = write(kind, tmp_path, n)
    ours = load_pipeline(folders["sd1"])
    assert add_embedding(ours, load_embedding(path, allow_pickle=True)) == token
    reference = diffusers.StableDiffusionPipeline.from_pretrained(folders["sd1"])
    reference.load_textual_inversion(path, token=token)
    assert ours.text_encoder.embeddings.token_embedding.num_embeddings == 49408 + n
    assert_text_matches(ours, reference, token, [("tokenizer", "text_encoder")])
    assert_images_equal(ours, reference, PROMPTS[0].format(token))


def test_sdxl_clip_l_and_clip_g_pair_equals_diffusers(folders, tmp_path):
    path = tmp_path / "xl-style.safetensors"
    pair = {"clip_l": vectors(2, 4), "clip_g": vectors(2, 5)}
    safetensors.torch.save_file(pair, path)
    ours = load_pipeline(folders["sdxl"])
    assert add_embedding(ours, load_embedding(path)) == "xl-style"
    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(folders["sdxl"])
    reference.load_textual_inversion(pair["clip_l"], token="xl-style", text_encoder=reference.text_encoder,
                                     tokenizer=reference.tokenizer)
    reference.load_textual_inversion(pair["clip_g"], token="xl-style", text_encoder=reference.text_encoder_2,
                                     tokenizer=reference.tokenizer_2)
    assert_text_matches(ours, reference, "xl-style", [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")])
    assert_images_equal(ours, reference, "a xl-style circle")


def test_an_embedding_for_one_encoder_does_not_fit_sdxl_and_changes_nothing(folders):
    ours = load_pipeline(folders["sdxl"])
    with pytest.raises(ValueError, match="trained for another model family"):
        add_embedding(ours, load_embedding({"<cat-toy>": vectors(1, 3)}))
    assert "<cat-toy>" not in ours.tokenizer.vocab and ours.text_encoder.config.vocab_size == 49408


def test_pickled_embeddings_are_refused_unless_allowed_and_other_dicts_are_named(tmp_path):
    path, _ = write("a1111_pt", tmp_path, 1)
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_embedding(path)
    with pytest.raises(CheckpointError, match="'a', 'b'"):
        load_embedding({"a": vectors(1, 0), "b": vectors(1, 0)})
