"""Hostile visitors' inputs (issue 19, items 2-7): uploads, raw-API numbers, oversized work, model loads under
concurrency, interrupted writes, results that pile up. Each refusal is sd_core's own message naming the bound."""
import io
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd_core.app import serving
from sd_core.pipelines.image_io import load_image, save_image
from sd_core.pipelines.inpainting import load_mask
from sd_core.app.serving import (LoadingCache, WorkLimits, as_choice, as_number, as_text, as_whole_number,
                             check_request, open_upload)

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------ crafted files


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(width: int, height: int) -> bytes:
    """A 100-byte PNG whose header claims width x height (8-bit RGB) over one compressed row: a bomb's header."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * (3 * 64 + 1)))
            + chunk(b"IEND", b""))


def real_bomb() -> bytes:
    """A genuine 12000x12000 image (144 Mpx, 432 MB decoded) in a small PNG: all one colour."""
    return png_bytes(Image.new("1", (12000, 12000)))


GOOD = png_bytes(Image.new("RGB", (64, 48), (10, 200, 30)))

UPLOADS = [  # (what, the file's bytes (or a maker), options, the message expected)
    ("decompression bomb header 12000x12000", png_claiming(12000, 12000), {}, r"12000x12000 \(144\.0 Mpixels\); the limit is 4\.2 Mpixels"),
    ("real bomb 12000x12000", real_bomb, {}, r"12000x12000 \(144\.0 Mpixels\); the limit is"),
    ("header beyond PIL's own bound", png_claiming(60000, 60000), {}, r"claims 3600\.0 Mpixels: refused before decoding; the limit is 4\.2 Mpixels"),
    ("5000x5000", lambda: png_bytes(Image.new("L", (5000, 5000))), {}, r"5000x5000 \(25\.0 Mpixels\); the limit is 4\.2 Mpixels"),
    ("above an operator's bound", GOOD, {"max_pixels": 1000}, r"64x48 \(3 Kpixels\); the limit is 1 Kpixels"),
    ("too many bytes", GOOD, {"max_bytes": 100}, r"is \d+ B; the limit is 100 B"),
    ("truncated PNG", GOOD[:len(GOOD) // 2], {}, "is truncated or corrupt"),
    ("truncated JPEG", lambda: jpeg_bytes()[:1000], {}, "is truncated or corrupt"),
    ("JPEG cut in its header", lambda: jpeg_bytes()[:400], {}, r"is truncated or corrupt \(in its header"),
    ("corrupt PNG chunks", GOOD[:40] + b"\x00" * 60 + GOOD[100:], {}, "looks like a PNG file but is corrupt"),
    ("PNG signature then garbage", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 2, {},
     "looks like a PNG file but is corrupt"),
    ("corrupt PNG pixels", GOOD[:-30] + b"\xff" * 18 + GOOD[-12:], {}, "is truncated or corrupt"),
    ("empty file", b"", {}, r"is empty \(0 bytes\)"),
    ("text file", b"hello, not an image\n", {}, "Cannot read upload.png as an image: it is not a PNG, JPEG"),
    ("SVG", b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', {}, "Cannot read upload.png as an image: it is not a PNG, JPEG"),
    ("a pickle", b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.", {}, "Cannot read upload.png as an image: it is not a PNG, JPEG"),
]


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("reader", ["open_upload", "load_image"])
@pytest.mark.parametrize("what,content,options,message", UPLOADS, ids=[u[0] for u in UPLOADS])
def test_hostile_upload_is_refused_before_decoding_with_a_clear_message(tmp_path, reader, what, content, options,
                                                                        message):
    path = tmp_path / "upload.png"
    path.write_bytes(content() if callable(content) else content)
    read = open_upload if reader == "open_upload" else load_image
    if reader == "load_image":  # the CLI's default bound is wider; give it the app's so both meet the same cases
        options = {"max_pixels": serving.MAX_UPLOAD_PIXELS, **options}
    start = time.perf_counter()
    with pytest.raises(ValueError, match=message) as error:
        read(path, **options)
    assert time.perf_counter() - start < 10, what  # the 432 MB decode took 31 s and 3.2 GB in the issue
    text = str(error.value)
    assert "upload.png" in text and str(tmp_path) not in text and " at 0x" not in text and "PIL." not in text, text


def oversized_by_bytes(path: Path):
    """A good PNG followed by zeros up to 257 MiB, past the 256 MiB bound (a sparse file: no disk used)."""
    path.write_bytes(GOOD)
    os.truncate(path, 257 * 2 ** 20)


@pytest.mark.parametrize("make,message", [
    (lambda path: path.write_bytes(png_claiming(12000, 12000)),
     r"^mask\.png is 12000x12000 \(144\.0 Mpixels\); the limit is 67\.1 Mpixels"),
    (oversized_by_bytes, r"^mask\.png is 269\.5 MB; the limit is 268\.4 MB"),
], ids=["pixels", "bytes"])
def test_an_oversized_mask_is_refused_as_an_oversized_image_is(tmp_path, make, message):
    make(tmp_path / "mask.png")
    with pytest.raises(ValueError, match=message) as as_image:
        load_image(tmp_path / "mask.png")
    with pytest.raises(ValueError) as as_mask:
        load_mask(tmp_path / "mask.png", (64, 48))
    assert str(as_mask.value) == str(as_image.value)


@pytest.mark.parametrize("source,message", [
    (None, "Upload an image"),
    ("no-such-file.png", "No such image file: no-such-file.png"),
    (Image.new("RGB", (3000, 3000)), r"3000x3000 \(9\.0 Mpixels\); the limit is 4\.2 Mpixels"),
    (12, "must be a file path, a file or a PIL image; got int"),
])
def test_other_bad_uploads(source, message):
    with pytest.raises(ValueError, match=message):
        open_upload(source)


def test_a_folder_is_not_an_image(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path.name} is not an image file"):
        open_upload(tmp_path)


def test_a_file_object_and_a_raw_api_payload_are_read(tmp_path):
    (tmp_path / "a.png").write_bytes(GOOD)
    assert open_upload(io.BytesIO(GOOD)).size == (64, 48)
    assert open_upload({"path": str(tmp_path / "a.png"), "meta": {"_type": "gradio.FileData"}}).size == (64, 48)


def test_gradio_filepath_image_does_not_decode_a_bomb(tmp_path, monkeypatch):
    """The wiring we give app.py: gr.Image(type="filepath", image_mode=None) hands over the path after PIL's lazy
    open (the header only); with type="pil" (or image_mode "RGB") gradio would decode the 432 MB first."""
    from gradio import image_utils
    from gradio.data_classes import ImageData
    from PIL import ImageFile
    path = tmp_path / "bomb.png"
    path.write_bytes(png_claiming(12000, 12000))

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("gradio decoded the upload")
    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    payload = ImageData(path=str(path), orig_name="bomb.png")
    assert image_utils.preprocess_image(payload, str(tmp_path), "png", None, "filepath") == str(path)
    with pytest.raises(AssertionError, match="decoded"):
        image_utils.preprocess_image(payload, str(tmp_path), "png", "RGB", "pil")


# ------------------------------------------------------------------------------- images that must convert


def test_16_bit_grey_png_is_scaled_to_8_bits_not_clipped_to_white(tmp_path):
    values = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode == "I;16"
    rgb = np.asarray(load_image(tmp_path / "deep.png")).astype(int)
    expected = np.round(values / 257).astype(int)
    assert np.abs(rgb[..., 0] - expected).max() <= 1
    assert (rgb[..., 0] == rgb[..., 2]).all() and rgb.mean() == pytest.approx(127.5, abs=1)


def test_16_bit_mask_reads_as_its_8_bit_equivalent_not_clipped_to_white(tmp_path):
    values = np.full((16, 24), 100, dtype=np.uint8)  # mid-range levels either side of 0.5: clipped, all would be 255
    values[4:12, 8:16] = 200
    Image.fromarray(values).save(tmp_path / "mask8.png")
    Image.fromarray(values.astype(np.uint16) * 257).save(tmp_path / "mask16.png")
    assert Image.open(tmp_path / "mask16.png").mode == "I;16"
    deep, shallow = (load_mask(tmp_path / name, (24, 16)) for name in ("mask16.png", "mask8.png"))
    assert deep.mode == shallow.mode == "L" and np.array_equal(np.asarray(deep), values)
    assert np.array_equal(np.asarray(deep), np.asarray(shallow))


def test_a_16_bit_mask_editor_layer_is_scaled_not_clipped(tmp_path):
    """An opaque layer sent through the API masks its light pixels; in 16 bits, 100/255 must stay dark."""
    from sd_core.app.inpaint_tab import painted_mask
    values = np.full((16, 24), 100, dtype=np.uint16) * 257
    values[4:12, 8:16] = 200 * 257
    Image.fromarray(values).save(tmp_path / "layer16.png")
    Image.new("RGB", (24, 16), "gray").save(tmp_path / "image.png")
    _, mask = painted_mask({"background": str(tmp_path / "image.png"), "layers": [str(tmp_path / "layer16.png")]}, 10 ** 6)
    assert np.array_equal(np.asarray(mask) > 0, values > 128 * 257)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_white(tmp_path, mode):
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    image = image.convert(mode) if mode != "P" else image.convert("P", palette=Image.Palette.ADAPTIVE)
    if mode == "P":
        image.info["transparency"] = image.getpixel((1, 1))
    image.save(tmp_path / "alpha.png", **({"transparency": image.info["transparency"]} if mode == "P" else {}))
    rgb = open_upload(tmp_path / "alpha.png")
    assert rgb.mode == "RGB" and rgb.getpixel((5, 5)) == (255, 255, 255)
    assert rgb.getpixel((0, 0)) != (255, 255, 255)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90° clockwise to view
    image.save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    assert open_upload(tmp_path / "rotated.jpg").size == (20, 40)


# ------------------------------------------------------------------------------------------- raw-API numbers

NUMBERS = [  # (function, value, the message expected)
    (as_whole_number, float("nan"), r"seed must be a whole number from 0 to 4294967295; got nan \(not a finite"),
    (as_whole_number, float("inf"), r"got inf \(not a finite number\)"),
    (as_whole_number, 1e400, r"got inf \(not a finite number\)"),  # what JSON's 1e400 becomes
    (as_whole_number, "1e400", r"got inf \(not a finite number\)"),
    (as_whole_number, "ten", r"seed must be a whole number from 0 to 4294967295; got the text 'ten'"),
    (as_whole_number, "abc", r"got the text 'abc'"),
    (as_whole_number, None, r"seed must be a whole number from 0 to 4294967295; none was given"),
    (as_whole_number, 1.5, r"got 1\.5, which is not whole"),
    (as_whole_number, True, r"got bool True"),
    (as_whole_number, [3], r"got list \[3\]"),
    (as_whole_number, -1, r"from 0 to 4294967295; got -1"),
    (as_whole_number, 10 ** 400, r"got 1000000000000000000000000000000000000\.\.\."),
    (as_number, float("nan"), r"guidance_scale must be a number from 0 to 20; got nan"),
    (as_number, "ten", r"guidance_scale must be a number from 0 to 20; got the text 'ten'"),
    (as_number, None, r"guidance_scale must be a number from 0 to 20; none was given"),
    (as_number, float("-inf"), r"got -inf \(not a finite number\)"),
    (as_number, 10 ** 400, r"from 0 to 20; got 1000000"),
    (as_number, 21, r"from 0 to 20; got 21"),
    (as_number, {"x": 1}, r"got dict"),
]


@pytest.mark.parametrize("function,value,message", NUMBERS, ids=[f"{f.__name__}({v!r:.20})" for f, v, _ in NUMBERS])
def test_hostile_number_is_refused_naming_the_parameter_and_range(function, value, message):
    name, low, high = ("seed", 0, 2 ** 32 - 1) if function is as_whole_number else ("guidance_scale", 0, 20)
    with pytest.raises(ValueError, match=message):
        function(value, name, low, high)


@pytest.mark.parametrize("value,expected", [(7, 7), (7.0, 7), ("7", 7), (" 12 ", 12), ("3.0", 3)])
def test_whole_numbers_in_any_plain_form_are_accepted(value, expected):
    number = as_whole_number(value, "steps", 1, 100)
    assert number == expected and type(number) is int


def test_choices_and_texts():
    with pytest.raises(ValueError, match="scheduler must be one of ddim, euler; got None"):
        as_choice(None, "scheduler", ["ddim", "euler"])
    assert as_choice("ddim", "scheduler", ["ddim", "euler"]) == "ddim"
    with pytest.raises(ValueError, match="prompt is 100000 characters long; this server takes at most 2000"):
        as_text("a" * 100_000, "prompt")
    with pytest.raises(ValueError, match="prompt must be text; got int"):
        as_text(5, "prompt")
    assert as_text(None, "negative_prompt") == ""


# ------------------------------------------------------------------------------------------------- work


REQUESTS = [  # (kind, pixels, steps, batch, the message expected; None: accepted)
    ("text_to_image", 1024 * 1024, 100, 8,
     (r"^1024x1024 x 100 steps x 8 images is 839 Mpx-steps; this server allows 2\.73 Mpx-steps per text-to-image "
      r"request \(about 60 s here\)\. Reduce the size, steps or number of images\.$")),
    ("dit", 256 * 256, 250, 4, r"^256x256 x 250 steps x 4 images is 65\.5 Mpx-steps; this server allows 3 Mpx-steps per DiT"),
    ("vae_roundtrip", 2048 * 2048, 1, 1, (r"^2048x2048 is 4\.19 Mpx; this server allows 2\.4 Mpx per VAE round-trip "
                                          r"request \(about 60 s here\)\. Reduce the size\.$")),
    ("compare", 512 * 512, 50, 1, r"512x512 x 50 steps is 13\.1 Mpx-steps"),
    ("text_to_image", 64 * 64, 20, 4, None),  # the embedded model's default: ~7 s
    ("vae_roundtrip", 1024 * 1024, 1, 1, None),
    ("some_new_kind", 64 * 64, 20, 1, None),  # an unknown kind is priced as the slowest known one
]


@pytest.mark.parametrize("kind,pixels,steps,batch,message", REQUESTS)
def test_work_per_request_is_bounded_by_what_this_machine_can_do(kind, pixels, steps, batch, message):
    limits = WorkLimits.for_device("cpu")
    if message is None:
        assert 0 < check_request(limits, kind, pixels, steps, batch) <= limits.max_seconds
    else:
        with pytest.raises(ValueError, match=message):
            check_request(limits, kind, pixels, steps, batch)


def test_a_gpu_and_an_operator_widen_the_bounds():
    request = ("text_to_image", 512 * 512, 30, 4)
    with pytest.raises(ValueError):
        check_request(WorkLimits.for_device("cpu"), *request)
    check_request(WorkLimits.for_device("cuda"), *request)
    limits = WorkLimits.from_environment("cpu", {"SD_CORE_MAX_SECONDS": "3600", "SD_CORE_HEAVY_SLOTS": "2",
                                                 "SD_CORE_MAX_UPLOAD_PIXELS": str(4096 ** 2)})
    assert limits.heavy_slots == 2 and limits.max_upload_pixels == 4096 ** 2
    check_request(limits, *request)
    with pytest.raises(ValueError, match="SD_CORE_HEAVY_SLOTS must be positive"):
        WorkLimits.from_environment("cpu", {"SD_CORE_HEAVY_SLOTS": "0"})


def test_observed_speed_tightens_the_bound_once_runs_agree():
    limits = WorkLimits.for_device("cpu")
    before = limits.budget_mpx_steps("text_to_image")
    for _ in range(3):  # one slow run is an outlier; three are this machine's speed
        limits.observe("text_to_image", seconds=100.0, pixels=512 * 512, steps=10)  # 38 s per Mpx-step, slower
    assert limits.budget_mpx_steps("text_to_image") < before
    limits.observe("text_to_image", seconds=float("nan"), pixels=1, steps=1)  # ignored
    assert np.isfinite(limits.budget_mpx_steps("text_to_image"))


def test_each_model_learns_its_own_speed_and_the_table_stays_bounded(monkeypatch):
    limits = WorkLimits.for_device("cpu")
    base = limits.budget_mpx_steps("text_to_image")
    assert limits.budget_mpx_steps("text_to_image:embedded") == base  # the kind's speed until observed
    for _ in range(3):
        limits.observe("text_to_image:sd15", seconds=300.0, pixels=512 * 512, steps=20)  # 57 s per Mpx-step
    assert limits.budget_mpx_steps("text_to_image:sd15") < base
    assert limits.budget_mpx_steps("text_to_image:embedded") == limits.budget_mpx_steps("text_to_image") == base
    with pytest.raises(ValueError, match=r"per text-to-image request"):
        check_request(limits, "text_to_image:sd15", 512 * 512, 20, 1)
    monkeypatch.setattr("sd_core.pipelines.work.MAX_KINDS", len(limits.seconds_per_mpx_step))
    limits.observe("text_to_image:owner/visitor-model", seconds=1.0, pixels=64 * 64, steps=1)
    assert "text_to_image:owner/visitor-model" not in limits.seconds_per_mpx_step


def test_heavy_work_shares_one_slot_across_endpoints_and_light_work_passes():
    limits = WorkLimits.for_device("cpu", heavy_slots=1, slot_wait_s=0.2)
    heavy = check_request(limits, "text_to_image", 256 * 256, 30, 1)  # ~43 s
    assert heavy > limits.light_seconds
    holding, done = threading.Event(), threading.Event()

    def text_to_image_endpoint():
        with limits.slot(heavy):
            holding.set()
            done.wait(10)
    worker = threading.Thread(target=text_to_image_endpoint)
    worker.start()
    try:
        assert holding.wait(5)
        with pytest.raises(ValueError, match=r"busy with other large requests \(waited 0 s\)"):
            with limits.slot(check_request(limits, "vae_roundtrip", 1024 * 1024)):  # another endpoint, heavy
                pass
        with limits.slot(check_request(limits, "dit", 64 * 64, 10, 1)):  # light: not queued behind it
            pass
    finally:
        done.set()
        worker.join(10)
    with limits.slot(heavy):  # released
        pass


# ------------------------------------------------------------------------------------------- model cache


class FakeLoader:
    """load(key): returns a fresh object; a key in `gates` waits for its event first; a key in `failures` raises."""

    def __init__(self):
        self.calls, self.started, self.gates, self.failures = [], {}, {}, {}

    def __call__(self, key):
        self.calls.append(key)
        self.started.setdefault(key, threading.Event()).set()
        if key in self.gates:
            assert self.gates[key].wait(10), "test gate never opened"
        if key in self.failures:
            raise self.failures[key]
        return object()


def in_thread(fn, *args):
    result = {}

    def run():
        try:
            result["value"] = fn(*args)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            result["error"] = error
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_slow_load_of_one_model_does_not_block_a_loaded_model():
    loader = FakeLoader()
    cache = LoadingCache(loader, size=2)
    b = cache.get("B")
    loader.gates["A"] = threading.Event()
    loading_a, result_a = in_thread(cache.get, "A")
    assert loader.started.setdefault("A", threading.Event()).wait(5)
    getting_b, result_b = in_thread(cache.get, "B")
    getting_b.join(2)
    assert not getting_b.is_alive(), "a request for the loaded model B waited on model A's load"
    assert result_b["value"] is b
    loader.gates["A"].set()
    loading_a.join(5)
    assert "value" in result_a and loader.calls == ["B", "A"]


def test_concurrent_requests_for_one_model_share_one_load():
    loader = FakeLoader()
    loader.gates["A"] = threading.Event()
    cache = LoadingCache(loader, size=2)
    threads = [in_thread(cache.get, "A") for _ in range(5)]
    assert loader.started.setdefault("A", threading.Event()).wait(5)
    loader.gates["A"].set()
    for thread, _ in threads:
        thread.join(5)
    values = {id(result["value"]) for _, result in threads}
    assert loader.calls == ["A"] and len(values) == 1


def test_a_failed_load_reaches_its_waiters_and_is_retried_after_its_ttl():
    loader = FakeLoader()
    loader.gates["A"] = threading.Event()
    loader.failures["A"] = ValueError("A is corrupt")
    cache = LoadingCache(loader, size=2, error_ttl_s=60)
    first, first_result = in_thread(cache.get, "A")
    assert loader.started.setdefault("A", threading.Event()).wait(5)
    second, second_result = in_thread(cache.get, "A")
    time.sleep(0.05)
    loader.gates["A"].set()
    first.join(5), second.join(5)
    assert not first.is_alive() and not second.is_alive()
    assert str(first_result["error"]) == str(second_result["error"]) == "A is corrupt"
    with pytest.raises(ValueError, match="A is corrupt"):  # remembered: no new load within the ttl
        cache.get("A")
    assert loader.calls == ["A"]
    cache.error_ttl_s = 0
    del loader.failures["A"]
    assert cache.get("A") is not None and loader.calls == ["A", "A"]


def test_waiting_for_a_load_is_bounded():
    loader = FakeLoader()
    loader.gates["A"] = threading.Event()
    cache = LoadingCache(loader, wait_s=0.2, max_parallel_loads=1)
    loading, _ = in_thread(cache.get, "A")
    try:
        assert loader.started.setdefault("A", threading.Event()).wait(5)
        with pytest.raises(ValueError, match=r"This model is still loading \(waited 0 s\)"):
            cache.get("A")
        with pytest.raises(ValueError, match=r"Other models are loading \(waited 0 s\)"):
            cache.get("C")
    finally:
        loader.gates["A"].set()
        loading.join(5)
    assert cache.get("C") is not None and loader.calls == ["A", "C"]  # the refused wait was not remembered as C's


def test_remembered_errors_expire_and_do_not_pile_up():
    loader = FakeLoader()
    cache = LoadingCache(loader, error_ttl_s=0.05)
    for i in range(50):
        loader.failures[f"owner/missing-{i}"] = OSError("no such repo")
        with pytest.raises(OSError):
            cache.get(f"owner/missing-{i}")
        time.sleep(0.002)
    time.sleep(0.06)
    loader.failures["last"] = OSError("no such repo")
    with pytest.raises(OSError):
        cache.get("last")
    assert list(cache._errors) == ["last"]


def test_cache_keeps_at_most_size_models_and_releases_the_oldest():
    loader, released = FakeLoader(), []
    cache = LoadingCache(loader, size=2, release=lambda: released.append(True))
    a = cache.get("A")
    cache.get("B")
    assert cache.get("A") is a  # A is now the most recent
    cache.get("C")
    assert cache.loaded() == ["A", "C"] and "B" not in cache and released == [True]


def test_an_interrupted_load_is_not_cached():
    loader = FakeLoader()
    loader.failures["A"] = KeyboardInterrupt()
    cache = LoadingCache(loader)
    with pytest.raises(KeyboardInterrupt):
        cache.get("A")
    del loader.failures["A"]
    assert cache.get("A") is not None and loader.calls == ["A", "A"]


# ------------------------------------------------------------------------------------------- saving images

SAVER = """
import os, signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # a pytest started in the background hands SIGINT on ignored
from PIL import Image
import numpy as np
from sd_core.pipelines import image_io as images
path, mode = sys.argv[1], sys.argv[2]
image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (1500, 1500, 3), dtype=np.uint8))
if mode == "stall":  # the whole file written, the rename not yet done: the moment a kill used to leave .partial
    real = os.replace
    def stalled(src, dst):
        print("written", flush=True)
        time.sleep(60)
        real(src, dst)
    images.os.replace = stalled
    images.save_image(image, path)
else:
    print("writing", flush=True)
    while True:
        images.save_image(image, path)
"""


@pytest.mark.parametrize("signum", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)],
                         ids=["SIGINT", "SIGTERM"])
def test_a_signal_mid_write_leaves_the_old_file_and_no_partial(tmp_path, signum):
    target = tmp_path / "out.png"
    target.write_bytes(GOOD)
    process = subprocess.Popen([sys.executable, "-c", SAVER, str(target), "stall"], cwd=ROOT, stdout=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True)
    try:
        assert process.stdout.readline().strip() == "written"
        assert any(p.name.endswith(".partial") for p in tmp_path.iterdir())  # the window is real
        process.send_signal(signum)
        process.wait(30)
    finally:
        process.kill()
    assert process.returncode != 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    assert target.read_bytes() == GOOD


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.slow
def test_signals_at_random_moments_of_repeated_saves_leave_no_partial(tmp_path, signum):
    rng = np.random.default_rng(int(signum))
    for attempt in range(3):
        target = tmp_path / f"out{attempt}.png"
        process = subprocess.Popen([sys.executable, "-c", SAVER, str(target), "loop"], cwd=ROOT,
                                   stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True)
        try:
            assert process.stdout.readline().strip() == "writing"
            time.sleep(float(rng.uniform(0.2, 1.5)))
            process.send_signal(signum)
            process.wait(30)
        finally:
            process.kill()
        assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".partial")]
        if target.exists():
            assert Image.open(target).size == (1500, 1500)


def test_an_exception_while_writing_leaves_no_partial(tmp_path, monkeypatch):
    from sd_core.pipelines import image_io as images

    def interrupted(src, dst):
        raise KeyboardInterrupt
    monkeypatch.setattr(images.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_image(Image.new("RGB", (8, 8)), tmp_path / "x.png")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where,message", [
    (lambda tmp: tmp, "is a folder; give a file name such as"),
    (lambda tmp: tmp / "missing" / "x.png", "does not exist; create it or choose another output path"),
    (lambda tmp: Path("/proc/sd_core-test.png"), r"Cannot write /proc/sd_core-test\.png: .*Choose another output path"),
    (lambda tmp: tmp / "x.gif", "use a .png, .jpg or .webp file name"),
])
def test_bad_output_paths_give_clear_errors(tmp_path, where, message):
    with pytest.raises((OSError, ValueError), match=message):
        save_image(Image.new("RGB", (8, 8)), where(tmp_path))
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".partial")]


def test_the_cli_answers_an_unwritable_output_in_one_line(tmp_path, capsys):
    from sd_core.__main__ import main
    assert main(["vae", str(ROOT / "sd_core" / "data" / "example-scene.png"), "-o", "/proc/sd_core-test.png"]) == 2
    assert capsys.readouterr().err.strip() == ("error: Cannot write /proc/sd_core-test.png: No such file or directory. "
                                               "Choose another output path.")


def test_jpg_name_gets_jpeg_bytes(tmp_path):
    save_image(Image.new("RGB", (8, 8)), tmp_path / "pic.jpg")
    assert Image.open(tmp_path / "pic.jpg").format == "JPEG"


# ------------------------------------------------------------------------------------------------ results


def test_upload_limit_for_launch_is_a_byte_count_gradio_accepts():
    from gradio import utils
    assert utils._parse_file_size(serving.MAX_UPLOAD_BYTES) == 20 * 2 ** 20


@pytest.mark.parametrize("form,message", [
    ({"lora_1": "", "lora_1_scale": "nan"}, r"lora_1_scale must be a number from -4 to 4"),
    ({"lora_2": "", "lora_2_scale": "/etc/passwd"}, r"lora_2_scale must be a number from -4 to 4"),
    ({"fast": "yes please"}, r"fast must be true or false"),
])
def test_a_form_value_is_checked_even_where_it_would_be_ignored(form, message):
    """A LoRA scale without a LoRA, or the fast switch, is refused when it is not a value of its kind (the battery
    found them accepted whatever they held)."""
    from sd_core.app.forms import settings_from_form
    with pytest.raises(ValueError, match=message):
        settings_from_form({"prompt": "a cat", "steps": 2, "guidance_scale": 5.0, "seed": 0, **form})
