"""The app: handlers called directly, the launched server through gradio_client, and a real browser."""
import concurrent.futures
import functools
import inspect
import json
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
from PIL.PngImagePlugin import PngInfo

import app
from sd_core.app import compare_tab
from sd_core.app import handlers
from sd_core.app import layout
from tests.helpers import assert_images_match
from tests.launch import free_port
from sd_core.app import model_choices as app_models
from sd_core.app import parts as app_parts
from sd_core.pipelines.textual_inversion import token_embedding
from sd_core.pipelines.image_io import psnr
from sd_core.pipelines.metadata import read_png_parameters

compare = compare_tab.compare_handler(app.comparisons)

SD = "embedded: shapes (text to image)"
DIT = "embedded: shapes (DiT)"


def test_handlers_return_images_of_the_right_size_and_reuse_seeds():
    images, seed, trajectory, parameters, link = handlers.generate_images(SD, "a big red circle on the left on a gray background",
                                                               "", 6, 5.0, "dpmpp_2m", 64, 48, -1, 2, True)
    seed = int(seed)
    assert len(images) == 2 and images[0][0].size == (64, 48) and 0 <= seed < 2 ** 32
    assert [caption for _, caption in images] == [f"seed {seed}", f"seed {(seed + 1) % 2 ** 32}"]
    assert [caption for _, caption in trajectory] == [f"step {i}" for i in range(1, 7)]
    assert '"seed": %d' % seed in parameters
    again, *_ = handlers.generate_images(SD, "a big red circle on the left on a gray background", "", 6, 5.0, "dpmpp_2m",
                                    64, 48, (seed + 1) % 2 ** 32, 1, False)  # image k of a batch is seed + k's image
    # the batch's UNet runs 4 rows, the single run 2: oneDNN's blocking may move a value across a rounding edge
    # (4 of 100 random seeds: 1 pixel, 1 level), so image k matches by the project's 8-bit rule, as in test_pipelines
    assert_images_match([images[1][0]], np.asarray(again[0][0])[None] / 255.0)
    reconstruction, difference, psnr, channels = handlers.roundtrip(SD, Image.open(layout.EXAMPLE_SCENE))
    assert reconstruction.size == (64, 64) and psnr > 20 and len(channels) == 4
    dit_images, dit_seed, _, semantics = handlers.sample_dit(DIT, "red circle", 3.0, 5, "ddim", 3, 2)
    assert len(dit_images) == 2 and dit_images[0][0].size == (64, 64) and dit_seed == "3"
    assert [caption for _, caption in dit_images] == ["seed 3", "seed 4"] and "**diffusers**" in semantics
    verdict, images, plots, rows, report = compare("text_to_image", SD, "a red circle", seed=0, steps=4)
    assert [caption for _, caption in images][:2] == ["sd_core", "diffusers"] and images[0][0].size == (64, 64)
    assert "✅ PASS" in verdict and rows[-1][-1] == "yes" and [c for _, c in plots] == ["per-step", "per-module"]


def test_handlers_check_sizes_and_steps_themselves():
    with pytest.raises(gr.Error, match="width must be a whole number from 8 to 1024"):
        handlers.generate_images(SD, "x", "", 5, 5.0, "ddim", 1000000, 64, 0, 1)
    with pytest.raises(gr.Error, match="steps must be a whole number from 1 to 100"):
        handlers.generate_images(SD, "x", "", -1, 5.0, "ddim", 64, 64, 0, 1)
    with pytest.raises(gr.Error, match="steps must be a whole number"):
        handlers.generate_images(SD, "x", "", 2.5, 5.0, "ddim", 64, 64, 0, 1)


@pytest.mark.parametrize("space", [False, True])
@pytest.mark.parametrize("choice", ["/etc/passwd", "../", "models: ../../etc", "sd_core/weights/shapes-sd",
                                    "stabilityai/sdxl"])
def test_model_paths_outside_the_offered_models_are_refused(choice, space, monkeypatch):
    if space:  # a Space offers the curated hub models, but no other hub id and no local path
        monkeypatch.setenv("SPACE_ID", "someone/sd_core")
    with pytest.raises(gr.Error, match="not one of the offered models"):
        app_parts.resolve_source(choice)


DEFAULT_RATES = dict(app_parts.LIMITS.seconds_per_mpx_step)  # before any request of this process


@pytest.fixture(autouse=True)
def fresh_work_limits(monkeypatch):
    """Each test starts from the default speeds: the work limits learn from every request in this process, and an
    earlier test's slow run on a loaded machine would shrink a later test's budget (seen: a queue test refused)."""
    monkeypatch.setattr(app_parts.LIMITS, "seconds_per_mpx_step", dict(DEFAULT_RATES))


@pytest.fixture(scope="module")
def server():
    demo = app.build().queue(max_size=32, default_concurrency_limit=2)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                            css=layout.CSS)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server, verbose=False)


def test_every_endpoint_works_through_gradio_client(client, tmp_path):
    images, seed, _, parameters, _ = client.predict(SD, "a small blue square in the center on a white background", "", 5,
                                                 5.0, "euler", 64, 64, 11, 1, False, api_name="/text_to_image")
    assert seed == "11" and images[0]["caption"] == "seed 11" and Image.open(images[0]["image"]).size == (64, 64)
    again = client.predict(SD, "a small blue square in the center on a white background", "", 5, 5.0, "euler", 64, 64,
                           11, 1, False, api_name="/text_to_image")
    assert np.array_equal(np.asarray(Image.open(images[0]["image"])), np.asarray(Image.open(again[0][0]["image"])))
    reconstruction, _, psnr, channels = client.predict(SD, handle_file(str(layout.EXAMPLE_SCENE)), False, 0,
                                                       api_name="/vae_roundtrip")
    assert Image.open(reconstruction).size == (64, 64) and psnr > 20 and len(channels) == 4
    dit_images, dit_seed, _, semantics = client.predict(DIT, "green square", 3.0, 5, "dpmpp_2m", 5, 2, "all",
                                                        api_name="/dit_sample")
    assert dit_seed == "5" and len(dit_images) == 2 and "Timestep embedding frequencies" in semantics


@pytest.mark.parametrize("endpoint,arguments,message", [
    ("/text_to_image", [SD, "x", "", 5, 5.0, "ddim", 1000000, 64, 0, 1, False], "width must be a whole number from 8 to 1024; got 1000000"),
    ("/text_to_image", [SD, "x", "", -1, 5.0, "ddim", 64, 64, 0, 1, False], "steps must be a whole number from 1 to 100; got -1"),
    ("/text_to_image", ["/etc/passwd", "x", "", 5, 5.0, "ddim", 64, 64, 0, 1, False], "not in the list of choices|not one of the offered"),
    ("/text_to_image", ["../", "x", "", 5, 5.0, "ddim", 64, 64, 0, 1, False], "not in the list of choices|not one of the offered"),
    ("/dit_sample", [DIT, "unicorn", 3.0, 5, "ddim", 0, 1, "all"], "Unknown class label"),
])
def test_bad_input_gets_a_clear_error_and_the_app_keeps_serving(client, endpoint, arguments, message):
    with pytest.raises(Exception, match=message):
        client.predict(*arguments, api_name=endpoint)
    assert client.predict(DIT, "red circle", 1.0, 2, "ddim", 0, 1, "all", api_name="/dit_sample")[1] == "0"


def test_a_non_image_upload_is_refused(client, tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(Exception):
        client.predict(SD, handle_file(str(tmp_path / "notes.txt")), False, 0, api_name="/vae_roundtrip")
    with pytest.raises(gr.Error, match="Cannot read"):
        handlers.roundtrip(SD, str(tmp_path / "notes.txt"))


@pytest.mark.slow
def test_twenty_concurrent_requests_all_complete_correctly(server):
    def request(seed):
        images, used, *_ = Client(server, verbose=False).predict(
            SD, "a big green triangle on the right on a black background", "", 4, 5.0, "ddim", 64, 64, seed, 1, False,
            api_name="/text_to_image")
        return seed, used, np.asarray(Image.open(images[0]["image"]))
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        results = list(pool.map(request, range(20)))
    assert [used for _, used, _ in results] == [str(seed) for seed in range(20)]
    expected, *_ = handlers.generate_images(SD, "a big green triangle on the right on a black background", "", 4, 5.0, "ddim",
                                       64, 64, 7, 1, False)
    assert np.array_equal(results[7][2], np.asarray(expected[0][0]))


@pytest.mark.slow
def test_a_request_over_the_queue_limit_is_told_the_queue_is_full():
    demo = app.build().queue(max_size=1, default_concurrency_limit=1)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
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


@pytest.mark.slow
def test_a_browser_shows_the_six_tabs(server, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
             "--virtual-time-budget=8000"]
    dom = subprocess.run(flags + ["--dump-dom", server], capture_output=True, text=True, timeout=120).stdout
    for tab in ("Text to image", "Image to image", "Inpaint", "VAE round-trip", "DiT", "Compare"):
        assert tab in dom, tab
    screenshot = tmp_path / "app.png"
    subprocess.run(flags + ["--window-size=1280,900", f"--screenshot={screenshot}", server], capture_output=True,
                   timeout=120)
    assert Image.open(screenshot).size == (1280, 900)


@pytest.mark.slow
def test_the_startup_measurement_sees_the_first_pictures_in_a_browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    from compare import startup
    listening, page = startup.one_start(chromium)  # raises unless the gallery shows pictures within 60 s
    assert listening > 0 and page > 0


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
    assert seed == "5" and len(images) == 1


def test_picking_a_model_sets_its_recommended_settings(client, monkeypatch):
    assert client.predict(SD, api_name="/recommended_settings") == (20, 5.0, "dpmpp_2m", 64, 64)
    monkeypatch.setenv("SPACE_ID", "someone/sd_core")
    assert app_parts.recommended_settings("SDXL-Turbo") == (1, 0.0, app_parts.MODEL_DEFAULT, 512, 512)
    assert app_parts.recommended_dit_settings("DiT-XL/2 256") == (4.0, 25, app_parts.MODEL_DEFAULT)
    with pytest.raises(gr.Error, match="model must be the name of an offered model"):  # gradio's bare error before
        app_parts.recommended_settings([])


def test_scheduler_choices_show_common_names_and_take_the_models_own():
    assert ("DPM++ 2M Karras", "dpmpp_2m_karras") in app_parts.SCHEDULER_CHOICES
    images, *_ = handlers.generate_images(SD, "a red circle", "", 3, 5.0, app_parts.MODEL_DEFAULT, 64, 64, 0, 1)
    assert images[0][0].size == (64, 64)


def test_a_space_offers_the_curated_hub_models_labelled_with_their_size(monkeypatch):
    assert all("hub" not in label for label, _ in app_parts.model_choices("text_to_image"))
    monkeypatch.setenv("SPACE_ID", "someone/sd_core")
    choices = dict(app_parts.model_choices("text_to_image"))
    assert choices["Stable Diffusion XL base 1.0 (hub, 13.8 GB in fp32)"] == "Stable Diffusion XL base 1.0"
    assert "DiT-XL/2 256 (hub, 3.0 GB in fp32)" in dict(app_parts.model_choices("dit"))
    assert "Stable Diffusion 1.5 (hub, 4.3 GB in fp32)" in choices  # its 4.27 GB of fp32 files (docs/real-checkpoints.md)
    assert app_parts.resolve_source("SD-Turbo") == "stabilityai/sd-turbo"


@pytest.fixture
def hub_loads(monkeypatch):
    """Records what reaches load_from_hub / load_pipeline instead of downloading."""
    calls = []
    monkeypatch.setattr(app_models, "load_from_hub", lambda source, **kw: calls.append(("hub", source, kw)) or "pipe")
    monkeypatch.setattr(app_models, "load_pipeline", lambda source, **kw: calls.append(("disk", source, kw)) or "pipe")
    fresh = app_models.ModelCache()  # the "pipe" these loads return never reaches the app's own cache
    for module in (app_models, app_parts, handlers):
        monkeypatch.setattr(module, "MODELS", fresh)
    return calls


def test_hub_models_load_from_the_hub_in_fp16_on_a_gpu_never_from_the_local_disk(hub_loads, monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/sd_core")
    monkeypatch.setattr(app_parts.Settings, "dtype", torch.float16)
    monkeypatch.setattr(app_models, "available_memory_gb", lambda: 100.0)
    steps = []
    app_parts.MODELS.get("Stable Diffusion 1.5", lambda fraction, desc: steps.append((fraction, desc)))
    kind, source, options = hub_loads[0]
    assert (kind, source, options["variant"]) == ("hub", "stable-diffusion-v1-5/stable-diffusion-v1-5", "fp16")
    options["on_file"]("unet/diffusion_pytorch_model.fp16.safetensors", 2, 5, 1_720_000_000)
    assert steps == [((1, 5), "downloading stable-diffusion-v1-5/stable-diffusion-v1-5: "
                               "unet/diffusion_pytorch_model.fp16.safetensors (1.72 GB)")]
    monkeypatch.setattr(app_parts.Settings, "allow_hub", True)  # any owner/name, even one that exists on this disk
    assert Path("sd_core/weights").is_dir()
    app_parts.MODELS.get("sd_core/weights")
    assert hub_loads[1][:2] == ("hub", "sd_core/weights")
    app_parts.MODELS.get(SD)
    assert hub_loads[2][0] == "disk"


def test_a_model_too_big_for_the_machine_is_refused_with_what_it_needs(hub_loads, monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/sd_core")
    monkeypatch.setattr(app_models, "available_memory_gb", lambda: 4.0)
    with pytest.raises(gr.Error, match=r"Stable Diffusion XL base 1.0 needs about 13.8 GB .* has 4.0 GB free"):
        app_parts.MODELS.get("Stable Diffusion XL base 1.0")  # fp32 on this CPU: twice the fp16 size
    assert hub_loads == [] and app_models.available_memory_gb.__module__ == __name__  # patched, so nothing loaded


def test_gpu_work_runs_inside_spaces_gpu_when_that_package_exists(monkeypatch):
    assert app_parts.on_gpu(app_parts.random_seed) is app_parts.random_seed  # no `spaces` here: nothing changes
    wrapped = []

    def gpu(duration):
        def decorate(fn):
            def run(*args, **kwargs):
                wrapped.append(duration(*args, **kwargs))
                return fn(*args, **kwargs)
            return run
        return decorate
    monkeypatch.setitem(sys.modules, "spaces", types.SimpleNamespace(GPU=gpu))
    handler = app_parts.handler(handlers.generate_images.__wrapped__)
    assert list(inspect.signature(handler).parameters)[:2] == ["model", "prompt"]
    handler(SD, "a red circle", "", 2, 5.0, "ddim", 64, 64, 0, 1)
    with pytest.raises(gr.Error, match="number_of_images must be a whole number from 1 to 8"):  # sized, then refused
        handler(SD, "a red circle", "", 50, 5.0, "ddim", 1024, 1024, 0, 9)
    assert wrapped[0] < wrapped[1] <= 300
    with pytest.raises(gr.Error, match="steps must be"):
        handler(SD, "a red circle", "", 0, 5.0, "ddim", 64, 64, 0, 1)


class FakeRequest:
    def __init__(self, query: str):
        self.query_params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
        self.headers = {}


T2I_INPUTS = len(inspect.signature(handlers.generate_images).parameters) - 2  # less progress and request


def test_a_share_link_made_after_a_run_restores_the_tab_model_and_settings(client):
    images, seed, _, _, link = client.predict(SD, "a small blue square in the center on a white background", "", 7,
                                              3.5, "euler_karras", 64, 72, -1, 2, False, api_name="/text_to_image")
    query = link.split("(", 1)[1].rstrip(")").split("?", 1)[1]
    demo = app.build()
    load = next(d for d in demo.fns.values() if d.name == "on_load")
    updates = load.fn(FakeRequest(query))
    tabs, model, prompt, negative, steps, guidance, scheduler, width, height, seed_box, number = updates[:11]
    gallery, used = updates[1 + T2I_INPUTS:3 + T2I_INPUTS]
    assert tabs.selected == "text_to_image" and model == SD and prompt.startswith("a small blue square")
    assert (steps, guidance, scheduler, width, height, str(seed_box), number) == (7, 3.5, "euler_karras", 64, 72, seed, 2)
    assert used == seed and np.array_equal(np.asarray(gallery[0][0]), np.asarray(Image.open(images[0]["image"])))
    dit_link = client.predict(DIT, "green square", 2.5, 4, "ddim", 9, 1, "first3", api_name="/dit_sample")[2]
    updates = load.fn(FakeRequest(dit_link.split("?", 1)[1].rstrip(")")))
    assert updates[0].selected == "dit"
    assert updates[-15:-4] == [DIT, "green square", 2.5, 4, "ddim", 9, 1, "first3", False, 0, 1.0]


def test_the_dit_fast_path_is_recorded_and_given_back_by_its_link_and_png_info(client):
    images, _, link, _ = client.predict(model=DIT, class_label="red circle", steps=6, seed=3, number_of_images=1,
                                        fast=True, dit_cache=2, guidance_until=0.7, api_name="/dit_sample")
    recorded = json.loads(Image.open(images[0]["image"]).info["sd_core"])
    assert "dit_cache=2,guidance_until=0.7" in recorded["fast"] and (recorded["dit_cache"], recorded["guidance_until"]) == (2, 0.7)
    settings = read_png_parameters(images[0]["image"])
    assert (settings.fast, settings.dit_cache, settings.guidance_until) == (True, 2, 0.7)
    load = next(d for d in app.build().fns.values() if d.name == "on_load")
    updates = load.fn(FakeRequest(link.split("?", 1)[1].rstrip(")")))
    assert updates[0].selected == "dit" and updates[-7:-4] == [True, 2, 0.7]
    plain = client.predict(model=DIT, class_label="red circle", steps=6, seed=3, number_of_images=1,
                           dit_cache=2, api_name="/dit_sample")[0]  # fast off: its options are not used or recorded
    assert "fast" not in json.loads(Image.open(plain[0]["image"]).info["sd_core"])
    with pytest.raises(Exception, match=r"dit_cache must be one of 0, 2, 3; got 5"):
        client.predict(model=DIT, class_label="red circle", fast=True, dit_cache=5, api_name="/dit_sample")


def test_the_first_page_shows_a_picture_and_a_bad_link_value_is_ignored():
    demo = app.build()
    load = next(d for d in demo.fns.values() if d.name == "on_load")
    updates = load.fn(FakeRequest(""))
    assert len(updates[1 + T2I_INPUTS]) == 4 and int(updates[2 + T2I_INPUTS]) >= 0  # four images and the seed used
    updates = load.fn(FakeRequest("tab=text_to_image&model=%2Fetc%2Fpasswd&steps=abc&scheduler=nonsense"))
    assert updates[1] == SD and updates[4] == 20 and updates[6] == "dpmpp_2m"


@pytest.mark.slow
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
        assert ["SD-Turbo (hub, 5.2 GB in fp32)", "SD-Turbo"] in choices
        images, seed, *_ = client.predict(SD, "a red circle", "", 4, 5.0, "ddim", 64, 64, 2, 1, False,
                                          api_name="/text_to_image")
        assert seed == "2" and Image.open(images[0]["image"]).size == (64, 64)
    finally:
        process.terminate()
        process.wait(30)


@pytest.mark.parametrize("kind,model,settings", [
    ("text_to_image", SD, dict(prompt="a red circle", steps=2)),
    pytest.param("vae", SD, dict(image=handle_file(str(layout.EXAMPLE_SCENE))), marks=pytest.mark.slow),
    pytest.param("dit", DIT, dict(class_label="red circle", steps=2, guidance_scale=3.0), marks=pytest.mark.slow),
    pytest.param("precision", DIT, dict(class_label="blue triangle", steps=2, dtype="bf16"), marks=pytest.mark.slow),
    pytest.param("fast_path", SD, dict(prompt="a red circle", steps=3, deepcache=2, tome=0.5), marks=pytest.mark.slow),
])
def test_compare_runs_each_kind_through_gradio_client_with_named_parameters(client, kind, model, settings, tmp_path):
    verdict, images, plots, table, report = client.predict(kind=kind, model=model, seed=1, api_name="/compare",
                                                           **settings)
    badge = "📏 MEASUREMENT" if kind in ("precision", "fast_path") else "✅ PASS"
    assert verdict.startswith(f"## {badge}\n{kind}"), verdict
    captions = [image["caption"] for image in images]
    assert captions[-1].startswith("|difference| x") and len(captions) >= 3, captions
    assert Image.open(images[0]["image"]).size == (64, 64)
    assert [plot["caption"] for plot in plots] == {"vae": ["per-module"], "fast_path": ["per-step"]}.get(
        kind, ["per-step", "per-module"])
    assert table["headers"][:2] == ["stage", "max |diff|"] and len(table["data"]) >= 3
    assert ("Timestep embedding frequencies: **diffusers**" in verdict) == (model == DIT)
    shutil.unpack_archive(report, tmp_path)  # one folder, named after the kind
    assert {"report.md", "report.json", "images.png"} <= {p.name for p in (tmp_path / kind).iterdir()}
    assert json.loads((tmp_path / kind / "report.json").read_text())["kind"] == kind


def test_compare_refuses_a_model_of_the_wrong_family_and_names_the_fix():
    with pytest.raises(gr.Error, match="does not fit the comparison 'dit': pick one of .*shapes \\(DiT\\)"):
        compare("dit", SD, class_label="red circle")
    with pytest.raises(gr.Error, match="kind must be one of"):
        compare("speed", SD)
    with pytest.raises(gr.Error, match="Unknown class label 'unicorn'"):
        compare("dit", DIT, class_label="unicorn", steps=1)
    with pytest.raises(gr.Error, match=r"tome must be one of 0.0, 0.5, 0.75; got 0.3"):
        compare("fast_path", SD, tome=0.3, steps=1)


def test_each_compare_kind_shows_only_the_settings_it_takes():
    assert set(compare_tab.COMPARE_FIELDS) == set(app.comparisons.KINDS)
    demo = app.build()
    on_kind = next(d for d in demo.fns.values() if d.name == "on_kind").fn
    dropdown, *fields = on_kind("vae")  # prompt, class label, image, strength, sample, guided, dtype, negative,
    # DeepCache, ToMe, steps, scheduler, guidance: a VAE round trip takes an image and the posterior's sampling only
    assert [u["visible"] for u in fields] == [False, False, True, False, True] + [False] * 8
    dropdown, prompt, *_, deepcache, tome, steps, scheduler, guidance = on_kind("fast_path")
    assert [value for _, value in dropdown.choices][0] == SD and prompt["visible"] and deepcache["visible"] and tome["visible"]
    assert steps["visible"] and scheduler["visible"] and guidance["visible"]
    dropdown, prompt, class_label, *_ = on_kind("dit")
    assert [value for _, value in dropdown.choices] == [DIT] and class_label["visible"] and not prompt["visible"]


def test_compare_s_image_has_no_unreachable_api_default_and_the_tab_starts_from_the_example(client):
    image = next(p for p in client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/compare"][
        "parameters"] if p["parameter_name"] == "image")
    assert image["parameter_default"] is None  # was a FileData whose url was gradio's own bus.png
    on_kind = next(d for d in app.build().fns.values() if d.name == "on_kind").fn
    assert on_kind("vae")[3]["value"] == str(layout.EXAMPLE_SCENE)  # an empty image field starts from the example
    assert "value" not in on_kind("vae", "mine.png")[3]  # a visitor's own image stays
    with pytest.raises(Exception, match=r"Upload an image \(or pick an example\) first"):
        client.predict(kind="vae", model=SD, api_name="/compare")


FAST_MIN_PSNR = 20.0  # dB against the parity image; measured 47.2 (bf16 UNet) and 26.7 (bf16, DeepCache 3)


@pytest.mark.slow
def test_the_fast_path_is_tagged_and_differs_from_the_parity_image_through_gradio_client(client):
    common = dict(model=SD, prompt="a big yellow triangle on the right on a black background", steps=12, seed=2,
                  scheduler="ddim", number_of_images=1, api_name="/text_to_image")
    parity = np.asarray(Image.open(client.predict(**common)[0][0]["image"]))
    runs = {}
    for option, value in (("deepcache", 0), ("deepcache", 3), ("tome", 0.5), ("guidance_until", 0.7), ("tgate", 0.5)):
        images, _, trajectory, parameters, link = client.predict(**common, fast=True, **{option: value},
                                                                 show_trajectory=True)
        image = Image.open(images[0]["image"])
        recorded = json.loads(image.info["sd_core"])
        tagged = recorded["fast"]
        assert json.loads(parameters)["fast"] == tagged and "fast=True" in link
        if value:  # named in the description, recorded, carried by the link, given back by PNG Info
            assert f"{option}={value:g}" in tagged and recorded[option] == value and f"{option}={value}" in link
            assert getattr(read_png_parameters(images[0]["image"]), option) == value
        assert len(trajectory) == 12
        runs[option, value] = tagged, np.asarray(image.convert("RGB"))
    for (option, value), (tagged, pixels) in runs.items():
        print(f"fast {option}={value} ({tagged}): PSNR {psnr(pixels, parity):.1f} dB against the parity image")
        assert psnr(pixels, parity) > FAST_MIN_PSNR
    plain = runs["deepcache", 0][1]
    assert not any(np.array_equal(pixels, other) for key, (_, pixels) in runs.items() if key != ("deepcache", 0)
                   for other in (parity, plain))
    if "bfloat16" in runs["deepcache", 0][0]:  # the fast path chose bf16 on this machine; fp32 channels_last is within a level
        assert not np.array_equal(plain, parity)
    else:
        assert np.abs(plain.astype(int) - parity).max() <= 1
    with pytest.raises(Exception, match=r"tome must be one of 0.0, 0.5, 0.75; got 0.3"):  # sd_core's own words
        client.predict(**common, fast=True, tome=0.3)


def test_the_fast_path_previews_its_trajectory_without_a_vae_decode(monkeypatch):
    drawn = {"fast_preview": 0, "preview": 0}
    for name in drawn:
        original = getattr(handlers, name)
        monkeypatch.setattr(handlers, name, lambda pipe, x0, name=name, original=original: (
            drawn.__setitem__(name, drawn[name] + 1), original(pipe, x0))[1])
    run = functools.partial(handlers.generate_images, SD, "a red circle", "", 4, 5.0, "ddim", 64, 64, 1, 1, True)
    run(fast=True, deepcache=2)
    assert drawn == {"fast_preview": 4, "preview": 0}
    run()
    assert drawn == {"fast_preview": 4, "preview": 4}
    with pytest.raises(gr.Error, match="deepcache must be one of 0, 2, 3; got 1"):
        run(fast=True, deepcache=1)


def test_image_to_image_and_png_info_through_gradio_client(client, tmp_path):
    images, seed, parameters, _ = client.predict(SD, handle_file(str(layout.EXAMPLE_SCENE)), "a blue circle", "", 0.5,
                                                 4, 5.0, "ddim", 21, 2, api_name="/image_to_image")
    assert seed == "21" and [image["caption"] for image in images] == ["seed 21", "seed 22"]
    assert '"strength": 0.5' in parameters and Image.open(images[0]["image"]).size == (64, 64)
    made, *_ = client.predict(SD, "a small blue square in the center on a white background", "bad", 3, 4.5, "euler",
                              72, 64, 31, 2, False, "a1111", 1, api_name="/text_to_image")
    read = client.predict(handle_file(made[1]["image"]), api_name="/png_info")  # the app's own PNG keeps its text
    assert list(read[:11]) == [SD, "a small blue square in the center on a white background", "bad", 3, 4.5, "euler", 72, 64,
                         32, "a1111", 1], read
    a1111 = tmp_path / "a1111.png"
    info = PngInfo()
    info.add_text("parameters", "a red circle\nNegative prompt: blurry\nSteps: 12, Sampler: DPM++ 2M, Schedule type: "
                  "Karras, CFG scale: 6, Seed: 77, Size: 64x48, Model: some-model, Clip skip: 2")
    Image.new("RGB", (64, 48)).save(a1111, pnginfo=info)
    model, prompt, negative, steps, guidance, scheduler, width, height, seed, syntax, skip, note = app_parts.png_info(str(a1111))
    assert (prompt, negative, steps, guidance, scheduler, width, height, seed, syntax, skip) == (
        "a red circle", "blurry", 12, 6.0, "dpmpp_2m_karras", 64, 48, 77, "a1111", 1)
    assert "'some-model' is not offered" in note and model.__class__.__name__ != "str"  # the model is kept
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")  # a PNG without settings: said, not an error badge
    *values, note = app_parts.png_info(str(tmp_path / "plain.png"))
    assert "carries no generation parameters" in note and "keeps its values" in note
    assert all(value == gr.skip() for value in values)


def test_use_this_seed_and_send_to_image_to_image_take_the_picked_result():
    images, *_ = handlers.generate_images(SD, "a red circle", "", 2, 5.0, "ddim", 64, 64, 40, 3)
    assert app_parts.use_this_seed(images, 2) == 42 and app_parts.use_this_seed(images, None) == 40
    image, model, prompt, *_, tabs = app_parts.send_to_image_to_image(images, 1, SD, "a red circle", "", 2, 5.0, "ddim")
    assert image is images[1][0] and prompt == "a red circle" and tabs.selected == "image_to_image"
    with pytest.raises(gr.Error, match="Generate images first"):
        app_parts.use_this_seed([], 0)


def test_seed_used_is_empty_before_a_run(client):
    boxes = [c["props"] for c in client.config["components"] if str(c["props"].get("label")).startswith("Seed used")]
    assert len(boxes) == 4 and all(box.get("value") in ("", None) and box["placeholder"] == "run first" for box in boxes)


@pytest.fixture
def model_root(tmp_path, monkeypatch):
    """A model root with a PEFT LoRA in loras/, a kohya LoRA at its top, a single-file 'model' and an embedding."""
    import safetensors.torch
    pipe = app_parts.MODELS.get(SD)
    (tmp_path / "loras").mkdir()
    (tmp_path / "embeddings").mkdir()
    generator = torch.Generator().manual_seed(0)
    layers = [name for name, m in pipe.unet.named_modules() if isinstance(m, torch.nn.Linear) and name.endswith("to_q")]
    peft = {}
    for name in layers:
        module = pipe.unet.get_submodule(name)
        peft[f"unet.{name}.lora_A.weight"] = torch.randn(2, module.in_features, generator=generator)
        peft[f"unet.{name}.lora_B.weight"] = torch.randn(module.out_features, 2, generator=generator)
    safetensors.torch.save_file(peft, tmp_path / "loras" / "style.safetensors")
    kohya = {f"lora_unet_{layers[0].replace('.', '_')}.lora_{part}.weight": value
             for part, value in zip(("down", "up"), list(peft.values())[:2])}
    safetensors.torch.save_file(kohya, tmp_path / "detail.safetensors")
    safetensors.torch.save_file({"not_a_lora.weight": torch.zeros(1)}, tmp_path / "model.safetensors")
    width = token_embedding(pipe.text_encoder).embedding_dim
    safetensors.torch.save_file({"<shape>": torch.randn(2, width, generator=generator)},
                                tmp_path / "embeddings" / "shape.safetensors")
    monkeypatch.setattr(app_parts.Settings, "model_roots", [tmp_path])
    return tmp_path


def test_loras_and_embeddings_are_found_under_the_model_roots_and_apply_per_request(model_root):
    assert [label for label, _ in app_models.root_files("loras")] == ["loras: loras/style.safetensors",
                                                                     "loras: detail.safetensors"]
    assert [label for label, _ in app_models.root_files("embeddings")] == ["embeddings: embeddings/shape.safetensors"]
    assert [label for label, _ in app_parts.model_choices("text_to_image")][-1] == "models: model.safetensors"
    run = functools.partial(handlers.generate_images, SD, "a red circle <shape>", "", 3, 5.0, "ddim", 64, 64, 3, 1)
    plain = np.asarray(run()[0][0][0])
    shape = ["embeddings: embeddings/shape.safetensors"]
    embedded = np.asarray(run(embeddings=shape)[0][0][0])
    assert not np.array_equal(embedded, plain)  # the token now means its vectors, not the text "<shape>"
    styled, _, _, parameters, link = run(embeddings=shape, lora_1="loras: loras/style.safetensors", lora_1_scale=0.5)
    assert json.loads(parameters)["loras"] == [["loras: loras/style.safetensors", 0.5]] and "lora_1_scale=0.5" in link
    assert json.loads(parameters)["embeddings"] == ["<shape>"]
    styled = np.asarray(styled[0][0])
    assert not np.array_equal(styled, embedded)
    assert np.array_equal(np.asarray(run(embeddings=shape)[0][0][0]), embedded)  # the LoRA left with its request
    with pytest.raises(gr.Error, match="not one of the offered loras"):
        run(lora_2="loras: ../../etc/passwd")
    with pytest.raises(gr.Error, match="fast path does not combine with LoRAs"):
        run(lora_1="loras: loras/style.safetensors", fast=True)
    with pytest.raises(gr.Error, match="lora_2_scale must be a number from -4 to 4; got nan"):  # the form's name for it
        run(lora_2="loras: detail.safetensors", lora_2_scale=float("nan"))


@pytest.mark.slow
def test_the_app_page_client_example_runs_as_written(server):
    section = (Path(app.__file__).parent / "docs" / "app.md").read_text().split("## The API", 1)[1]
    code = section.split("```python", 1)[1].split("```", 1)[0].replace('"http://127.0.0.1:7860"', repr(server))
    names = {}
    exec(code, names)  # noqa: S102 (docs/app.md's own example)
    assert names["seed_used"] == "7" and [image["caption"] for image in names["images"]] == ["seed 7", "seed 8"]
    assert names["verdict"].startswith("## ✅ PASS\ndit (all): PASS")


def painted_layer(path, size, box):
    """A transparent layer with `box` painted opaque, as the mask editor's brush leaves it."""
    layer = Image.new("RGBA", size, (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), box)
    layer.save(path)
    return path


def test_inpaint_repaints_the_painted_region_and_keeps_the_rest_through_gradio_client(client, tmp_path):
    scene = Image.open(layout.EXAMPLE_SCENE).convert("RGB")
    width, height = scene.size
    layer = painted_layer(tmp_path / "layer.png", scene.size, (width // 2, 0, width, height))  # the right half
    editor = {"background": handle_file(str(layout.EXAMPLE_SCENE)), "layers": [handle_file(str(layer))], "composite": None}
    images, seed, shown, parameters, _ = client.predict(model=SD, image_and_mask=editor, prompt="a big blue square on "
                                                        "a white background", strength=1.0, steps=8, seed=3,
                                                        number_of_images=1, api_name="/inpaint")
    assert seed == "3" and json.loads(parameters)["inpaint"] is True
    shown = np.asarray(Image.open(shown).convert("RGB")).astype(int)  # the mask used: the image, repainted in red
    factor = shown.shape[1] // width
    assert factor * min(width, height) >= 256 and shown.shape[:2] == (height * factor, width * factor)
    kept_shown = shown[::factor, ::factor][:, : width // 2]
    painted_shown = shown[::factor, ::factor][:, width // 2:]
    assert np.array_equal(kept_shown, np.asarray(scene)[:, : width // 2])
    assert (painted_shown[..., 0] >= 127).all() and (painted_shown[..., 1] <= 128).all()
    result = np.asarray(Image.open(images[0]["image"]).convert("RGB")).astype(float)
    original = np.asarray(scene).astype(float)
    kept = np.abs(result[:, : width // 2 - 4] - original[:, : width // 2 - 4]).mean()  # (4 px from the seam)
    repainted = np.abs(result[:, width // 2 + 4:] - original[:, width // 2 + 4:]).mean()
    assert kept < 12 and repainted > 3 * kept, (kept, repainted)
    with pytest.raises(Exception, match="Nothing is painted"):
        client.predict(SD, {"background": handle_file(str(layout.EXAMPLE_SCENE)), "layers": [], "composite": None},
                       "x", "", 1.0, 2, 5.0, "ddim", 0, 1, api_name="/inpaint")


def test_the_refiner_is_refused_on_a_model_that_is_not_an_sdxl_base(monkeypatch):
    monkeypatch.setenv("SPACE_ID", "someone/sd_core")
    assert ("SDXL refiner 1.0 (hub, 12.2 GB in fp32)", "SDXL refiner 1.0") in app_parts.refiner_choices()
    assert "SDXL refiner 1.0" not in dict(app_parts.model_choices("text_to_image")).values()
    with pytest.raises(gr.Error, match=r"A refiner follows an SDXL base model; embedded: shapes \(text to image\) is sd1\. Set Refiner to none"):
        handlers.generate_images(SD, "x", "", 2, 5.0, "ddim", 64, 64, 0, 1, refiner="SDXL refiner 1.0")


def test_non_finite_latents_reach_the_visitor_as_one_line(monkeypatch):
    def overflow(*args, **kwargs):
        raise FloatingPointError("the latents after denoising (UNet) contain NaN or inf: try fp32 or fewer steps.\n"
                                 "  (detail for the log)")
    monkeypatch.setattr(handlers, "generate", overflow)
    with pytest.raises(gr.Error) as refused:
        handlers.generate_images(SD, "x", "", 2, 5.0, "ddim", 64, 64, 0, 1)
    assert refused.value.message == "the latents after denoising (UNet) contain NaN or inf: try fp32 or fewer steps."


@pytest.mark.parametrize("endpoint,arguments,message", [
    ("/text_to_image", dict(seed=1.5), r"seed must be a whole number from 0 to 4294967295; got 1\.5, which is not whole"),
    ("/text_to_image", dict(steps="ten"), r"steps must be a whole number from 1 to 100; got the text 'ten'"),
    ("/text_to_image", dict(number_of_images=None), r"number_of_images must be a whole number from 1 to 8; none"),
    ("/text_to_image", dict(guidance_scale="nan"), r"guidance_scale must be a number from 0 to 50; got nan"),
    ("/text_to_image", dict(prompt="x" * 2001), r"prompt is 2001 characters long; at most 2000 are taken"),
    ("/text_to_image", dict(scheduler="rm -rf"), r"rm -rf is not in the list of choices: \['ddim'"),
    ("/dit_sample", dict(steps=2.5), r"steps must be a whole number from 1 to 100; got 2\.5, which is not whole"),
    ("/vae_roundtrip", dict(seed=-3), r"seed must be a whole number from 0 to 4294967295; got -3"),
])
def test_raw_api_values_reach_the_app_s_checks_as_sent(client, endpoint, arguments, message):
    defaults = {"/text_to_image": dict(model=SD, prompt="x", steps=2, width=64, height=64, seed=0, number_of_images=1),
                "/dit_sample": dict(model=DIT, class_label="red circle", steps=2, seed=0, number_of_images=1),
                "/vae_roundtrip": dict(model=SD, image=handle_file(str(layout.EXAMPLE_SCENE)), seed=0)}[endpoint]
    with pytest.raises(Exception, match=message):
        client.predict(api_name=endpoint, **{**defaults, **arguments})


@pytest.mark.slow
def test_a_link_restores_only_through_the_forms_bounds_and_says_why_as_text(monkeypatch):
    """Share-link values pass the settings record's rules under the form's bounds: a hostile value leaves the form
    as it is, and the warning shows the value as text (escaped), never as HTML."""
    warnings = []
    monkeypatch.setattr(gr, "Warning", lambda message: warnings.append(message))
    demo = app.build()
    load = next(d for d in demo.fns.values() if d.name == "on_load")
    for query, message in [("steps=1000000000", "steps must be a whole number from 1 to 100"),
                           ("width=99999", "width must be a whole number from 8 to 1024"),
                           ("seed=1e400", "seed must be a whole number from 0 to 4294967295"),
                           ("seed=" + "9" * 70, "seed must be a whole number"),
                           ("lora_1=x&lora_1_scale=1e308", "lora_1_scale must be a number from -4 to 4"),
                           ("prompt=%3Cimg%20src%3Dhttp%3A%2F%2Fx%2Fa.png%3E&steps=0", "steps must be")]:
        warnings.clear()
        updates = load.fn(FakeRequest("tab=text_to_image&" + query))
        assert updates[4] == 20 and updates[7] == 64, query  # the form's own steps and width
        assert len(warnings) == 1 and message in warnings[0], (query, warnings)
        assert "<img" not in warnings[0]


def test_a_prompt_cut_at_77_tokens_is_said_to_the_visitor(monkeypatch):
    warnings = []
    monkeypatch.setattr(gr, "Warning", lambda message: warnings.append(message))
    long_prompt = "a big red circle on the left on a gray background " * 12
    *_, parameters, _ = handlers.generate_images(SD, long_prompt, "", 2, 5.0, "ddim", 64, 64, 0, 1)
    note = json.loads(parameters)["note"]
    assert "longer than CLIP's 77 tokens" in note and "A1111 prompt syntax" in note and warnings == [app_parts.as_page_text(note)]
    *_, parameters, _ = handlers.generate_images(SD, long_prompt, "", 2, 5.0, "ddim", 64, 64, 0, 1,
                                                 prompt_syntax="a1111")
    assert "note" not in json.loads(parameters)


@pytest.mark.parametrize("tab, handler, form, left_behind", [
    ("image_to_image", handlers.transform_image, dict(image=str(layout.EXAMPLE_SCENE), strength=0.45,
                                                      clip_skip=1), "the starting image"),
    ("inpaint", handlers.inpaint_image, dict(image_and_mask={"background": str(layout.EXAMPLE_SCENE), "layers": [
        str(layout.EXAMPLE_SCENE)], "composite": None}, strength=0.9), "the image and its mask"),
])
def test_a_picture_tab_s_link_restores_its_settings_and_says_its_picture_cannot_travel(monkeypatch, tab, handler,
                                                                                       form, left_behind):
    warnings = []
    monkeypatch.setattr(gr, "Warning", warnings.append)
    settings = dict(model=SD, prompt="a blue circle", negative_prompt="red", steps=3, guidance_scale=4.5,
                    scheduler="euler", seed=8, number_of_images=1, **form)
    *_, link = handler(**settings)
    assert f"{left_behind} cannot travel in a link" in link
    load = next(d for d in app.build().fns.values() if d.name == "on_load")
    updates = load.fn(FakeRequest(link.split("](", 1)[1].split(")", 1)[0].split("?", 1)[1]))
    names = list(inspect.signature(handler).parameters)[:-2]
    start = next(i for i, update in enumerate(updates) if update == SD)  # the tab's model, after the tabs before
    restored = dict(zip(names, updates[start:]))
    assert updates[0].selected == tab
    assert {key: restored[key] for key in settings if key in restored and key not in form or key == "strength"} == {
        key: value for key, value in settings.items() if key not in form or key == "strength"}
    assert restored.get("clip_skip", 1) == 1 and restored[names[1]] == gr.skip()  # the picture stays as it is
    assert len(warnings) == 1 and f"not {left_behind} (a link cannot hold pictures)" in warnings[0]
    assert updates[start + len(names)] == gr.skip()  # nothing ran without the picture


def test_the_fast_path_s_choices_are_numbers_in_the_api_schema_and_taken_as_numbers_or_numerals(client):
    parameters = {p["parameter_name"]: p for p in client.view_api(return_format="dict", print_info=False)[
        "named_endpoints"]["/text_to_image"]["parameters"]}
    assert parameters["deepcache"]["type"] == {"type": "number", "enum": [0, 2, 3]}
    assert parameters["tome"]["type"] == {"type": "number", "enum": [0.0, 0.5, 0.75]}
    for deepcache, tome in ((2, 0.5), ("2", "0.5")):  # the schema's numbers, or the client's rendering of them
        *_, parameters_json, _ = client.predict(SD, "a red circle", "", 2, 5.0, "ddim", 64, 64, 0, 1, fast=True,
                                                deepcache=deepcache, tome=tome, api_name="/text_to_image")
        assert '"fast"' in parameters_json
    with pytest.raises(Exception, match="deepcache must be one of 0, 2, 3; got 'x'"):
        client.predict(SD, "a red circle", "", 2, 5.0, "ddim", 64, 64, 0, 1, deepcache="x", api_name="/text_to_image")


def test_png_info_s_outputs_are_named_after_their_labels(client):
    returns = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/png_info"]["returns"]
    assert [r["label"] for r in returns][-4:] == ["Seed", "Prompt syntax", "Clip skip", "PNG Info note"]


def test_the_random_seed_button_and_every_button_say_what_they_do_in_words(client):
    buttons = [c["props"]["value"] for c in client.config["components"] if c["type"] == "button"]
    assert "🎲 Random seed" in buttons and all(any(ch.isalpha() for ch in str(label)) for label in buttons)


def test_the_clip_skip_slider_ends_at_the_model_s_deepest_layer(client):
    sliders = [c["props"] for c in client.config["components"] if c["props"].get("label") == "Clip skip"]
    assert len(sliders) == 2 and all(slider["maximum"] == 1 for slider in sliders)  # a 2-layer encoder keeps one
    assert layout.clip_skip_slider(SD).maximum == 1 and layout.clip_skip_slider("Stable Diffusion 1.5") == gr.skip()
    with pytest.raises(gr.Error, match=r"clip_skip=2 must be an integer in \[0, 1\]"):
        handlers.generate_images(SD, "x", "", 2, 5.0, "ddim", 64, 64, 0, 1, clip_skip=2)


def test_psnr_is_empty_before_a_run(client):
    psnr = next(c["props"] for c in client.config["components"] if c["props"].get("label") == "PSNR (dB)")
    assert psnr.get("value") is None and psnr["placeholder"] == "run first"


def test_clicking_an_example_runs_it():
    demo = app.build()
    loads = {i for i, f in demo.fns.items() if f.name == "load_example"}
    after = {f.trigger_after: f.name for f in demo.fns.values() if f.trigger_after in loads}
    assert sorted(after.values()) == ["generate_images", "roundtrip", "sample_dit", "transform_image"]


def test_on_a_phone_every_tab_shows_its_results_above_its_form():
    demo = app.build()
    results = [block for block in demo.blocks.values() if "results" in (getattr(block, "elem_classes", None) or [])]
    galleries = [block for block in demo.blocks.values() if isinstance(block, gr.Gallery) and block.label == "Images"]
    assert len(results) == 6 and all(any(g in column.children for column in results) for g in galleries)  # + Compare
    assert "@media (max-width: 768px)" in layout.CSS and ".results { order: -1; }" in layout.CSS


def test_a_path_typed_as_a_model_is_refused_even_inside_a_model_root(model_root):
    """app.py's docstring: the API takes the dropdown's choices, never a path, wherever it points."""
    assert "models: model.safetensors" in dict(app_parts.model_choices("text_to_image")).values()
    for typed in (str(model_root / "model.safetensors"), "model.safetensors"):
        with pytest.raises(gr.Error, match="not one of the offered models"):
            app_parts.resolve_source(typed)


LAYOUT_PROBE = """<script>
setTimeout(() => {  // where the first tab's results and its prompt sit, written where --dump-dom shows it
  const top = (selector) => Math.round(document.querySelector(selector).getBoundingClientRect().top);
  document.body.setAttribute('data-layout', top('.results') + ',' + top('textarea') + ',' + window.innerWidth);
}, 6000);
</script>"""


@pytest.mark.slow
def test_on_a_phone_a_browser_shows_the_results_above_the_form_and_beside_it_on_a_desktop():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run does)")
    demo = app.build().queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                            css=layout.CSS, head=LAYOUT_PROBE)
    try:
        tops = {}
        for width in (390, 1280):
            dom = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--window-size={width},900",
                                  "--virtual-time-budget=15000", "--dump-dom", url], capture_output=True, text=True,
                                 timeout=120).stdout
            tops[width] = [int(v) for v in dom.split('data-layout="', 1)[1].split('"', 1)[0].split(",")]
    finally:
        demo.close()
    (results, prompt, narrow), (wide_results, wide_prompt, _) = tops[390], tops[1280]
    assert narrow <= 768 and results < prompt, tops  # stacked: the pictures first (before: 1330 px below, at 326)
    assert wide_results < wide_prompt + 200, tops  # a desktop keeps them side by side, at the top
