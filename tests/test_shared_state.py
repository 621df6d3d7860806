"""What one visitor's request leaves behind never changes another's: embeddings bound for one request, and the
files, paths and bounds the app shares between visitors."""
import concurrent.futures
import functools
import os
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from sd_core.app import handlers
from sd_core.app import parts as app_parts
from sd_core.checkpoints.catalog import EMBEDDED_TEXT_TO_IMAGE
from sd_core.pipelines.textual_inversion import embeddings_bound, load_embedding, token_embedding
from tests.launch import free_port

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


def test_the_fast_path_s_text_cache_never_hands_one_visitor_s_embedding_to_another(model_root):
    """The fast path keeps recent prompts' encodings (keyed on token ids and the encoder's weights): once the
    embedding is unbound, the plain word's encoding is the fresh one again."""
    run = functools.partial(handlers.generate_images, SD, "a shiny red circle", "", 3, 5.0, "ddim", 64, 64, 3, 1,
                            fast=True)
    fresh = first_image(run())
    embedded = first_image(run(embeddings=[SHINY]))
    assert not np.array_equal(embedded, fresh)
    assert np.array_equal(first_image(run()), fresh)
    assert np.array_equal(first_image(run(embeddings=[SHINY])), embedded)


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
    from sd_core.checkpoints.loading import load_pipeline
    from sd_core.checkpoints.weights_files import read_weights
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


# ------------------------------------------------------------------------------------------------- work bound


def test_a_prompt_s_chunks_are_priced_so_333_breaks_are_refused_where_a_plain_prompt_runs(monkeypatch):
    from sd_core.app.serving import WorkLimits, check_request
    limits = WorkLimits.for_device("cpu")
    assert check_request(limits, "text_to_image", 512 * 512, 8, 1) <= limits.max_seconds  # 2.1 of 2.73 Mpx-steps
    pipe = app_parts.MODELS.get(SD)
    breaks = "a red circle " + "BREAK " * 330  # within the 2000 characters a prompt may have
    chunks = app_parts.prompt_chunks(pipe, "a1111", breaks, "")
    assert chunks > 300 and app_parts.prompt_chunks(pipe, "plain", breaks, "") == 1
    with pytest.raises(ValueError, match=rf"^512x512 x 8 steps x a prompt of {chunks} chunks is .* Reduce the size, "
                                         r"steps or prompt \(its BREAKs and length\)\.$"):
        check_request(limits, "text_to_image", 512 * 512, 8, 1, chunks=chunks)
    monkeypatch.setattr(handlers, "generate", lambda *args, **kwargs: pytest.fail("the priced-out request ran"))
    with pytest.raises(Exception, match="a prompt of .* chunks"):
        handlers.generate_images(SD, breaks, "", 8, 5.0, "ddim", 512, 512, 0, 1, prompt_syntax="a1111")


def test_one_outlier_never_sets_the_learned_speed_and_consistent_runs_do():
    from sd_core.app.serving import WorkLimits
    limits = WorkLimits.for_device("cpu")
    prior = limits.rate("text_to_image:m")
    limits.observe("text_to_image:m", seconds=prior * 10 * 2.1, pixels=512 * 512, steps=8)  # one run 10x slower
    assert limits.rate("text_to_image:m") == prior
    limits.observe("text_to_image:m", seconds=prior / 10 * 2.1, pixels=512 * 512, steps=8)  # one 10x faster
    assert limits.rate("text_to_image:m") == prior
    for _ in range(3):  # this machine really is twice as slow: three runs say so
        limits.observe("text_to_image:m", seconds=prior * 2 * 0.262144 * 8, pixels=512 * 512, steps=8)
    assert limits.rate("text_to_image:m") == pytest.approx(prior * 2)
    limits.observe("text_to_image:n", seconds=91.5, pixels=512 * 512, steps=8, chunks=334)  # 333 BREAKs, priced
    limits.observe("text_to_image:n", seconds=91.5, pixels=512 * 512, steps=8, chunks=334)
    assert limits.rate("text_to_image:n") <= prior  # per unit of priced work they ran fast: plain runs still fit


def kohya_header_file(path, tensors: int):
    """A .safetensors LoRA of `tensors` one-float tensors, written from its header (fast for 10^6)."""
    import json
    header = {f"lora_unet_x{i}.alpha": {"dtype": "F32", "shape": [], "data_offsets": [4 * i, 4 * i + 4]}
              for i in range(tensors)}
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4 * tensors)
    return path


@pytest.mark.parametrize("tensors, message", [(20_001, "holds 20001 tensors; a LoRA has at most 20000"),
                                              pytest.param(10 ** 6, "-byte header; files of its kind have at most "
                                                           "33554432", marks=pytest.mark.slow)])
def test_a_lora_of_too_many_tensors_is_refused_from_its_header_before_any_is_read(tmp_path, monkeypatch, tensors,
                                                                                  message):
    from sd_core.checkpoints.convert import CheckpointError
    from sd_core.pipelines import lora
    path = kohya_header_file(tmp_path / "many.safetensors", tensors)
    monkeypatch.setattr(lora, "read_weights", lambda *args: pytest.fail("the tensors were read"))
    with pytest.raises(CheckpointError, match=message):
        lora.load_lora(path)
    with pytest.raises(CheckpointError, match="holds 20001 tensors"):
        lora.load_lora({f"lora_unet_x{i}.alpha": torch.ones(()) for i in range(20_001)})


# ---------------------------------------------------------------------------------------- cleaning results


@pytest.fixture
def served(tmp_path, monkeypatch):
    """The app launched with its own gradio temp folder, where another app already keeps a file."""
    import app
    from sd_core.app import layout
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    foreign = tmp_path / "gradio" / "another-app" / "kept.png"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"another app's file")
    demo = app.build().queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                            css=layout.CSS)
    yield demo, url.rstrip("/"), foreign
    demo.close()


def ours(demo) -> set:
    return {path for files in demo.temp_file_sets for path in files}


def test_cleaning_deletes_only_this_app_s_files_never_a_young_one_and_a_served_result_completes(served):
    import httpx
    from gradio.route_utils import delete_files_created_by_app
    from gradio_client import Client
    demo, url, foreign = served
    frequency, age = demo.delete_cache  # the rule gradio runs every `frequency` seconds while the app serves
    assert age >= 300  # never a file younger than a few minutes
    before = ours(demo)  # the examples and default images gradio copied at start (kept while the app runs)
    Client(url, verbose=False).predict(SD, "a red circle", "", 2, 5.0, "ddim", 64, 64, 0, 1, False,
                                       api_name="/text_to_image")
    result, = [path for path in ours(demo) - before if path.endswith(".png")]
    delete_files_created_by_app(demo, age)
    with httpx.stream("GET", f"{url}/gradio_api/file={result}", timeout=30) as response:
        body = b"".join(response.iter_bytes())
    assert response.status_code == 200 and len(body) == int(response.headers["content-length"]) > 0
    delete_files_created_by_app(demo, 0)  # every file of this app, whatever its age
    assert not os.path.exists(result) and foreign.read_bytes() == b"another app's file"


def test_a_result_being_downloaded_is_never_rewritten_in_place_by_a_request_with_the_same_picture(tmp_path,
                                                                                                   monkeypatch):
    """gradio names a result by its content's hash: two VAE round-trips of one image write the same file. Written in
    place, the second truncated it under a download of the first (h11: "Too little data for declared
    Content-Length", the suite's intermittent failure); here its write fails half way, which in place would leave a
    short file."""
    from gradio import processing_utils
    from PIL import Image
    picture = Image.effect_noise((128, 128), 64).convert("RGB")
    path = processing_utils.save_pil_to_cache(picture, str(tmp_path), format="png")
    whole = Path(path).read_bytes()

    def write_half_then_fail(self, data):
        with open(self, "wb") as file:
            file.write(data[:10])
        raise OSError(28, "No space left on device")
    with open(path, "rb") as download:
        first = download.read(100)
        monkeypatch.setattr(Path, "write_bytes", write_half_then_fail)
        with pytest.raises(OSError):
            processing_utils.save_pil_to_cache(picture, str(tmp_path), format="png")  # another visitor's request
        monkeypatch.undo()
        assert first + download.read() == whole
    assert Path(path).read_bytes() == whole


def test_a_finished_comparison_leaves_no_folder_and_its_report_is_in_gradio_s_cache(tmp_path, monkeypatch):
    import tempfile
    import zipfile
    import app
    from sd_core.app import compare_tab
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    compare = compare_tab.compare_handler(app.comparisons)
    archive = compare("vae", SD, image=str(compare_tab.EXAMPLE_SCENE), seed=0)[-1]
    assert not [name for name in os.listdir(tmp_path / "tmp") if name.startswith("sd_core-compare")]  # it went
    assert Path(archive).resolve().is_relative_to((tmp_path / "gradio").resolve())
    assert "vae/report.md" in zipfile.ZipFile(archive).namelist()


def test_the_launched_app_leaves_cleaning_to_gradio_s_own_rule(monkeypatch):
    """`python app.py` starts no cleaner of its own (one swept the whole shared gradio temp folder, other apps'
    files and results still being downloaded): gradio's delete_cache, which deletes only this app's files, is it."""
    import threading
    import gradio as gr
    import app
    from sd_core.app import launch
    launched, started = [], []
    monkeypatch.setattr(gr.Blocks, "launch", lambda demo, **options: launched.append(demo) or (None, "http://x/", None))
    monkeypatch.setattr(gr.Blocks, "block_thread", lambda demo: None)
    monkeypatch.setattr(threading.Thread, "start", lambda thread: started.append(thread.name))
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    launch.main([], app.comparisons)
    assert len(launched) == 1 and launched[0].delete_cache[1] >= 300 and started == []


# --------------------------------------------------------------------------------------- what the app says


def test_messages_to_visitors_name_files_relative_to_their_root_never_the_server_s_folders(tmp_path, monkeypatch):
    import gradio as gr
    root = tmp_path / "models"
    (root / "loras").mkdir(parents=True)
    safetensors.torch.save_file({"lora_unet_no_such_layer.lora_down.weight": torch.ones(1, 4),
                                 "lora_unet_no_such_layer.lora_up.weight": torch.ones(4, 1)},
                                root / "loras" / "alien.safetensors")
    (root / "broken").mkdir()
    (root / "broken" / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", "unet": '
                                                      '["diffusers", "UNet2DConditionModel"]}')
    monkeypatch.setattr(app_parts.Settings, "model_roots", [root.resolve()])
    run = functools.partial(handlers.generate_images, SD, "a red circle", "", 2, 5.0, "ddim", 32, 32, 0, 1)
    with pytest.raises(gr.Error) as alien:
        run(lora_1="loras: loras/alien.safetensors")  # sd_core's message names the file by its full path
    assert alien.value.message.startswith("loras/alien.safetensors does not fit this model")
    with pytest.raises(gr.Error) as broken:
        handlers.generate_images("models: broken", "x", "", 2, 5.0, "ddim", 32, 32, 0, 1)
    with pytest.raises(gr.Error) as upload:
        handlers.roundtrip(SD, {"path": str(tmp_path / "gradio" / "0123abcd" / "gone.png")})
    for refused in (alien, broken, upload):
        assert str(tmp_path) not in refused.value.message and "/tmp" not in refused.value.message, refused.value.message
    assert "gone.png" in upload.value.message
