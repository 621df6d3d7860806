"""The attack battery (issue 31), run by hand, not by the suite (it takes minutes):

    python -m tests.battery [--only text_to_image,png_info] [--clients 20]

app.py runs in a subprocess under an audit hook that logs every file it opens, on a models root holding the traps
visitors' files can be (a link out of the root, a FIFO named like weights, a linked LoRA). Every named endpoint the
app serves is called over raw HTTP, as any script can call it, first with its defaults made cheap, then with each
parameter in turn replaced by each hostile value. Then `--clients` clients call every endpoint at once while two
oversized requests are in flight. The tally says how each case was answered:

  accepted      the request ran (a hostile value the form's rules accept, e.g. seed -1)
  own message   refused with sd_core's one-line message
  generic       refused with gradio's generic error (no message) or an HTTP error: the finding to fix
  hung          no answer within --timeout seconds
  crashed       the server process died
  leaks         a message that names a server folder
and which files were opened outside the allowed roots (escapes).
"""
import argparse
import ast
import io
import json
import os
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from tests.launch import free_port
from tests.test_serving_server import AUDIT_LAUNCHER

REPO = Path(__file__).resolve().parents[1]
CHEAP = {"steps": 2, "number_of_images": 1, "frames": 2, "x_values": "1-2", "y_values": "1, 4", "seed": 0}
HOSTILE_VALUES = [None, "", -1, 0, 2 ** 70, -(2 ** 70), 1e308, "1e400", "nan", "inf", True, [], {}, [1] * 1000,
                  "x" * 100_000, "a\x00b", "../../etc/passwd", "/etc/passwd", "models: ../../etc/passwd",
                  "<img src=https://example.com/x.png><a href=https://example.com>link</a>",
                  "a red circle " + "BREAK " * 400, "<lora:../../etc/passwd:1>", "embedding:../../etc/passwd"]
FILE_COMPONENTS = {"Image", "Imageeditor", "File", "Sketchpad"}


def png_bytes(array: np.ndarray, **info) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    from PIL.PngImagePlugin import PngInfo
    chunks = PngInfo()
    for key, value in info.items():
        chunks.add_text(key, value)
    image.save(buffer, "PNG", pnginfo=chunks)
    return buffer.getvalue()


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height pixels, with a few bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + data


def hostile_uploads() -> dict[str, bytes]:
    gray = np.full((64, 64, 3), 128, np.uint8)
    return {
        "text-named.png": b"this is not an image\n" * 10,
        "bomb.png": bomb_png(100_000, 100_000),
        "sixteen-bit.png": png_bytes(np.full((64, 64), 40000, np.uint16)),
        "transparent.png": png_bytes(np.zeros((64, 64, 4), np.uint8)),
        "one-pixel.png": png_bytes(np.zeros((1, 1, 3), np.uint8)),
        "odd-size.png": png_bytes(np.full((67, 33, 3), 128, np.uint8)),
        "long-parameters.png": png_bytes(gray, parameters="a" * 1_000_000),
        "hostile-parameters.png": png_bytes(gray, parameters="x\nSteps: 1000000000, Seed: " + "9" * 70 +
                                            ", Size: 99999x99999, Sampler: nope, CFG scale: 1e400"),
        "comfyui.png": png_bytes(gray, prompt="{}", workflow="{}"),
        "truncated.png": png_bytes(gray)[:200],
    }


class App:
    """app.py under the audit hook, on a hostile models root; restarted if a case kills it."""

    def __init__(self, folder: Path):
        self.folder, self.models, self.temp = folder, folder / "models", folder / "tmp"
        for path in (self.models / "loras", self.models / "embeddings", self.temp):
            path.mkdir(parents=True, exist_ok=True)
        outside = folder / "outside"
        outside.mkdir(exist_ok=True)
        (outside / "secret.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
        for link, target in ((self.models / "escape", Path("/etc")), (self.models / "out.safetensors", outside /
                             "secret.safetensors"), (self.models / "loras" / "linked.safetensors", outside /
                             "secret.safetensors")):
            if not link.is_symlink():
                link.symlink_to(target)
        if not (self.models / "fifo.safetensors").exists():
            os.mkfifo(self.models / "fifo.safetensors")
        (folder / "launcher.py").write_text(AUDIT_LAUNCHER)
        self.log = folder / "opened.log"
        self.process, self.url, self.crashes, self.mask = None, None, 0, None

    def start(self):
        port = free_port()
        env = {**os.environ, "TMPDIR": str(self.temp), "GRADIO_TEMP_DIR": str(self.temp / "gradio"),
               "HF_HOME": str(self.folder / "hf"), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
               "SD_CORE_MODELS_DIR": ""}
        self.process = subprocess.Popen(
            [sys.executable, str(self.folder / "launcher.py"), str(self.log), "--models-dir", str(self.models),
             "--host", "127.0.0.1", "--port", str(port)], env=env, cwd=REPO,
            stdout=open(self.folder / "server.log", "a"), stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{port}"
        for _ in range(480):
            try:
                if httpx.get(self.url + "/config", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.process.poll() is not None:
                raise SystemExit(f"app.py did not start: {(self.folder / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        raise SystemExit("app.py did not answer within 240 s")

    def alive(self) -> bool:
        if self.process.poll() is None:
            return True
        self.crashes += 1
        self.start()
        return False

    def upload(self, name: str, data: bytes) -> dict:
        response = httpx.post(f"{self.url}/gradio_api/upload", files={"files": (name, data)}, timeout=60)
        response.raise_for_status()
        return {"path": response.json()[0], "orig_name": name, "meta": {"_type": "gradio.FileData"}}

    def call(self, api: str, data: list, timeout: float) -> tuple[str, str]:
        """One raw call: ('accepted' | 'own message' | 'generic' | 'hung', the answer's text)."""
        try:
            response = httpx.post(f"{self.url}/gradio_api/call/{api}", json={"data": data}, timeout=timeout)
            if response.status_code != 200:
                return "generic", f"HTTP {response.status_code}: {response.text[:300]}"
            stream = httpx.get(f"{self.url}/gradio_api/call/{api}/{response.json()['event_id']}", timeout=timeout)
        except httpx.TimeoutException:
            return "hung", ""
        except httpx.HTTPError as error:
            return "generic", f"{type(error).__name__}: {error}"
        text = stream.text
        if "event: complete" in text:
            return "accepted", text[-300:]
        message = text.split("data:", 1)[1].strip() if "data:" in text else "null"
        try:
            payload = json.loads(message)
        except ValueError:
            payload = message
        if isinstance(payload, dict):  # gradio's {"error": message}, null when the handler raised no gr.Error
            payload = payload.get("error")
        return ("own message" if payload else "generic"), str(payload)[:300]


def as_file(app: App, component: str, upload: dict):
    """An upload as the component takes it; the image editor's gets a painted layer (a square to repaint)."""
    if component != "Imageeditor":
        return upload
    if app.mask is None:
        painted = np.zeros((64, 64, 4), np.uint8)
        painted[16:48, 16:48] = 255
        app.mask = app.upload("mask.png", png_bytes(painted))
    return {"background": upload, "layers": [app.mask], "composite": upload}


def base_arguments(app: App, parameters: list, example: dict) -> list:
    values = []
    for parameter in parameters:
        if parameter["component"] in FILE_COMPONENTS:
            values.append(as_file(app, parameter["component"], example))
        else:
            values.append(CHEAP.get(parameter["parameter_name"], parameter.get("parameter_default")))
    return values


def cases(app: App, parameters: list, uploads: dict):
    """(description, index, value) for every parameter and every hostile value of its kind."""
    for index, parameter in enumerate(parameters):
        name, component = parameter["parameter_name"], parameter["component"]
        if component in FILE_COMPONENTS:
            for file_name, upload in uploads.items():
                yield f"{name}={file_name}", index, as_file(app, component, upload)
            for path in ("/etc/passwd", str(REPO / "app.py"), "../../../etc/passwd", "/proc/self/environ"):
                yield f"{name}=FileData({path})", index, as_file(app, component, {"path": path, "meta": {
                    "_type": "gradio.FileData"}})
        for value in HOSTILE_VALUES:
            yield f"{name}={repr(value)[:40]}", index, value
    yield "missing arguments", None, None


def run_cases(app: App, endpoints: dict, only: set, timeout: float, verbose: bool) -> tuple[Counter, list, list]:
    tally, findings, leaks = Counter(), [], []
    example = app.upload("example-scene.png", (REPO / "sd_core" / "data" / "example-scene.png").read_bytes())
    uploads = {name: app.upload(name, data) for name, data in hostile_uploads().items()}
    secrets = [str(app.models), str(app.temp), str(app.folder), str(REPO)]
    for api, endpoint in endpoints.items():
        if only and api.strip("/") not in only:
            continue
        parameters = endpoint["parameters"]
        base = base_arguments(app, parameters, example)
        endpoint_tally = Counter()
        for description, index, value in cases(app, parameters, uploads):
            data = base[:1] if index is None else [*base[:index], value, *base[index + 1:]]
            outcome, answer = app.call(api.strip("/"), data, timeout)
            if not app.alive():
                outcome = "crashed"
            tally[outcome] += 1
            endpoint_tally[outcome] += 1
            if verbose:
                print(f"  {outcome:11} {description}: {answer[:100]!r}", flush=True)
            if outcome in ("generic", "hung", "crashed"):
                findings.append(f"{outcome:8} {api} {description}: {answer[:160]}")
            if outcome != "accepted" and any(secret in answer for secret in secrets):
                leaks.append(f"{api} {description}: {answer[:160]}")
        print(f"{api}: {dict(endpoint_tally)}", flush=True)
    return tally, findings, leaks


def crowd(app: App, endpoints: dict, clients: int, timeout: float) -> Counter:
    """`clients` threads call every endpoint with its cheap defaults while two oversized requests are in flight."""
    example = app.upload("example-scene.png", (REPO / "sd_core" / "data" / "example-scene.png").read_bytes())
    outcomes, lock = Counter(), threading.Lock()
    oversized = {"steps": 40, "number_of_images": 1, "width": 256, "height": 256}  # just within the work bound

    def client(chosen, arguments_of, prefix=""):
        for api, endpoint in chosen.items():
            outcome, answer = app.call(api.strip("/"), arguments_of(endpoint), timeout)
            lost = outcome in ("generic", "hung") and "queue" not in answer.lower()
            with lock:
                outcomes[prefix + ("lost" if lost else outcome)] += 1

    def big(endpoint):
        base = base_arguments(app, endpoint["parameters"], example)
        return [oversized.get(p["parameter_name"], v) for p, v in zip(endpoint["parameters"], base)]

    def cheap(endpoint):
        return base_arguments(app, endpoint["parameters"], example)

    big_endpoints = {api: endpoints[api] for api in ("/text_to_image",) if api in endpoints}
    threads = [threading.Thread(target=client, args=(big_endpoints, big, "oversized ")) for _ in range(2)]
    threads += [threading.Thread(target=client, args=(endpoints, cheap)) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def escapes(app: App) -> tuple[int, list]:
    """Files opened after start-up outside the repository, the models root, the temp, hub and Python folders."""
    lines = app.log.read_text().split("'=== battery'\n", 1)[-1].splitlines()
    opened = [ast.literal_eval(line) for line in lines]
    allowed = [REPO, app.models.resolve(), app.temp.resolve(), (app.folder / "hf").resolve(),
               Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve(), Path("/proc"), Path("/sys"), Path("/dev")]
    outside = sorted({path for path in opened if not any(
        Path(os.path.realpath(os.path.join(REPO, path.replace("\0", "")))).is_relative_to(root) for root in allowed)})
    return len(opened), outside


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="", help="comma-separated endpoint names (default: all)")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=180)
    parser.add_argument("--verbose", action="store_true", help="print every case's outcome")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        app = App(Path(folder))
        app.start()
        endpoints = httpx.get(f"{app.url}/gradio_api/info", timeout=60).json()["named_endpoints"]
        with open(app.log, "a") as marker:
            marker.write("'=== battery'\n")
        started = time.monotonic()
        tally, findings, leaks = run_cases(app, endpoints, set(filter(None, args.only.split(","))), args.timeout,
                                               args.verbose)
        crowd_outcomes = crowd(app, endpoints, args.clients, args.timeout) if args.clients else Counter()
        alive = app.process.poll() is None
        app.process.terminate()
        app.process.wait(30)
        opened, outside = escapes(app)
    print(json.dumps({"cases": sum(tally.values()), **tally, "crashed (restarts)": app.crashes, "leaks": len(leaks),
                      "crowd": dict(crowd_outcomes), "files opened": opened, "escapes": len(outside),
                      "alive at the end": alive, "minutes": round((time.monotonic() - started) / 60, 1)}, indent=1))
    for line in findings + [f"leak     {line}" for line in leaks] + [f"escape   {path}" for path in outside]:
        print(line)
    return 0 if not (findings or leaks or outside) else 1


if __name__ == "__main__":
    sys.exit(main())
