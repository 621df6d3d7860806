"""Images in and out: reading (EXIF, transparency, cropping), tensors <-> 8-bit pictures, PNGs with metadata."""
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [-1, 1] -> 8-bit PIL images, rounding as diffusers does."""
    array = (images / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy()
    return [Image.fromarray(image) for image in (array * 255).round().astype("uint8")]


def tag(images: list, parameters: dict) -> list:
    for image in images:
        image.info["sd_core"] = json.dumps(parameters)
    return images


def save_image(image: Image.Image, path) -> Path:
    """Write a PNG with its generation parameters as text metadata; atomic, never half-written."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"The folder {path.parent} does not exist; create it or choose another output path.")
    info = PngImagePlugin.PngInfo()
    if "sd_core" in image.info:
        info.add_text("sd_core", image.info["sd_core"])
    temporary = path.with_name(f".{path.name}.partial")
    image.save(temporary, format="PNG", pnginfo=info)
    os.replace(temporary, path)
    return path


def load_image(image) -> Image.Image:
    """An RGB PIL image from a path or PIL image: EXIF orientation applied, alpha composited on white,
    palette and grayscale converted."""
    if not isinstance(image, Image.Image):
        try:
            image = Image.open(image)
            image.load()
        except (OSError, ValueError) as error:
            raise ValueError(f"Cannot read {image!r} as an image ({error}). Use a PNG, JPEG or WebP file.") from None
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return image.convert("RGB")


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
