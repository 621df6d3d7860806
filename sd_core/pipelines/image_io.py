"""Image files in and out: bounded reading (EXIF, transparency, bit depth, cropping), atomic writing (PNG text
chunks kept), and tensors <-> 8-bit pictures."""
import io
import math
import os
import re
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin

from sd_core.files import atomic_path


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [-1, 1] -> 8-bit PIL images, rounding as diffusers does."""
    array = (images / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return [Image.fromarray(image) for image in (array * 255).round().astype("uint8")]


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
    with atomic_path(path) as temporary:
        temporary.write_bytes(encoded.getbuffer())
    return path


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
