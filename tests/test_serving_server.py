"""The serving rules behind a real gradio server on 127.0.0.1, wired as app.py is to be: raw-API values reach the
checks unrounded, an upload bomb is refused from its header, oversize uploads and work are refused with the
bound, and the server keeps answering (issue 19)."""
import re
import struct
import zlib

import gradio as gr
import pytest
from gradio_client import Client, handle_file

from sd_core.app import layout
from sd_core.app.serving import (
    MAX_UPLOAD_BYTES,
    WorkLimits,
    as_whole_number,
    check_request,
    open_upload,
    raw_value,
)
from tests.launch import free_port

LIMITS = WorkLimits.for_device("cpu")


def refusals_as_gradio_errors(fn):
    def wrapped(*args):
        try:
            return fn(*args)
        except ValueError as error:
            raise gr.Error(str(error)) from None
    return wrapped


@refusals_as_gradio_errors
def generate(steps, seed, size):
    steps, seed = as_whole_number(steps, "steps", 1, 100), as_whole_number(seed, "seed", 0, 2 ** 32 - 1)
    size = as_whole_number(size, "width", 8, 1024)
    with LIMITS.slot(check_request(LIMITS, "text_to_image", size * size, steps, 1)):
        return seed


@refusals_as_gradio_errors
def roundtrip(path):
    image = open_upload(path, max_pixels=LIMITS.max_upload_pixels)
    with LIMITS.slot(check_request(LIMITS, "vae_roundtrip", image.width * image.height)):
        return f"{image.width}x{image.height}"


@pytest.fixture(scope="module")
def client():
    with gr.Blocks() as demo:
        steps = raw_value(gr.Slider(1, 100, 20, step=1, label="Steps"))
        seed = raw_value(gr.Number(-1, label="Seed", precision=0))
        size = raw_value(gr.Slider(8, 1024, 64, step=8))
        used = gr.Textbox()
        gr.Button().click(generate, [steps, seed, size], used, api_name="generate")
        image = gr.Image(type="filepath", image_mode=None)
        gr.Button().click(roundtrip, image, used, api_name="roundtrip")
    demo.queue(max_size=8, default_concurrency_limit=2)
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                            max_file_size=MAX_UPLOAD_BYTES)
    yield Client(url, verbose=False)
    demo.close()


def bomb(path, width=12000, height=12000):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))
    return path


RAW = [  # (steps, seed, size, the message the visitor reads)
    (20, 1.5, 64, r"seed must be a whole number from 0 to 4294967295; got 1\.5, which is not whole"),
    ("ten", 0, 64, r"steps must be a whole number from 1 to 100; got the text 'ten'"),
    (None, 0, 64, r"steps must be a whole number from 1 to 100; none was given"),
    (20, "abc", 64, r"seed must be a whole number .*got the text 'abc'"),
    (100, 0, 1024, r"1024x1024 x 100 steps is 105 Mpx-steps; this server allows 2\.73 Mpx-steps per text-to-image"),
]


@pytest.mark.parametrize("steps,seed,size,message", RAW)
def test_raw_api_values_reach_the_checks_as_sent_and_the_server_keeps_serving(client, steps, seed, size, message):
    with pytest.raises(Exception, match=message):
        client.predict(steps, seed, size, api_name="/generate")
    assert client.predict(20, 7, 64, api_name="/generate") == "7"


@pytest.mark.parametrize("body,message", [
    ('[NaN, 0, 64]', r"steps must be a whole number from 1 to 100; got nan \(not a finite number\)"),
    ('[20, 1e400, 64]', r"seed must be a whole number from 0 to 4294967295; got inf"),
    ('[20, 0, Infinity]', r"width must be a whole number from 8 to 1024; got inf"),
])
def test_raw_http_json_that_clients_cannot_send(client, body, message):
    """NaN and 1e400 as raw HTTP sends them (Python's json reads NaN, Infinity and 1e400 -> inf)."""
    import httpx
    base = client.src.rstrip("/") + "/gradio_api/call/generate"
    event = httpx.post(base, content='{"data": ' + body + '}', headers={"content-type": "application/json"},
                       timeout=30).json()["event_id"]
    answer = httpx.get(f"{base}/{event}", timeout=30).text
    assert "event: error" in answer and re.search(message, answer), answer
    assert client.predict(20, 7, 64, api_name="/generate") == "7"


def test_upload_bomb_and_oversize_upload_are_refused_and_the_server_keeps_serving(client, tmp_path):
    with pytest.raises(Exception, match=r"bomb\.png is 12000x12000 \(144\.0 Mpixels\); the limit is 4\.2 Mpixels"):
        client.predict(handle_file(str(bomb(tmp_path / "bomb.png"))), api_name="/roundtrip")
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + b"\x00" * (MAX_UPLOAD_BYTES + 1))
    with pytest.raises(Exception, match="(?i)file size|too large|exceeds"):
        client.predict(handle_file(str(big)), api_name="/roundtrip")
    small = bomb(tmp_path / "small.png", 64, 48)
    with pytest.raises(Exception, match="small.png is truncated or corrupt"):  # 100 bytes of rows for 64x48
        client.predict(handle_file(str(small)), api_name="/roundtrip")
    from PIL import Image
    Image.new("RGB", (1500, 1000)).save(tmp_path / "fine.png")
    assert client.predict(handle_file(str(tmp_path / "fine.png")), api_name="/roundtrip") == "1500x1000"
    Image.new("L", (1600, 1600)).save(tmp_path / "work.png")  # 2.56 Mpx: readable, but beyond the work budget
    with pytest.raises(Exception, match=r"1600x1600 is 2\.56 Mpx; this server allows 2\.4 Mpx per VAE round-trip"):
        client.predict(handle_file(str(tmp_path / "work.png")), api_name="/roundtrip")


# --------------------------------------------------------------------------- the app itself under load (issue 19)

SD, DIT = "embedded: shapes (text to image)", "embedded: shapes (DiT)"
ANSWER_WITHIN_S = 45  # each small request, from submission to answer; generous: this machine is shared


@pytest.fixture(scope="module")
def app_server():
    import app
    demo = app.build().queue(max_size=64, default_concurrency_limit=2)  # app.py's defaults: --concurrency 2
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                            max_file_size=MAX_UPLOAD_BYTES)
    yield url, app
    demo.close()


def test_a_text_file_named_png_is_refused_with_sd_cores_message_at_every_image_door(app_server, tmp_path):
    url, _ = app_server
    client = Client(url, verbose=False)
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    doors = {"/image_to_image": dict(model=SD, image=handle_file(str(fake))),
             "/vae_roundtrip": dict(model=SD, image=handle_file(str(fake))),
             "/compare": dict(kind="vae", model=SD, image=handle_file(str(fake)))}
    for door, arguments in doors.items():
        with pytest.raises(Exception, match=r"Cannot read fake\.png as an image: it is not a PNG, JPEG"):
            client.predict(**arguments, api_name=door)
    editor = {"background": handle_file(str(fake)), "layers": [], "composite": None}
    with pytest.raises(Exception, match=r"Cannot read the image as an image: it is not a PNG, JPEG"):
        client.predict(SD, editor, api_name="/inpaint")
    note = client.predict(handle_file(str(fake)), api_name="/png_info")[-1]  # PNG Info says it in its notes box
    assert note.startswith("fake.png is not a PNG image; settings are read from PNG text")


def test_a_refused_request_is_logged_as_one_line_without_a_traceback(app_server, tmp_path, capfd, caplog):
    url, _ = app_server
    client = Client(url, verbose=False)
    (tmp_path / "fake.png").write_text("not an image")
    with pytest.raises(Exception, match="steps must be a whole number"):
        client.predict(model=SD, steps=0, api_name="/text_to_image")
    with pytest.raises(Exception, match="Cannot read fake.png"):
        client.predict(model=SD, image=handle_file(str(tmp_path / "fake.png")), api_name="/vae_roundtrip")
    assert "Traceback" not in capfd.readouterr().err
    refused = [record.getMessage() for record in caplog.records if "refused" in record.getMessage()]
    assert len(refused) == 2 and "generate_images refused: steps must be a whole number" in refused[0]


@pytest.mark.slow
def test_twenty_clients_on_every_endpoint_with_oversized_requests_in_flight_lose_nothing(app_server, tmp_path):
    import concurrent.futures
    import time

    from PIL import Image
    url, app = app_server
    scene = handle_file(str(layout.EXAMPLE_SCENE))
    layer = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (32, 0, 64, 64))
    layer.save(tmp_path / "layer.png")
    Image.new("RGB", (2048, 2048), (90, 90, 90)).save(tmp_path / "big.png")
    editor = {"background": scene, "layers": [handle_file(str(tmp_path / "layer.png"))], "composite": None}
    small = [  # (endpoint, keyword arguments, check of the answer)
        ("/text_to_image", dict(model=SD, prompt="a red circle", steps=3, width=64, height=64, number_of_images=1),
         lambda out, seed: out[1] == str(seed)),
        ("/image_to_image", dict(model=SD, image=scene, prompt="a blue circle", strength=0.5, steps=3,
                                 number_of_images=1), lambda out, seed: out[1] == str(seed)),
        ("/inpaint", dict(model=SD, image_and_mask=editor, prompt="a blue square", steps=3, number_of_images=1),
         lambda out, seed: out[1] == str(seed)),
        ("/vae_roundtrip", dict(model=SD, image=scene), lambda out, seed: out[2] > 20),
        ("/dit_sample", dict(model=DIT, class_label="red circle", steps=3, number_of_images=1),
         lambda out, seed: out[1] == str(seed)),
        ("/compare", dict(kind="vae", model=SD, image=scene), lambda out, seed: out[0].startswith("## ✅ PASS")),
    ]
    oversized = [  # refused with the bound, whatever this machine's learned speed
        ("/text_to_image", dict(model=SD, prompt="x", steps=100, width=1024, height=1024, number_of_images=8, seed=0),
         r"1024x1024 x 100 steps x 8 images is 839 Mpx-steps; this server allows [\d.]+ Mpx-steps per text-to-image "
         r"request \(about 60 s here\)"),
        ("/image_to_image", dict(model=SD, image=handle_file(str(tmp_path / "big.png")), prompt="x", steps=100,
                                 number_of_images=8, seed=0),  # 4.19 Mpx: a readable upload, far too much work
         r"2048x2048 x 100 steps x 8 images is 3\.36e\+03 Mpx-steps; this server allows [\d.]+ Mpx-steps per "
         r"text-to-image request"),
    ]

    def ask(i):
        start = time.monotonic()
        client = Client(url, verbose=False)
        if i >= 20:
            endpoint, arguments, message = oversized[i - 20]
            try:
                client.predict(api_name=endpoint, **arguments)
            except Exception as error:  # noqa: BLE001 (the client reports the server's message)
                return i, "refused", str(error), time.monotonic() - start
            return i, "ran", None, time.monotonic() - start
        endpoint, arguments, check = small[i % len(small)]
        seed = 100 + i
        if endpoint != "/vae_roundtrip" and endpoint != "/compare":
            arguments = dict(arguments, seed=seed)
        out = client.predict(api_name=endpoint, **arguments)
        return i, "ok" if check(out, seed) else f"wrong answer {out!r}", endpoint, time.monotonic() - start

    order = [20] + list(range(10)) + [21] + list(range(10, 20))  # the oversized ones among the small ones
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(22) as pool:
        outcomes = sorted(pool.map(ask, order))
    wall = time.monotonic() - start
    assert len(outcomes) == 22  # nothing lost: every request came back with an answer or a refusal
    answers = outcomes[:20]
    assert [status for _, status, _, _ in answers] == ["ok"] * 20, answers
    slowest = max(seconds for *_, seconds in answers)
    assert slowest < ANSWER_WITHIN_S, answers
    for (_, status, message, _), (_, _, expected) in zip(outcomes[20:], oversized):
        assert status == "refused" and re.search(expected, message), message
    print(f"20 small requests on 6 endpoints + 2 oversized: slowest small answer {slowest:.1f} s, all in {wall:.1f} s")


AUDIT_LAUNCHER = """
import os, runpy, sys
log = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
def hook(event, args):
    if event == "open" and not isinstance(args[0], int):
        try:
            os.write(log, (ascii(os.fsdecode(args[0])) + chr(10)).encode())
        except Exception:
            pass
sys.addaudithook(hook)
import safetensors, safetensors.torch  # opened by Rust, unseen by the hook: announce each file as an "open"
real_safe_open = safetensors.safe_open
def safe_open(filename, *args, **kwargs):
    sys.audit("open", os.fspath(filename), "rb", 0)
    return real_safe_open(filename, *args, **kwargs)
safetensors.safe_open = safetensors.torch.safe_open = safe_open
sys.argv = ["app.py"] + sys.argv[2:]
sys.path.insert(0, os.getcwd())  # as `python app.py` run here has it
runpy.run_path("app.py", run_name="__main__")
"""


@pytest.mark.slow
def test_no_visitor_path_trick_makes_the_server_open_a_file_outside_its_folders(tmp_path):
    """app.py in a subprocess with an audit hook logging every open() (and every safetensors file, which Rust
    opens unseen by the hook): after warming up, a battery of path tricks
    through every door (model choices, hub-shaped ids with --allow-hub, upload payloads, gradio's file route)
    opens nothing outside the model roots, the package, the Python install, the temp/gradio/hub cache folders
    and /proc, /sys, /dev."""
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    import httpx
    import torch
    from safetensors.torch import save_file
    repo = Path(__file__).resolve().parent.parent
    models, temp, hub = tmp_path / "models", tmp_path / "tmp", tmp_path / "hf"
    for folder in (models, temp, hub):
        folder.mkdir()
    (models / "escape").symlink_to("/etc")  # a link out of the model root
    secret = tmp_path / "outside" / "secret.safetensors"  # a loadable-looking file no visitor may reach
    secret.parent.mkdir()
    save_file({"weight": torch.zeros(1)}, str(secret))
    (models / "out.safetensors").symlink_to(secret)
    (tmp_path / "launcher.py").write_text(AUDIT_LAUNCHER)
    log = tmp_path / "opened.log"
    port = free_port()
    env = {**os.environ, "TMPDIR": str(temp), "GRADIO_TEMP_DIR": str(temp / "gradio"), "HF_HOME": str(hub),
           "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "SD_CORE_MODELS_DIR": ""}
    process = subprocess.Popen([sys.executable, str(tmp_path / "launcher.py"), str(log), "--models-dir", str(models),
                                "--allow-hub", "--host", "127.0.0.1", "--port", str(port), "--threads", "1"],
                               env=env, cwd=repo, stdout=open(tmp_path / "out", "w"), stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(240):
            try:
                if httpx.get(url + "/config", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None, (tmp_path / "out").read_text()
            time.sleep(0.5)
        client = Client(url, verbose=False)
        scene = str(repo / "sd_core" / "data" / "example-scene.png")  # warm up: lazy imports, mime types, uploads
        images, *_ = client.predict(SD, "a red circle", "", 2, 5.0, "ddim", 64, 64, 0, 1, False, api_name="/text_to_image")
        client.predict(SD, handle_file(scene), False, 0, api_name="/vae_roundtrip")
        httpx.get(f"{url}/gradio_api/file={images[0]['image']}", timeout=10)
        with open(log, "a") as marker:
            marker.write("'=== battery'\n")

        def call(api, data):
            """Raw HTTP as any script can send it (no client-side checks); returns the event stream's text."""
            base = f"{url}/gradio_api/call/{api}"
            response = httpx.post(base, json={"data": data}, timeout=30)
            if response.status_code != 200:
                return response.text
            return httpx.get(f"{base}/{response.json()['event_id']}", timeout=60).text

        choices = ["/etc/passwd", "../../../../etc/passwd", "~/.ssh/id_rsa", "~", "file:///etc/passwd",
                   "http://127.0.0.1:1/x", "models: ../../etc/passwd", "models: /etc/passwd", "models: escape",
                   "models: escape/passwd", "models: ~root", "a\x00b", "x" * 5000, "etc/passwd", "root/.ssh",
                   "sd_core/weights", "../sd_core", "sd_core/../../etc", "models/escape", f"{models}/escape/passwd",
                   str(secret), "models: ../outside/secret.safetensors", "models: out.safetensors",
                   f"models: {secret}", f"{models}/../outside/secret.safetensors"]
        for choice in choices:
            for api, data in (("text_to_image", [choice, "x", "", 2, 5.0, "ddim", 64, 64, 0, 1, False]),
                              ("dit_sample", [choice, "red circle", 1.0, 2, "ddim", 0, 1, "all"]),
                              ("compare", ["vae", choice])):
                answer = call(api, data)
                assert "event: complete" not in answer, (choice, api, answer)
        for path in ("/etc/passwd", "../../../../etc/passwd", "~/.bashrc", str(repo / "app.py"), "/proc/self/environ",
                     "file:///etc/passwd", "/etc/passwd\x00.png", "/" + "a" * 5000):
            payload = {"path": path, "meta": {"_type": "gradio.FileData"}}
            answer = call("vae_roundtrip", [SD, payload, False, 0])
            assert "event: complete" not in answer, (path, answer)
            editor = {"background": payload, "layers": [payload], "composite": None}
            answer = call("inpaint", [SD, editor, "x", "", 1.0, 2, 5.0, "ddim", 0, 1])
            assert "event: complete" not in answer, (path, answer)
            httpx.get(f"{url}/gradio_api/file={path.replace(chr(0), '%00')}", timeout=10)
        for lora in ("loras: ../../etc/passwd", "/etc/passwd"):
            assert "event: complete" not in call("text_to_image", [SD, "x", "", 2, 5.0, "ddim", 64, 64, 0, 1, False,
                                                                    "plain", 0, lora, 1.0])
        assert client.predict(SD, "a red circle", "", 2, 5.0, "ddim", 64, 64, 4, 1, False,
                              api_name="/text_to_image")[1] == "4"  # still serving
    finally:
        process.terminate()
        process.wait(30)
    import ast
    battery = [ast.literal_eval(line) for line in log.read_text().split("'=== battery'\n", 1)[1].splitlines()]
    allowed = [repo, models.resolve(), temp.resolve(), hub.resolve(), Path(sys.prefix).resolve(),
               Path(sys.base_prefix).resolve(), Path("/proc"), Path("/sys"), Path("/dev")]
    outside = set()
    for line in battery:
        path = Path(os.path.realpath(os.path.join(repo, line.replace(chr(0), ''))))
        if not any(path.is_relative_to(root) for root in allowed):
            outside.add(line)
    assert len(battery) > 0 and not outside, sorted(outside)
    print(f"{len(battery)} files opened during the battery, all inside {[str(p) for p in allowed]}")
