"""The tokenizer under hostile prompts (issue 19, item 6): a word of any length is tokenized in bounded time,
with the ids transformers gives, and the word cache stays bounded."""
import random
import time

import pytest
import transformers

from sd_core import tokenizer as tokenizer_module
from sd_core.tokenizer import CACHED_WORD_LENGTH, CACHED_WORDS, CLIPTokenizer


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip")
    CLIPTokenizer().save(folder)
    return CLIPTokenizer(folder), transformers.CLIPTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("alphabet", ["abcdefghijklmnopqrstuvwxyz", "ab", "a", "éàü日本", "x1-!"])
def test_long_words_give_transformers_ids(pair, alphabet):
    ours, reference = pair
    rng = random.Random(len(alphabet))
    text = " ".join("".join(rng.choice(alphabet) for _ in range(length)) for length in (1, 7, 65, 400, 1500))
    assert ours.tokenize(text) == reference(text, add_special_tokens=False)["input_ids"]


def test_a_100000_letter_word_is_not_cached_and_ends_in_bounded_time(pair):
    ours, _ = pair
    word = "".join(random.Random(0).choice("abcdefghijklmnopqrstuvwxyz") for _ in range(100_000))
    before = ours._bpe_cached.cache_info().currsize
    start = time.perf_counter()
    ids = ours.tokenize(word)
    took = time.perf_counter() - start
    # The old whole-word rescan took 34 s for 10,000 letters here (quadratic: ~an hour for 100,000).
    assert took < 60, f"{took:.1f} s"
    assert len(ids) > 10_000
    assert ours._bpe_cached.cache_info().currsize == before


def test_word_cache_is_an_lru_of_bounded_size(monkeypatch):
    monkeypatch.setattr(tokenizer_module, "CACHED_WORDS", 3)
    tokenizer = CLIPTokenizer()
    tokenizer.tokenize("one two three four five six")
    assert tokenizer._bpe_cached.cache_info().currsize == 3
    assert tokenizer.tokenize("x" * CACHED_WORD_LENGTH) == CLIPTokenizer().tokenize("x" * CACHED_WORD_LENGTH)
    assert CACHED_WORDS * CACHED_WORD_LENGTH <= 1_000_000  # at most ~a million cached characters
