"""The app: handlers called directly, the launched server through gradio_client, and a real browser."""
import concurrent.futures
import inspect
import os
import shutil
import subprocess
import sys
import time
import types
import urllib.parse
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import torch
from gradio_client import Client, handle_file
from PIL import Image

import app

SD = "embedded: shapes (text to image)"
DIT = "embedded: shapes (DiT)"


def test_handlers_return_images_of_the_right_size_and_reuse_seeds():
    images, seed, trajectory, parameters, link = app.generate_images(SD, "a big red circle on the left on a gray background",
                                                               "", 6, 5.0, "dpmpp_2m", 64, 48, -1, 2, True)
    assert len(images) == 2 and images[0].size == (64, 48) and 0 <= seed < 2 ** 32
    assert len(trajectory) == 6 and '"seed": %d' % seed in parameters
    again, *_ = app.generate_images(SD, "a big red circle on the left on a gray background", "", 6, 5.0, "dpmpp_2m",
                                    64, 48, seed, 2, False)
    assert np.array_equal(np.asarray(images[1]), np.asarray(again[1]))
    reconstruction, difference, psnr, channels = app.roundtrip(SD, Image.open(app.EXAMPLE_SCENE))
    assert reconstruction.size == (64, 64) and psnr > 20 and len(channels) == 4
    dit_images, dit_seed, _ = app.sample_dit(DIT, "red circle", 3.0, 5, "ddim", 3, 2)
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


@pytest.mark.parametrize("space", [False, True])
@pytest.mark.parametrize("choice", ["/etc/passwd", "../", "models: ../../etc", "sd_core/weights/shapes-sd",
                                    "stabilityai/sdxl"])
def test_model_paths_outside_the_offered_models_are_refused(choice, space, monkeypatch):
    if space:  # a Space offers the curated hub models, but no other hub id and no local path
        monkeypatch.setenv("SPACE_ID", "someone/sd_core")
    with pytest.raises(gr.Error, match="not one of the offered models"):
        app.resolve_source(choice)


@pytest.fixture(scope="module")
def server():
    demo = app.build().queue(max_size=32, default_concurrency_limit=2)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=None, quiet=True,
                            css=app.CSS)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server, verbose=False)


def test_every_endpoint_works_through_gradio_client(client, tmp_path):
    images, seed, _, parameters, _ = client.predict(SD, "a small blue square in the center on a white background", "", 5,
                                                 5.0, "euler", 64, 64, 11, 1, False, api_name="/text_to_image")
    assert seed == 11 and Image.open(images[0]["image"]).size == (64, 64)
    again = client.predict(SD, "a small blue square in the center on a white background", "", 5, 5.0, "euler", 64, 64,
                           11, 1, False, api_name="/text_to_image")
    assert np.array_equal(np.asarray(Image.open(images[0]["image"])), np.asarray(Image.open(again[0][0]["image"])))
    reconstruction, _, psnr, channels = client.predict(SD, handle_file(str(app.EXAMPLE_SCENE)), False, 0,
                                                       api_name="/vae_roundtrip")
    assert Image.open(reconstruction).size == (64, 64) and psnr > 20 and len(channels) == 4
    dit_images, dit_seed, _ = client.predict(DIT, "green square", 3.0, 5, "dpmpp_2m", 5, 2, "all", api_name="/dit_sample")
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
        images, used, *_ = Client(server, verbose=False).predict(
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


def test_api_parameters_are_named_after_the_ui_labels_and_take_keywords(client):
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    for name in ("/text_to_image", "/vae_roundtrip", "/dit_sample", "/compare"):
        for parameter in endpoints[name]["parameters"]:
            assert parameter["parameter_name"].replace("_", " ") in parameter["label"].lower(), (name, parameter)
    assert [p["parameter_name"] for p in endpoints["/text_to_image"]["parameters"]][:3] == [
        "model", "prompt", "negative_prompt"]
    assert [r["label"] for r in endpoints["/text_to_image"]["returns"]][-1] == "Share link"
    images, seed, *_ = client.predict(prompt="a big red circle on the left on a gray background", seed=5,
                                      number_of_images=1, api_name="/text_to_image")
    assert seed == 5 and len(images) == 1


def test_picking_a_model_sets_its_recommended_settings(client, monkeypatch):
    assert client.predict(SD, api_name="/recommended_settings") == (20, 5.0, "dpmpp_2m", 64, 64)
    monkeypatch.setenv("SPACE_ID", "someone/sd_core")
    assert app.recommended_settings("SDXL-Turbo") == (1, 0.0, app.MODEL_DEFAULT, 512, 512)
    assert app.recommended_dit_settings("DiT-XL/2 256") == (4.0, 25, app.MODEL_DEFAULT)


def test_scheduler_choices_show_common_names_and_take_the_models_own():
    assert ("DPM++ 2M Karras", "dpmpp_2m_karras") in app.SCHEDULER_CHOICES
    images, *_ = app.generate_images(SD, "a red circle", "", 3, 5.0, app.MODEL_DEFAULT, 64, 64, 0, 1)
    assert images[0].size == (64, 64)


def test_a_space_offers_the_curated_hub_models_labelled_with_their_size(monkeypatch):
    assert all("hub" not in label for label, _ in app.model_choices("text_to_image"))
    monkeypatch.setenv("SPACE_ID", "someone/sd_core")
    choices = dict(app.model_choices("text_to_image"))
    assert choices["Stable Diffusion XL base 1.0 (hub, 6.9 GB)"] == "Stable Diffusion XL base 1.0"
    assert "DiT-XL/2 256 (hub, 1.5 GB)" in dict(app.model_choices("dit"))
    assert app.resolve_source("SD-Turbo") == "stabilityai/sd-turbo"


@pytest.fixture
def hub_loads(monkeypatch):
    """Records what reaches load_from_hub / load_pipeline instead of downloading."""
    calls = []
    monkeypatch.setattr(app, "load_from_hub", lambda source, **kw: calls.append(("hub", source, kw)) or "pipe")
    monkeypatch.setattr(app, "load_pipeline", lambda source, **kw: calls.append(("disk", source, kw)) or "pipe")
    monkeypatch.setattr(app, "MODELS", app.ModelCache())
    return calls


def test_hub_models_load_from_the_hub_in_fp16_on_a_gpu_never_from_the_local_disk(hub_loads, monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/sd_core")
    monkeypatch.setattr(app.Settings, "dtype", torch.float16)
    monkeypatch.setattr(app, "available_memory_gb", lambda: 100.0)
    steps = []
    app.MODELS.get("Stable Diffusion 1.5", lambda fraction, desc: steps.append((fraction, desc)))
    kind, source, options = hub_loads[0]
    assert (kind, source, options["variant"]) == ("hub", "stable-diffusion-v1-5/stable-diffusion-v1-5", "fp16")
    options["on_file"]("unet/diffusion_pytorch_model.fp16.safetensors", 2, 5, 1_720_000_000)
    assert steps == [((1, 5), "downloading stable-diffusion-v1-5/stable-diffusion-v1-5: "
                               "unet/diffusion_pytorch_model.fp16.safetensors (1.72 GB)")]
    monkeypatch.setattr(app.Settings, "allow_hub", True)  # any owner/name, even one that exists on this disk
    assert Path("sd_core/weights").is_dir()
    app.MODELS.get("sd_core/weights")
    assert hub_loads[1][:2] == ("hub", "sd_core/weights")
    app.MODELS.get(SD)
    assert hub_loads[2][0] == "disk"


def test_a_model_too_big_for_the_machine_is_refused_with_what_it_needs(hub_loads, monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/sd_core")
    monkeypatch.setattr(app, "available_memory_gb", lambda: 4.0)
    with pytest.raises(gr.Error, match=r"Stable Diffusion XL base 1.0 needs about 13.8 GB .* has 4.0 GB free"):
        app.MODELS.get("Stable Diffusion XL base 1.0")  # fp32 on this CPU: twice the fp16 size
    assert hub_loads == [] and app.available_memory_gb.__module__ == __name__  # patched, so nothing loaded


def test_gpu_work_runs_inside_spaces_gpu_when_that_package_exists(monkeypatch):
    assert app.on_gpu(app.random_seed) is app.random_seed  # no `spaces` here: nothing changes
    wrapped = []

    def gpu(duration):
        def decorate(fn):
            def run(*args, **kwargs):
                wrapped.append(duration(*args, **kwargs))
                return fn(*args, **kwargs)
            return run
        return decorate
    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=gpu))
    handler = app.handler(app.generate_images.__wrapped__)
    assert list(inspect.signature(handler).parameters)[:2] == ["model", "prompt"]
    handler(SD, "a red circle", "", 2, 5.0, "ddim", 64, 64, 0, 1)
    with pytest.raises(gr.Error, match="number_of_images must be between 1 and 8"):  # sized, then refused
        handler(SD, "a red circle", "", 50, 5.0, "ddim", 1024, 1024, 0, 9)
    assert wrapped[0] < wrapped[1] <= 300
    with pytest.raises(gr.Error, match="steps must be"):
        handler(SD, "a red circle", "", 0, 5.0, "ddim", 64, 64, 0, 1)


class FakeRequest:
    def __init__(self, query: str):
        self.query_params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
        self.headers = {}


def test_a_share_link_made_after_a_run_restores_the_tab_model_and_settings(client):
    images, seed, _, _, link = client.predict(SD, "a small blue square in the center on a white background", "", 7,
                                              3.5, "euler_karras", 64, 72, -1, 2, False, api_name="/text_to_image")
    query = link.split("(", 1)[1].rstrip(")").split("?", 1)[1]
    demo = app.build()
    load = next(d for d in demo.fns.values() if d.name == "on_load")
    updates = load.fn(FakeRequest(query))
    tabs, model, prompt, negative, steps, guidance, scheduler, width, height, seed_box, number, _, gallery, used = \
        updates[:14]
    assert tabs.selected == "text_to_image" and model == SD and prompt.startswith("a small blue square")
    assert (steps, guidance, scheduler, width, height, seed_box, number) == (7, 3.5, "euler_karras", 64, 72, seed, 2)
    assert used == seed and np.array_equal(np.asarray(gallery[0]), np.asarray(Image.open(images[0]["image"])))
    dit_link = client.predict(DIT, "green square", 2.5, 4, "ddim", 9, 1, "first3", api_name="/dit_sample")[2]
    updates = load.fn(FakeRequest(dit_link.split("?", 1)[1].rstrip(")")))
    assert updates[0].selected == "dit" and updates[-11:-3] == [DIT, "green square", 2.5, 4, "ddim", 9, 1, "first3"]


def test_the_first_page_shows_a_picture_and_a_bad_link_value_is_ignored():
    demo = app.build()
    load = next(d for d in demo.fns.values() if d.name == "on_load")
    updates = load.fn(FakeRequest(""))
    assert len(updates[12]) == 4 and updates[13] >= 0  # four images and the seed used, before any click
    updates = load.fn(FakeRequest("tab=text_to_image&model=%2Fetc%2Fpasswd&steps=abc&scheduler=nonsense"))
    assert updates[1] == SD and updates[4] == 20 and updates[6] == "dpmpp_2m"


def test_app_py_started_as_on_a_space_listens_on_all_interfaces_and_serves(tmp_path):
    import psutil
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": str(port), "SPACE_ID": "someone/sd_core"}
    process = subprocess.Popen([sys.executable, "app.py"], env=env, cwd=Path(app.__file__).parent,
                               stdout=open(tmp_path / "log", "w"), stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            listening = [c.laddr for c in psutil.Process(process.pid).net_connections("tcp") if c.status == "LISTEN"]
            if listening:
                break
            assert process.poll() is None, (tmp_path / "log").read_text()
            time.sleep(0.5)
        assert listening == [("0.0.0.0", port)]
        client = Client(f"http://127.0.0.1:{port}", verbose=False)
        choices = next(c for c in client.config["components"] if c["props"].get("label") == "Model")["props"]["choices"]
        assert ["SD-Turbo (hub, 2.6 GB)", "SD-Turbo"] in choices
        images, seed, *_ = client.predict(SD, "a red circle", "", 4, 5.0, "ddim", 64, 64, 2, 1, False,
                                          api_name="/text_to_image")
        assert seed == 2 and Image.open(images[0]["image"]).size == (64, 64)
    finally:
        process.terminate()
        process.wait(30)
