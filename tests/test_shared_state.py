"""What one visitor's request leaves behind never changes another's: embeddings bound for one request, and the
files, paths and bounds the app shares between visitors."""
import concurrent.futures
import functools
import shutil

import numpy as np
import pytest
import safetensors.torch
import torch

from sd_core.app import handlers
from sd_core.app import parts as app_parts
from sd_core.checkpoints.catalog import EMBEDDED_TEXT_TO_IMAGE
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


# ------------------------------------------------------------------------------ files under the model roots


def lora_file(pipe, path):
    """A one-layer kohya LoRA for the embedded model's UNet."""
    name, module = next((n, m) for n, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Linear))
    safetensors.torch.save_file({f"lora_unet_{name.replace('.', '_')}.lora_down.weight": torch.ones(1, module.in_features),
                                 f"lora_unet_{name.replace('.', '_')}.lora_up.weight": torch.ones(module.out_features, 1)},
                                path)


@pytest.fixture
def linked_root(tmp_path, monkeypatch):
    """A model root with one genuine LoRA and embedding, and links out of it: loras/ and embeddings/ files linked to a
    LoRA, an embedding and /etc/passwd outside, a root .safetensors linked out, a folder linked out, a link loop."""
    pipe = app_parts.MODELS.get(SD)
    root, outside = tmp_path / "models", tmp_path / "outside"
    for folder in (root / "loras", root / "embeddings", outside / "more"):
        folder.mkdir(parents=True)
    lora_file(pipe, root / "loras" / "inside.safetensors")
    lora_file(pipe, outside / "lora.safetensors")
    lora_file(pipe, outside / "more" / "other.safetensors")
    width = token_embedding(pipe.text_encoder).embedding_dim
    for path in (root / "embeddings" / "glint-style.safetensors", outside / "embedding.safetensors"):
        safetensors.torch.save_file({"emb_params": torch.ones(1, width)}, path)
    links = {root / "loras" / "out.safetensors": outside / "lora.safetensors",
             root / "loras" / "passwd.safetensors": "/etc/passwd",
             root / "embeddings" / "out.safetensors": outside / "embedding.safetensors",
             root / "linked.safetensors": outside / "lora.safetensors",
             root / "also-inside.safetensors": root / "loras" / "inside.safetensors",  # a link within the root
             root / "more": outside / "more", root / "loop.safetensors": root / "loop.safetensors"}
    for link, target in links.items():
        link.symlink_to(target)
    monkeypatch.setattr(app_parts.Settings, "model_roots", [root.resolve()])
    return root, outside


def test_links_out_of_a_model_root_are_never_listed_opened_or_loaded(linked_root, monkeypatch):
    import os
    root, outside = linked_root
    opened, real_open = [], os.open
    monkeypatch.setattr(os, "open", lambda path, *args, **kwargs: opened.append(str(path)) or real_open(path, *args,
                                                                                                           **kwargs))
    from sd_core.app import model_choices
    model_choices.is_lora_file.cache_clear()
    assert [label for label, _ in app_parts.root_files("loras")] == ["loras: loras/inside.safetensors",
                                                                      "loras: also-inside.safetensors"]
    assert [label for label, _ in app_parts.root_files("embeddings")] == ["embeddings: embeddings/glint-style.safetensors"]
    assert not [label for label, _ in app_parts.model_choices("any") if label.startswith("models: ")]
    assert not [path for path in opened if not os.path.realpath(path).startswith(str(root.resolve()))], opened
    run = functools.partial(handlers.generate_images, SD, "a red circle", "", 2, 5.0, "ddim", 32, 32, 3, 1)
    for choice in ("loras: loras/out.safetensors", "loras: loras/passwd.safetensors", "loras: linked.safetensors",
                   "loras: more/other.safetensors"):
        with pytest.raises(Exception, match="not one of the offered loras"):
            run(lora_1=choice)
    with pytest.raises(Exception, match="not one of the offered embeddings"):
        run(embeddings=["embeddings: embeddings/out.safetensors"])
    run(lora_1="loras: also-inside.safetensors", embeddings=["embeddings: embeddings/glint-style.safetensors"])


@pytest.fixture
def fifo_root(tmp_path, monkeypatch):
    """A model root holding FIFOs named like weights (no writer ever comes), beside one genuine LoRA; unblocks any
    reader afterwards."""
    import os
    (tmp_path / "loras").mkdir()
    (tmp_path / "embeddings").mkdir()
    shutil.copytree(EMBEDDED_TEXT_TO_IMAGE, tmp_path / "folder")
    (tmp_path / "folder" / "unet" / "config.json").unlink()
    lora_file(app_parts.MODELS.get(SD), tmp_path / "loras" / "genuine.safetensors")
    fifos = [tmp_path / "model.safetensors", tmp_path / "loras" / "fifo.safetensors",
             tmp_path / "embeddings" / "fifo.safetensors", tmp_path / "folder" / "unet" / "config.json"]
    for fifo in fifos:
        os.mkfifo(fifo)
    monkeypatch.setattr(app_parts.Settings, "model_roots", [tmp_path.resolve()])
    yield tmp_path, fifos
    for fifo in fifos:  # a reader blocked on one (the bug) is released by a writer's open
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


def within(seconds: float, fn, *args):
    """fn(*args)'s result, or its exception; a failure if it has not returned within `seconds` (it blocked)."""
    import threading
    outcome = []

    def call():
        try:
            outcome.append(fn(*args))
        except Exception as error:  # noqa: BLE001 - handed to the test
            outcome.append(error)
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(seconds)
    assert outcome, f"{getattr(fn, '__name__', fn)}{args} blocked for {seconds} s"
    return outcome[0]


def test_a_fifo_named_like_weights_is_never_listed_and_never_blocks_a_reader(fifo_root):
    from sd_core.checkpoints.convert import CheckpointError
    from sd_core.checkpoints.loading import load_pipeline, read_weights
    from sd_core.pipelines.lora import load_lora
    root, fifos = fifo_root
    assert [label for label, _ in within(10, app_parts.root_files, "loras")] == ["loras: loras/genuine.safetensors"]
    assert within(10, app_parts.root_files, "embeddings") == []
    assert [label for label, _ in within(10, app_parts.model_choices, "any") if label.startswith("models: ")] == [
        "models: folder"]  # not the FIFO model.safetensors
    for read, fifo in ((read_weights, fifos[0]), (load_lora, fifos[1]), (load_embedding, fifos[2])):
        error = within(10, read, fifo)
        assert isinstance(error, CheckpointError) and "not a regular file" in str(error), error
    error = within(10, load_pipeline, root / "folder")
    assert isinstance(error, CheckpointError) and "not a regular file" in str(error), error
