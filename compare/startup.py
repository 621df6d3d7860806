"""How long `python app.py` takes to put its first picture on the page, measured the way a visitor sees it.

    python -m compare startup --runs 3

Each run starts app.py on a free port, waits until it answers HTTP ("listening"), then has a headless Chromium
open the page (DevTools protocol) and polls until the Text to image gallery shows its pictures. Before the runs,
one process times the phases of the start in order (imports, model warm-up, building the UI) so the total can be
read against its parts. Needs `chromium` on PATH; prints medians.
"""
import base64
import json
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GALLERY_IMAGES = "document.querySelectorAll('img[src*=\"/file\"]').length"
PHASES = """
import time; start = time.perf_counter(); marks = []
def mark(name): marks.append((name, time.perf_counter()))
import gradio; mark("import gradio")
import torch; mark("import torch")
import app; mark("import app (sd_core, compare)")
for name in app.EMBEDDED: app.MODELS.get(name)
mark("load the embedded models")
app.build(); mark("build the UI")
previous = start
for name, at in marks:
    print(f"{name}\\t{at - previous:.2f}"); previous = at
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float = 60.0):
    deadline = time.perf_counter() + timeout
    while True:
        try:
            return urllib.request.urlopen(url, timeout=1).read()
        except OSError:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"{url} did not answer in {timeout:.0f} s") from None
            time.sleep(0.02)


class DevTools:
    """The least of the Chrome DevTools protocol: one page's websocket, a command, its answer."""

    def __init__(self, websocket_url: str):
        address, path = websocket_url.removeprefix("ws://").split("/", 1)
        host, port = address.split(":")
        self.socket, self.pending, self.last_id = socket.create_connection((host, int(port))), b"", 0
        key = base64.b64encode(os.urandom(16)).decode()
        self.socket.sendall(f"GET /{path} HTTP/1.1\r\nHost: {address}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        while b"\r\n\r\n" not in self.pending:
            self.pending += self.socket.recv(4096)
        self.pending = self.pending.split(b"\r\n\r\n", 1)[1]

    def read(self, size: int) -> bytes:
        while len(self.pending) < size:
            self.pending += self.socket.recv(65536)
        data, self.pending = self.pending[:size], self.pending[size:]
        return data

    def call(self, method: str, **params) -> dict:
        self.last_id += 1
        payload = json.dumps({"id": self.last_id, "method": method, "params": params}).encode()
        mask = os.urandom(4)  # a client's frames are masked (RFC 6455)
        length = (bytes([0x80 | len(payload)]) if len(payload) < 126 else bytes([0x80 | 126]) + struct.pack(">H", len(payload)))
        self.socket.sendall(bytes([0x81]) + length + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload)))
        while True:
            size = self.read(2)[1] & 0x7F
            size = struct.unpack(">H", self.read(2))[0] if size == 126 else struct.unpack(">Q", self.read(8))[0] if size == 127 else size
            message = json.loads(self.read(size))
            if message.get("id") == self.last_id:
                return message.get("result", {})


def one_start(browser: str) -> tuple[float, float]:
    """(seconds until app.py answers HTTP, seconds from navigating to the first pictures on the page)."""
    port, debug_port = free_port(), free_port()
    start = time.perf_counter()
    server = subprocess.Popen([sys.executable, "app.py", "--port", str(port)], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    chrome, profile = None, tempfile.TemporaryDirectory()
    try:
        wait_for(f"http://127.0.0.1:{port}/")
        listening = time.perf_counter() - start
        chrome = subprocess.Popen([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                   f"--user-data-dir={profile.name}", f"--remote-debugging-port={debug_port}", "about:blank"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pages = json.loads(wait_for(f"http://127.0.0.1:{debug_port}/json"))
        page = DevTools(next(p for p in pages if p["type"] == "page")["webSocketDebuggerUrl"])
        navigated = time.perf_counter()
        page.call("Page.navigate", url=f"http://127.0.0.1:{port}/")
        while not page.call("Runtime.evaluate", expression=GALLERY_IMAGES)["result"].get("value"):
            if time.perf_counter() - navigated > 60:
                raise TimeoutError("the page showed no pictures in 60 s")
            time.sleep(0.02)
        return listening, time.perf_counter() - navigated
    finally:
        for process in (chrome, server):
            if process is not None:
                process.kill()
                process.wait()
        profile.cleanup()


def main(runs: int = 3):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("compare startup needs Chromium on PATH (apt-get install -y chromium).")
    phases = subprocess.run([sys.executable, "-c", PHASES], cwd=ROOT, capture_output=True, text=True, check=True)
    print("phases of the start, one process:")
    for line in phases.stdout.splitlines():
        name, seconds = line.split("\t")
        print(f"  {name:<32} {float(seconds):5.2f} s")
    starts = [one_start(browser) for _ in range(runs)]
    listening, page = (statistics.median(values) for values in zip(*starts))
    print(f"median of {runs} starts: app.py answers HTTP after {listening:.2f} s; the page shows its first pictures "
          f"{page:.2f} s after the browser navigates; {listening + page:.2f} s in all")
