"""What one visitor's request leaves behind never changes another's: embeddings bound for one request, and the
files, paths and bounds the app shares between visitors."""
import concurrent.futures
import functools

import numpy as np
import pytest
import safetensors.torch
import torch

from sd_core.app import handlers
from sd_core.app import parts as app_parts
from sd_core.pipelines.textual_inversion import embeddings_bound, load_embedding, token_embedding

SD = "embedded: shapes (text to image)"
SHINY = "embeddings: embeddings/shiny.safetensors"


@pytest.fixture
def model_root(tmp_path, monkeypatch):
    """A model root whose embeddings/shiny.safetensors (A1111's format) binds the word "shiny"."""
    pipe = app_parts.MODELS.get(SD)
    (tmp_path / "embeddings").mkdir()
    width = token_embedding(pipe.text_encoder).embedding_dim
    vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(0))
    safetensors.torch.save_file({"emb_params": vectors}, tmp_path / "embeddings" / "shiny.safetensors")
    monkeypatch.setattr(app_parts.Settings, "model_roots", [tmp_path])
    return tmp_path


def first_image(answer) -> np.ndarray:
    return np.asarray(answer[0][0][0])


def test_an_embedding_is_bound_for_its_request_only_and_an_interleaved_visitor_draws_the_plain_word(model_root):
    pipe = app_parts.MODELS.get(SD)
    weight, vocabulary = token_embedding(pipe.text_encoder).weight, dict(pipe.tokenizer.vocab)
    run = functools.partial(handlers.generate_images, SD, "a shiny red circle", "", 3, 5.0, "ddim", 64, 64, 3, 1)
    fresh = first_image(run())  # what a fresh server draws for the plain word
    embedded = first_image(run(embeddings=[SHINY]))
    assert not np.array_equal(embedded, fresh)  # the word meant the embedding's vectors for that request
    assert np.array_equal(first_image(run()), fresh)  # the next visitor, no embedding selected: the plain word
    visitors = [{"embeddings": [SHINY]}, {}] * 3
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # two visitors at once, in turn
        answers = list(pool.map(lambda chosen: first_image(run(**chosen)), visitors))
    for chosen, image in zip(visitors, answers):
        assert np.array_equal(image, embedded if chosen else fresh)
    assert token_embedding(pipe.text_encoder).weight is weight and pipe.tokenizer.vocab == vocabulary


def test_embeddings_bound_restores_the_tokenizer_and_matrix_even_when_binding_fails(model_root):
    pipe = app_parts.MODELS.get(SD)
    shiny = load_embedding(model_root / "embeddings" / "shiny.safetensors")
    weight, size, ids = token_embedding(pipe.text_encoder).weight, pipe.text_encoder.config.vocab_size, \
        pipe.tokenizer.encode("a shiny circle")
    with embeddings_bound(pipe, [shiny]) as tokens:
        assert tokens == ["shiny"] and pipe.tokenizer.encode("a shiny circle") != ids
        assert token_embedding(pipe.text_encoder).num_embeddings == size + 2
    wrong_width = load_embedding({"emb_params": torch.zeros(1, 3)})
    wrong_width.name = "other"
    with pytest.raises(ValueError, match="3-wide|takes"):
        with embeddings_bound(pipe, [shiny, wrong_width]):  # the first binds, the second fails
            pass
    with pytest.raises(RuntimeError, match="the request failed"):
        with embeddings_bound(pipe, [shiny]):
            raise RuntimeError("the request failed")
    embedding = token_embedding(pipe.text_encoder)
    assert embedding.weight is weight and torch.equal(embedding.weight, weight) and embedding.num_embeddings == size
    assert pipe.text_encoder.config.vocab_size == size and pipe.tokenizer.encode("a shiny circle") == ids
