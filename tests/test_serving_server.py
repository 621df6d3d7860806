"""The serving rules behind a real gradio server on 127.0.0.1, wired as app.py is to be: raw-API values reach the
checks unrounded, an upload bomb is refused from its header, oversize uploads and work are refused with the
bound, and the server keeps answering (issue 19)."""
import re
import struct
import zlib

import gradio as gr
import pytest
from gradio_client import Client, handle_file

from sd_core.serving import (MAX_UPLOAD_BYTES, WorkLimits, as_whole_number, check_request, raw_value,
                             open_upload)

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
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", quiet=True,
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
