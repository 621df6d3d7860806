"""A1111's prompt syntax (sd_core.pipelines.prompt_syntax): parsing, 75-token chunks, emphasis, clip_skip, SDXL."""
import functools

import pytest
import torch
import transformers

from sd_core.models.clip import CLIPTextModel, CLIPTextModelWithProjection
from sd_core.pipelines.prompt_syntax import (BREAK, chunk_prompt, encode_weighted_prompt, encode_weighted_prompt_sdxl,
                             parse_prompt_attention)
from sd_core.tokenizer import CLIPTokenizer
from tests import tiny
from tests.helpers import relative_diff

# stable-diffusion-webui's documented examples: the doctests of modules/prompt_parser.py
# `parse_prompt_attention` and the wiki's Features page ("Attention/emphasis"), then BREAK.
DOCUMENTED = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
    ("a (word)", [("a ", 1.0), ("word", 1.1)]),
    ("a ((word))", [("a ", 1.0), ("word", 1.1 * 1.1)]),
    ("a [word]", [("a ", 1.0), ("word", 1 / 1.1)]),
    ("a (word:1.5)", [("a ", 1.0), ("word", 1.5)]),
    ("a (word:0.25)", [("a ", 1.0), ("word", 0.25)]),
    ("a \\(word\\)", [("a (word)", 1.0)]),
    ("a cat BREAK a dog", [("a cat", 1.0), BREAK, ("a dog", 1.0)]),
]


@pytest.mark.parametrize("text,expected", DOCUMENTED, ids=[text for text, _ in DOCUMENTED])
def test_parse_prompt_attention_gives_a1111s_documented_weights(text, expected):
    assert parse_prompt_attention(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("word)", [("word)", 1.0)]),  # a bracket never opened is text
    ("[word", [("word", 1 / 1.1)]),
    ("(word: 1.3)", [("word: 1.3", 1.1)]),  # no space allowed before the weight: it is text
    ("\\\\ and \\", [("\\ and ", 1.0)]),  # \\ is a backslash, a lone one is dropped
    ("", [("", 1.0)]),
    ("(a BREAK b)", [("a", 1.1), BREAK, ("b", 1.1)]),  # BREAK stays a break inside brackets
])
def test_parse_prompt_attention_edge_cases(text, expected):
    assert parse_prompt_attention(text) == expected


def test_a_weight_that_is_not_a_number_is_an_error():
    with pytest.raises(ValueError, match=r"'1\.2\.3'.*not a number"):
        parse_prompt_attention("(word:1.2.3)")


@functools.lru_cache()
def tokenizer(pad_token: str | None = None) -> CLIPTokenizer:
    return CLIPTokenizer(tiny.tokenizer_folder(pad_token))


def words(n: int) -> str:
    return " ".join(["cat"] * n)  # one token per word


def chunk_sizes(prompt: str, **kwargs) -> list[int]:
    return [len(ids) for ids, _ in chunk_prompt(tokenizer(), prompt, **kwargs)]


def test_full_chunk_moves_the_words_after_a_comma_in_its_last_20_tokens_to_the_next():
    prompt = words(70) + ", " + words(10)  # the comma is token 71 of 81
    assert chunk_sizes(prompt) == [71, 10]
    assert chunk_sizes(prompt, comma_backtrack=0) == [75, 6]
    assert chunk_sizes(words(40) + ", " + words(40)) == [75, 6]  # comma 35 tokens back: too far


def test_break_starts_a_new_chunk_and_weights_follow_their_tokens():
    chunks = chunk_prompt(tokenizer(), "a (cat:1.3) BREAK [dog]")
    assert [ids for ids, _ in chunks] == [tokenizer().tokenize("a cat"), tokenizer().tokenize("dog")]
    assert [weights for _, weights in chunks] == [[1.0, 1.3], [1 / 1.1]]
    assert chunk_sizes("") == [0] and chunk_sizes("BREAK cat") == [0, 1]


def ours_text_encoder(reference):
    model_class = CLIPTextModelWithProjection if isinstance(reference, transformers.CLIPTextModelWithProjection) \
        else CLIPTextModel
    model = model_class.from_config(reference.config.to_dict())
    model.load_state_dict(reference.state_dict(), strict=True)
    return model.eval()


@functools.lru_cache()
def sd_pair(family: str):
    """(diffusers pipeline, sd_core tokenizer, sd_core text encoder) with the same tiny weights."""
    reference = tiny.stable_diffusion(family)
    return reference, tokenizer("!" if family == "sd2" else None), ours_text_encoder(reference.text_encoder)


PROMPT = "a photo of a cat, high detail"


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@torch.no_grad()
def test_plain_short_prompt_is_exactly_the_plain_encoding(family):
    reference, tok, encoder = sd_pair(family)
    plain = encoder(tok([PROMPT])).last_hidden_state
    assert torch.equal(encode_weighted_prompt(tok, encoder, PROMPT), plain)
    expected, _ = reference.encode_prompt(PROMPT, "cpu", 1, False)
    assert relative_diff(plain, expected) <= 1e-5


@pytest.mark.parametrize("family", ["sd1", "sd2"])
@torch.no_grad()
def test_clip_skip_equals_diffusers_clip_skip(family):
    reference, tok, encoder = sd_pair(family)
    # diffusers 0.42 reaches the final LayerNorm through `text_encoder.text_model`, which transformers 5's
    # CLIPTextModel no longer has (its modules moved up a level): give it back as a plain attribute.
    object.__setattr__(reference.text_encoder, "text_model", reference.text_encoder)
    expected, _ = reference.encode_prompt(PROMPT, "cpu", 1, False, clip_skip=1)
    ours = encode_weighted_prompt(tok, encoder, PROMPT, clip_skip=1)
    assert relative_diff(ours, expected) <= 1e-5
    assert relative_diff(encode_weighted_prompt(tok, encoder, PROMPT), expected) > 1e-2  # another layer
    with pytest.raises(ValueError, match=r"clip_skip=2 must be an integer in \[0, 1\]"):
        encode_weighted_prompt(tok, encoder, PROMPT, clip_skip=2)


@torch.no_grad()
def test_long_prompt_is_encoded_in_77_token_chunks():
    _, tok, encoder = sd_pair("sd1")
    out = encode_weighted_prompt(tok, encoder, words(100))
    assert out.shape == (1, 154, 32)
    assert torch.equal(out[:, :77], encode_weighted_prompt(tok, encoder, words(75)))
    assert torch.equal(out[:, 77:], encode_weighted_prompt(tok, encoder, words(25)))


@torch.no_grad()
def test_prompts_encoded_together_are_padded_with_empty_chunks():
    _, tok, encoder = sd_pair("sd1")
    negative, positive = encode_weighted_prompt(tok, encoder, ["blurry", words(100)])
    assert negative.shape == positive.shape == (154, 32)
    assert torch.equal(negative[:77], encode_weighted_prompt(tok, encoder, "blurry")[0])
    assert torch.equal(negative[77:], encode_weighted_prompt(tok, encoder, "")[0])
    assert encode_weighted_prompt(tok, encoder, "blurry", num_chunks=3).shape == (1, 231, 32)


@torch.no_grad()
def test_weight_scales_its_tokens_states_then_the_chunk_mean_is_restored():
    _, tok, encoder = sd_pair("sd1")
    z = encoder(tok(["a cat"])).last_hidden_state  # "a " and "cat" tokenize as "a cat" does
    weighted = z.clone()
    weighted[:, 2] *= 1.3  # BOS, a, cat
    expected = weighted * (z.mean() / weighted.mean())
    ours = encode_weighted_prompt(tok, encoder, "a (cat:1.3)")
    assert relative_diff(ours, expected) <= 1e-6
    assert relative_diff(ours[:, 2] / ours[:, 1], 1.3 * z[:, 2] / z[:, 1]) <= 1e-5


@functools.lru_cache()
def sdxl_pair():
    reference = tiny.stable_diffusion("sdxl")
    return (reference, [tokenizer(None), tokenizer("!")],
            [ours_text_encoder(reference.text_encoder), ours_text_encoder(reference.text_encoder_2)])


@torch.no_grad()
def test_sdxl_plain_short_prompt_equals_diffusers():
    reference, tokenizers, encoders = sdxl_pair()
    embeddings, pooled = encode_weighted_prompt_sdxl(tokenizers, encoders, PROMPT)
    expected, _, expected_pooled, _ = reference.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    assert embeddings.shape == (1, 77, 64)
    assert relative_diff(embeddings, expected) <= 1e-5
    assert relative_diff(pooled, expected_pooled) <= 1e-5


@torch.no_grad()
def test_sdxl_long_prompt_pools_its_first_chunk_of_encoder_2():
    _, tokenizers, encoders = sdxl_pair()
    embeddings, pooled = encode_weighted_prompt_sdxl(tokenizers, encoders, words(75) + " dog " + words(30))
    first, first_pooled = encode_weighted_prompt_sdxl(tokenizers, encoders, words(75))
    assert embeddings.shape == (1, 154, 64)
    assert torch.equal(embeddings[:, :77], first) and torch.equal(pooled, first_pooled)
    with pytest.raises(ValueError, match="CLIPTextModelWithProjection"):
        encode_weighted_prompt_sdxl(tokenizers[:1], encoders[:1], PROMPT)
