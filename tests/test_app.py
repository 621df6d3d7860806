"""The app: handlers called directly, the launched server through gradio_client, and a real browser."""
import concurrent.futures
import shutil
import subprocess

import gradio as gr
import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image

import app

SD = "embedded: shapes (text to image)"
DIT = "embedded: shapes (DiT)"


def test_handlers_return_images_of_the_right_size_and_reuse_seeds():
    images, seed, trajectory, parameters = app.generate_images(SD, "a big red circle on the left on a gray background",
                                                               "", 6, 5.0, "dpmpp_2m", 64, 48, -1, 2, True)
    assert len(images) == 2 and images[0].size == (64, 48) and 0 <= seed < 2 ** 32
    assert len(trajectory) == 6 and '"seed": %d' % seed in parameters
    again, *_ = app.generate_images(SD, "a big red circle on the left on a gray background", "", 6, 5.0, "dpmpp_2m",
                                    64, 48, seed, 2, False)
    assert np.array_equal(np.asarray(images[1]), np.asarray(again[1]))
    reconstruction, difference, psnr, channels = app.roundtrip(SD, Image.open(app.EXAMPLE_SCENE))
    assert reconstruction.size == (64, 64) and psnr > 20 and len(channels) == 4
    dit_images, dit_seed = app.sample_dit(DIT, "red circle", 3.0, 5, "ddim", 3, 2)
    assert len(dit_images) == 2 and dit_images[0].size == (64, 64) and dit_seed == 3
    ours, theirs, difference, rows, verdict = app.compare_models(SD, "a red circle", "", 0, 4, "ddim", 5.0)
    assert ours.size == theirs.size == (64, 64) and "PASS" in verdict and rows[-1][-1] == "pass"


def test_handlers_check_sizes_and_steps_themselves():
    with pytest.raises(gr.Error, match="width must be between 8 and 1024"):
        app.generate_images(SD, "x", "", 5, 5.0, "ddim", 1000000, 64, 0, 1)
    with pytest.raises(gr.Error, match="steps must be between 1 and 100"):
        app.generate_images(SD, "x", "", -1, 5.0, "ddim", 64, 64, 0, 1)
    with pytest.raises(gr.Error, match="steps must be a whole number"):
        app.generate_images(SD, "x", "", 2.5, 5.0, "ddim", 64, 64, 0, 1)


@pytest.mark.parametrize("choice", ["/etc/passwd", "../", "models: ../../etc", "sd_core/weights/shapes-sd",
                                    "stabilityai/sdxl"])
def test_model_paths_outside_the_offered_models_are_refused(choice):
    with pytest.raises(gr.Error, match="not one of the offered models"):
        app.resolve_source(choice)


@pytest.fixture(scope="module")
def server():
    demo = app.build().queue(max_size=32, default_concurrency_limit=2)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server, verbose=False)


def test_every_endpoint_works_through_gradio_client(client, tmp_path):
    images, seed, _, parameters = client.predict(SD, "a small blue square in the center on a white background", "", 5,
                                                 5.0, "euler", 64, 64, 11, 1, False, api_name="/text_to_image")
    assert seed == 11 and Image.open(images[0]["image"]).size == (64, 64)
    again = client.predict(SD, "a small blue square in the center on a white background", "", 5, 5.0, "euler", 64, 64,
                           11, 1, False, api_name="/text_to_image")
    assert np.array_equal(np.asarray(Image.open(images[0]["image"])), np.asarray(Image.open(again[0][0]["image"])))
    reconstruction, _, psnr, channels = client.predict(SD, handle_file(str(app.EXAMPLE_SCENE)), False, 0,
                                                       api_name="/vae_roundtrip")
    assert Image.open(reconstruction).size == (64, 64) and psnr > 20 and len(channels) == 4
    dit_images, dit_seed = client.predict(DIT, "green square", 3.0, 5, "dpmpp_2m", 5, 2, "all", api_name="/dit_sample")
    assert dit_seed == 5 and len(dit_images) == 2
    ours, theirs, _, table, verdict = client.predict(SD, "a red circle", "", 1, 3, "ddim", 5.0, api_name="/compare")
    assert Image.open(ours).size == (64, 64) and "PASS" in verdict


@pytest.mark.parametrize("endpoint,arguments,message", [
    ("/text_to_image", [SD, "x", "", 5, 5.0, "ddim", 1000000, 64, 0, 1, False], "greater than maximum value 1024"),
    ("/text_to_image", [SD, "x", "", -1, 5.0, "ddim", 64, 64, 0, 1, False], "less than minimum value 1"),
    ("/text_to_image", ["/etc/passwd", "x", "", 5, 5.0, "ddim", 64, 64, 0, 1, False], "not in the list of choices|not one of the offered"),
    ("/text_to_image", ["../", "x", "", 5, 5.0, "ddim", 64, 64, 0, 1, False], "not in the list of choices|not one of the offered"),
    ("/dit_sample", [DIT, "unicorn", 3.0, 5, "ddim", 0, 1, "all"], "Unknown class label"),
])
def test_bad_input_gets_a_clear_error_and_the_app_keeps_serving(client, endpoint, arguments, message):
    with pytest.raises(Exception, match=message):
        client.predict(*arguments, api_name=endpoint)
    assert client.predict(DIT, "red circle", 1.0, 2, "ddim", 0, 1, "all", api_name="/dit_sample")[1] == 0


def test_a_non_image_upload_is_refused(client, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(Exception):
        client.predict(SD, handle_file(str(tmp_path / "notes.txt")), False, 0, api_name="/vae_roundtrip")
    with pytest.raises(gr.Error, match="Cannot read"):
        app.roundtrip(SD, str(tmp_path / "notes.txt"))


def test_twenty_concurrent_requests_all_complete_correctly(server):
    def request(seed):
        images, used, _, _ = Client(server, verbose=False).predict(
            SD, "a big green triangle on the right on a black background", "", 4, 5.0, "ddim", 64, 64, seed, 1, False,
            api_name="/text_to_image")
        return seed, used, np.asarray(Image.open(images[0]["image"]))
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(request, range(20)))
    assert [used for _, used, _ in results] == list(range(20))
    expected, *_ = app.generate_images(SD, "a big green triangle on the right on a black background", "", 4, 5.0, "ddim",
                                       64, 64, 7, 1, False)
    assert np.array_equal(results[7][2], np.asarray(expected[0]))


def test_a_request_over_the_queue_limit_is_told_the_queue_is_full():
    demo = app.build().queue(max_size=1, default_concurrency_limit=1)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True)
    try:
        def request(_):
            try:
                Client(url, verbose=False).predict(SD, "x", "", 40, 5.0, "ddim", 64, 64, 0, 8, False,
                                                   api_name="/text_to_image")
                return "ok"
            except Exception as error:  # noqa: BLE001 (the client reports the server's message)
                return str(error)
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            outcomes = list(pool.map(request, range(6)))
        assert "ok" in outcomes and any("queue is full" in o.lower() for o in outcomes), outcomes
    finally:
        demo.close()


def test_a_browser_shows_the_four_tabs(server, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=8000"]
    dom = subprocess.run(flags + ["--dump-dom", server], capture_output=True, text=True, timeout=120).stdout
    for tab in ("Text to image", "VAE round-trip", "DiT", "Compare"):
        assert tab in dom, tab
    screenshot = tmp_path / "app.png"
    subprocess.run(flags + ["--window-size=1280,900", f"--screenshot={screenshot}", server], capture_output=True,
                   timeout=120)
    assert Image.open(screenshot).size == (1280, 900)
