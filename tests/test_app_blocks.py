"""Gradio's own checks of an API call (how many values, whether a file parameter holds an uploaded file, whether it
decodes) answer through sd_core.app.blocks.Blocks with a one-line message naming the problem and the fix, where plain
gr.Blocks answers a bare error (issue 31 item 10, issue 30 item 3)."""
import httpx
import pytest

import gradio as gr

from sd_core.app.blocks import Blocks
from tests.launch import free_port


def served(blocks_class):
    with blocks_class() as demo:
        image = gr.Image(type="filepath", label="Image")
        number = gr.Number(0, label="Seed")
        out = gr.Textbox()
        gr.Button().click(lambda path, seed: f"{seed}", [image, number], out, api_name="roundtrip")
    demo.queue()
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    return demo, url.rstrip("/")


def answer(url: str, data: list) -> str:
    """The event stream's text for a raw call, as any script sends it."""
    base = f"{url}/gradio_api/call/roundtrip"
    event = httpx.post(base, json={"data": data}, timeout=30).json()["event_id"]
    return httpx.get(f"{base}/{event}", timeout=30).text


@pytest.fixture(scope="module")
def servers():
    ours, plain = served(Blocks), served(gr.Blocks)
    upload = httpx.post(f"{ours[1]}/gradio_api/upload", files={"files": ("fake.png", b"not an image\n" * 10)}).json()[0]
    yield ours[1], plain[1], upload
    ours[0].close()
    plain[0].close()


CASES = [
    ("missing values", lambda upload: [None], r"/roundtrip takes 2 values, one per parameter .* got 1"),
    ("a path never uploaded", lambda upload: [{"path": "/etc/passwd", "meta": {"_type": "gradio.FileData"}}, 0],
     r"A file path that was not uploaded to this app was sent: upload the file"),
    ("a number for a file", lambda upload: [5, 0], r"Image: expected an uploaded file; got int"),
    ("a text file named .png", lambda upload: [{"path": upload, "meta": {"_type": "gradio.FileData"}}, 0],
     r"Cannot read an upload as an image"),
]


@pytest.mark.parametrize("case,data,message", CASES, ids=[c[0] for c in CASES])
def test_gradios_input_failures_answer_with_one_line_naming_the_fix(servers, case, data, message):
    import re
    ours, plain, upload = servers
    if case == "a text file named .png":  # uploads belong to the server they were sent to
        plain_upload = httpx.post(f"{plain}/gradio_api/upload", files={"files": ("fake.png", b"x")}).json()[0]
        assert "{\"error\": null}" in answer(plain, data(plain_upload))  # gradio alone: no message
    elif case != "missing values":
        assert "{\"error\": null}" in answer(plain, data(upload))
    text = answer(ours, data(upload))
    assert "event: error" in text and re.search(message, text), text
    assert "/tmp" not in text.replace("/etc/passwd", "")  # no server folder in the answer
