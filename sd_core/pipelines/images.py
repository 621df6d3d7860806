"""Images in and out: reading (EXIF, transparency, cropping), tensors <-> 8-bit pictures, PNGs with metadata."""
import io
import json
import math
import os
import re
import signal
import struct
import tempfile
import threading
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [-1, 1] -> 8-bit PIL images, rounding as diffusers does."""
    array = (images / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return [Image.fromarray(image) for image in (array * 255).round().astype("uint8")]


def tag(images: list, parameters: dict, seeds: list[int] | None = None) -> list:
    """Attach each image's parameters: its own seed (`seeds`: one per image, or one for the whole batch) and its
    index in the batch, as sd_core's JSON (info["sd_core"]) and as A1111's infotext (info["parameters"])."""
    seeds = seeds or [parameters["seed"]]
    for index, image in enumerate(images):
        own = {**parameters, "seed": seeds[index] if len(seeds) > 1 else seeds[0], "batch_index": index}
        own.setdefault("height", image.height)
        own.setdefault("width", image.width)
        image.info["sd_core"] = json.dumps(own)
        image.info["parameters"] = a1111_parameters(own)
    return images


# ------------------------------------------------------------------------- A1111's "parameters" (PNG Info)
# stable-diffusion-webui writes one text chunk, "parameters": the prompt, a "Negative prompt: ..." line when
# there is one, then one line of "Key: value" pairs joined by ", ", a value quoted as JSON when it holds a
# comma, colon or newline (modules/infotext_utils.py `create_infotext`, `quote`, `parse_generation_parameters`).

A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's re_param


def quote(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",\n:") else text


def format_number(value) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def a1111_parameters(parameters: dict) -> str:
    """The infotext A1111 writes for one image of `parameters` (generate()'s or dit_sample()'s, with the image's
    `batch_index`). Clip skip is A1111's count (1: the last layer), diffusers' clip_skip + 1. Keys A1111 lacks
    are sd_core's own ("Prompt syntax" when the prompt is plain text, "Guidance rescale", "Class")."""
    from sd_core.schedulers import DISPLAY_NAMES
    index = parameters.get("batch_index", 0)
    per_prompt = parameters.get("images_per_prompt") or 1
    if "class_labels" in parameters:  # DiT: the class name is the prompt
        prompt, negative = parameters["class_names"][index], None
    else:
        prompts, negatives = parameters["prompt"], parameters.get("negative_prompt")
        prompt = prompts[index // per_prompt] if isinstance(prompts, list) else prompts
        negative = negatives[index // per_prompt] if isinstance(negatives, list) else negatives
    fields = {"Steps": parameters["steps"],
              "Sampler": DISPLAY_NAMES.get(parameters["scheduler"], parameters["scheduler"]),
              "CFG scale": format_number(parameters["guidance_scale"]), "Seed": parameters["seed"]}
    if "height" in parameters:
        fields["Size"] = f"{parameters['width']}x{parameters['height']}"
    fields["Model"] = parameters.get("model")
    if parameters.get("strength") is not None:
        fields["Denoising strength"] = format_number(parameters["strength"])
    if parameters.get("clip_skip"):
        fields["Clip skip"] = parameters["clip_skip"] + 1
    if parameters.get("guidance_rescale"):
        fields["Guidance rescale"] = format_number(parameters["guidance_rescale"])
    if "class_labels" in parameters:
        fields["Class"] = parameters["class_labels"][index]
        fields["Guided channels"] = parameters.get("guided_channels", "all")
    elif parameters.get("prompt_syntax", "plain") != "a1111":
        fields["Prompt syntax"] = parameters.get("prompt_syntax", "plain")
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in fields.items() if value is not None))
    return "\n".join(lines)


def parse_a1111_parameters(text: str) -> dict:
    """A1111's infotext -> {"Prompt": ..., "Negative prompt": ..., key: value, ...} as its parser reads it: the
    last line holds the parameters when it has at least 3 "Key: value" pairs."""
    *lines, last = text.strip().split("\n")
    if len(A1111_PARAM.findall(last)) < 3:
        lines, last = lines + [last], ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    fields = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in A1111_PARAM.findall(last):
        fields[key] = json.loads(value) if len(value) > 1 and value[0] == value[-1] == '"' else value
    return fields


def settings_from_a1111(fields: dict) -> dict:
    """generate() settings from A1111's infotext fields. Its prompts are in A1111's syntax unless the text says
    otherwise (sd_core's "Prompt syntax: plain"); its Clip skip counts from 1."""
    from sd_core.schedulers import DISPLAY_NAMES
    names = {display: name for name, display in DISPLAY_NAMES.items()}
    sampler = fields.get("Sampler", "")
    sampler += {"Karras": " Karras"}.get(fields.get("Schedule type", ""), "")
    if sampler not in names:
        raise ValueError(f"The image was made with the sampler {sampler!r}, which sd_core lacks; it has "
                         f"{sorted(names)}.")
    settings = {"prompt": fields["Prompt"], "negative_prompt": fields["Negative prompt"] or None,
                "steps": int(fields["Steps"]), "scheduler": names[sampler],
                "guidance_scale": float(fields["CFG scale"]), "seed": int(fields["Seed"]),
                "prompt_syntax": fields.get("Prompt syntax", "a1111"),
                "clip_skip": int(fields.get("Clip skip", 1)) - 1}
    if "Size" in fields:
        settings["width"], settings["height"] = (int(n) for n in fields["Size"].split("x"))
    if "Denoising strength" in fields:
        settings["strength"] = float(fields["Denoising strength"])
    if "Guidance rescale" in fields:
        settings["guidance_rescale"] = float(fields["Guidance rescale"])
    if "Model" in fields:
        settings["model"] = fields["Model"]
    return settings


GENERATE_KEYS = ("steps", "scheduler", "guidance_scale", "guidance_rescale", "height", "width", "clip_skip",
                 "prompt_syntax")


def settings_from_sd_core(p: dict) -> dict:
    """generate() (or dit_sample()) settings of one image from sd_core's JSON. An image of a seed-per-image batch
    is its own run (its prompt and seed); one of a diffusers-rule batch needs the whole batch again."""
    index = p.get("batch_index", 0)
    if "class_labels" in p:
        single = p.get("seed_per_image") or len(p["class_labels"]) == 1
        settings = {"class_labels": [p["class_labels"][index]] if single else p["class_labels"]}
        settings.update({k: p[k] for k in ("steps", "scheduler", "guidance_scale", "guided_channels") if k in p})
    else:
        per_prompt = p.get("images_per_prompt") or 1
        single = p.get("seed_per_image") or len(p["prompt"]) * per_prompt == 1
        negatives = p.get("negative_prompt")
        if single:
            settings = {"prompt": p["prompt"][index // per_prompt],
                        "negative_prompt": negatives[index // per_prompt] if negatives else None}
        else:
            settings = {"prompt": p["prompt"], "negative_prompt": negatives, "images_per_prompt": per_prompt,
                        "batch_index": index}
        settings.update({k: p[k] for k in GENERATE_KEYS if k in p})
        if p.get("strength") is not None:
            settings["strength"] = p["strength"]
    settings["seed"] = p["seed"]
    if not single:
        settings["seed_per_image"] = False
    settings["model"] = p.get("model")
    return settings


def read_png_parameters(image) -> dict:
    """The settings that made an image, from its PNG text: sd_core's JSON ("sd_core"), else A1111's infotext
    ("parameters"). Returns generate()'s keyword arguments (dit_sample()'s for a DiT image) and "model", the
    name of the model that made it (pop it before calling)."""
    if not isinstance(image, Image.Image):
        image = Image.open(image)
    text = getattr(image, "text", None) or image.info
    if "sd_core" in text:
        return settings_from_sd_core(json.loads(text["sd_core"]))
    if "parameters" in text:
        return settings_from_a1111(parse_a1111_parameters(text["parameters"]))
    raise ValueError("This image carries no generation parameters (neither sd_core's nor A1111's PNG text).")


FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def save_image(image: Image.Image, path) -> Path:
    """Write an image in the format its suffix names (.png, .jpg/.jpeg, .webp); atomic, never half-written.
    Only a PNG keeps the generation parameters (text chunks "sd_core" and A1111's "parameters").

    The image is encoded in memory, written to a unique hidden temporary file beside `path`, then renamed over
    it. Ctrl-C, SIGTERM (in the main thread) or any error on the way removes the temporary file: `path` is
    either the old file or the whole new one, and no `.NAME.*.partial` is left behind."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name such as {path / 'image.png'}.")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"The folder {path.parent} does not exist; create it or choose another output path.")
    image_format = FORMATS.get(path.suffix.lower())
    if image_format is None:
        raise ValueError(f"Cannot write {path.name}: use a .png, .jpg or .webp file name.")
    options = {"quality": 95} if image_format in ("JPEG", "WEBP") else {}
    if image_format == "PNG":
        info = PngImagePlugin.PngInfo()
        for key in ("parameters", "sd_core"):
            if key in image.info:
                info.add_text(key, image.info[key])
        options["pnginfo"] = info
    encoded = io.BytesIO()
    image.save(encoded, format=image_format, **options)
    with _sigterm_as_exit():
        _write_atomically(encoded.getbuffer(), path)
    return path


class CannotWrite(OSError, ValueError):
    """The output path cannot be written (no permission, no space, not a folder...): an OSError, and a ValueError
    so that the CLI and the app show its one line like any other bad input."""


def _write_atomically(data, path: Path):
    temporary = None
    try:
        descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
        with os.fdopen(descriptor, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
        temporary = None
    except OSError as error:
        raise CannotWrite(f"Cannot write {path}: {error.strerror or error}. Choose another output path.") from None
    finally:  # also on KeyboardInterrupt / SystemExit
        if temporary is not None:
            try:
                os.unlink(temporary)
            except OSError:
                pass


class _sigterm_as_exit:
    """In the main thread, SIGTERM raises SystemExit(143) while a file is being written, so `finally` blocks run
    (Python's default is to die at once). Elsewhere (a server's worker thread) signals cannot be caught: a no-op."""

    def __enter__(self):
        self.previous = None
        if threading.current_thread() is threading.main_thread():
            try:
                if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
                    self.previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
            except (ValueError, OSError):  # not the main interpreter
                self.previous = None

    def __exit__(self, *_):
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


# ------------------------------------------------------------------------------------------- reading images
# One reader for the CLI, the pipelines and the app's uploads: the size in the header is checked before a pixel
# is decoded (a decompression bomb is refused while it is still a few KB), the file's bytes are bounded, and
# every failure is a ValueError in sd_core's words (never PIL's repr with a memory address).

MAX_IMAGE_PIXELS = 8192 * 8192  # what load_image() accepts by default (the CLI; the app passes its own bound)
MAX_IMAGE_BYTES = 256 * 2 ** 20
READABLE_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
SIGNATURES = {b"\x89PNG": "PNG", b"\xff\xd8\xff": "JPEG", b"RIFF": "WebP", b"GIF8": "GIF", b"BM": "BMP",
              b"II*\x00": "TIFF", b"MM\x00*": "TIFF"}
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, IndexError, TypeError,
                 KeyError, MemoryError, Image.DecompressionBombError)


def describe_size(count: float, unit: str) -> str:
    return f"{count / 1e6:.1f} M{unit}" if count >= 1e6 else f"{count / 1e3:.0f} K{unit}" if count >= 1e3 else f"{count:.0f} {unit}"


def check_pixels(width: int, height: int, max_pixels: int, name: str = "The image"):
    if width * height > max_pixels:
        raise ValueError(f"{name} is {width}x{height} ({describe_size(width * height, 'pixels')}); the limit is "
                         f"{describe_size(max_pixels, 'pixels')} (e.g. {side_of(max_pixels)}x{side_of(max_pixels)}). "
                         f"Use a smaller image.")


def side_of(pixels: int) -> int:
    return math.isqrt(int(pixels))


def _clean(error: BaseException) -> str:
    """An exception's text without object reprs (`<PIL.PngImagePlugin.PngImageFile ... at 0x7F...>`) or paths."""
    text = str(error) or type(error).__name__
    text = re.sub(r"<[^<>]*\bat 0x[0-9A-Fa-f]+>", "the image", text)
    text = re.sub(r"'?(/[^\s/']+)+/?'?", "the file", text)  # absolute paths
    return text.strip().splitlines()[0][:200]


def open_image(source, max_pixels: int = MAX_IMAGE_PIXELS, max_bytes: int = MAX_IMAGE_BYTES,
               name: str | None = None, convert=None) -> Image.Image:
    """A decoded image from a path, a binary file object or a PIL image, within `max_pixels` and `max_bytes`.

    The header is read first (PIL opens lazily) and its size checked before decoding; truncated, corrupt,
    empty and non-image files are refused with a message naming the file by `name` (default: its base name,
    never the server's folder). Then `convert`: to_rgb() by default (EXIF orientation, 16-bit grey scaled to
    8 bits, transparency composited on white), to_grey() for a mask."""
    convert = convert or to_rgb
    if isinstance(source, Image.Image):
        check_pixels(source.width, source.height, max_pixels)
        return convert(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        name = name or path.name
        if not path.exists():
            raise ValueError(f"No such image file: {name}.")
        if not path.is_file():
            raise ValueError(f"{name} is not an image file (it is a folder or a device).")
        size = path.stat().st_size
        opener = lambda: open(path, "rb")
    elif hasattr(source, "read"):
        name = name or Path(getattr(source, "name", "") or "the upload").name
        data = source.read(max_bytes + 1)
        size = len(data)
        opener = lambda: io.BytesIO(data)
    else:
        raise ValueError(f"An image must be a file path, a file or a PIL image; got {type(source).__name__}.")
    if size == 0:
        raise ValueError(f"{name} is empty (0 bytes). Upload a PNG, JPEG or WebP image.")
    if size > max_bytes:
        raise ValueError(f"{name} is {describe_size(size, 'B')}; the limit is {describe_size(max_bytes, 'B')}. "
                         f"Use a smaller file.")
    with opener() as file, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_pixels() below says it better
        try:
            image = Image.open(file, formats=READABLE_FORMATS)
        except Image.UnidentifiedImageError:
            file.seek(0)
            start = file.read(16)
            kind = next((kind for signature, kind in SIGNATURES.items() if start.startswith(signature)), None)
            if kind:
                raise ValueError(f"{name} looks like a {kind} file but is corrupt or truncated; save it again as PNG "
                                 f"or JPEG.") from None
            raise ValueError(f"Cannot read {name} as an image: it is not a PNG, JPEG, WebP, BMP, GIF or TIFF file.") \
                from None
        except Image.DecompressionBombError as error:  # PIL's own bound, 2 x Image.MAX_IMAGE_PIXELS, in the header
            claimed = re.search(r"\((\d+) pixels\)", str(error))
            claimed = describe_size(int(claimed[1]), "pixels") if claimed else "too many pixels"
            raise ValueError(f"{name} claims {claimed}: refused before decoding; the limit is "
                             f"{describe_size(max_pixels, 'pixels')}. Use a smaller image.") from None
        except DECODE_ERRORS as error:
            raise ValueError(f"{name} is truncated or corrupt (in its header: {_clean(error)}); save it again as "
                             f"PNG or JPEG.") from None
        with image:
            check_pixels(image.width, image.height, max_pixels, name)
            try:
                image.load()
                return convert(image)
            except DECODE_ERRORS as error:
                raise ValueError(f"{name} is truncated or corrupt ({_clean(error)}); the image could not be "
                                 f"decoded. Save it again as PNG or JPEG.") from None


def load_image(image, max_pixels: int = MAX_IMAGE_PIXELS, max_bytes: int = MAX_IMAGE_BYTES) -> Image.Image:
    """An RGB PIL image from a path, file or PIL image: EXIF orientation applied, alpha composited on white,
    palette, grayscale and 16-bit converted; sizes bounded (see open_image)."""
    return open_image(image, max_pixels=max_pixels, max_bytes=max_bytes)


def upright_8bit(image: Image.Image) -> Image.Image:
    """EXIF orientation applied, 16/32-bit grey scaled (not clipped) to 8 bits; other modes kept."""
    try:
        image = ImageOps.exif_transpose(image)
    except DECODE_ERRORS:  # a malformed EXIF block: keep the pixels as stored
        pass
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = grey_to_8bit(image)
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, upright (upright_8bit), any transparency (alpha, a palette's or a grey/RGB tRNS colour)
    composited on white."""
    image = upright_8bit(image)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


def to_grey(image: Image.Image) -> Image.Image:
    """8-bit grey ("L"), upright (upright_8bit), any transparency ignored: a mask as diffusers reads it."""
    return upright_8bit(image).convert("L")


def grey_to_8bit(image: Image.Image) -> Image.Image:
    """16-bit grey (I;16*, or I as PIL reads 16-bit PNG/TIFF) -> L by value / 257 (65535 -> 255); float (F): 0..1
    scaled by 255 when its values lie there, else clipped to 0..255."""
    array = np.asarray(image)
    if image.mode == "F":
        array = np.nan_to_num(array.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        scale = 255.0 if array.size and array.max() <= 1.0 else 1.0
        array = array * scale
    elif image.mode.startswith("I;16") or (array.size and array.max() > 255):
        array = array.astype(np.float64) / 257.0
    return Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8), mode="L")


def crop_to_multiple(image: Image.Image, multiple: int) -> Image.Image:
    """Centre-crop to the largest size that is a multiple of `multiple` (no resampling: pixels stay 1:1)."""
    width, height = (image.width // multiple) * multiple, (image.height // multiple) * multiple
    if width == 0 or height == 0:
        raise ValueError(f"The image ({image.width}x{image.height}) is smaller than {multiple} pixels.")
    left, top = (image.width - width) // 2, (image.height - height) // 2
    return image.crop((left, top, left + width, top + height))


def image_to_tensor(image: Image.Image, dtype, device) -> torch.Tensor:
    array = np.array(image).astype(np.float32) / 255.0
    return (2.0 * torch.from_numpy(array).permute(2, 0, 1)[None] - 1.0).to(device=device, dtype=dtype)


def psnr(a: Image.Image, b: Image.Image) -> float:
    error = np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2)
    return float("inf") if error == 0 else 10 * math.log10(255.0 ** 2 / error)
