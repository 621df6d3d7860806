"""Control images for a ControlNet: the preprocessors that need no model, and the tensor a denoising loop feeds it.

    edges = preprocess_control_image(photo, "canny")                  # white edges on black, to preview
    hint = control_image_to_tensor(edges, width=768, height=512)      # (1, 3, 512, 768) in [0, 1]
    hint = control_batch(hint, batch_size=2, images_per_prompt=2, guided=True, guess_mode=False)

`control_image_to_tensor` and `control_batch` are diffusers' StableDiffusionControlNetPipeline.prepare_image:
the image stretched to the output size (rounded down to a multiple of 8) with Lanczos, scaled to [0, 1] (not
[-1, 1]: the hint encoder was trained on it), repeated per image, doubled for [uncond, cond] guidance.
"""
import math
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from sd_core.pipelines.image_io import open_image, to_rgb, upright_8bit

# -------------------------------------------------------------------------------------------- preprocessors

SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """(1, 1, H, W) blurred by a separable Gaussian of `sigma` pixels (3 sigma each side), edges replicated."""
    radius = max(1, math.ceil(3 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype)
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = kernel / kernel.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))


def non_maximum_suppression(magnitude: torch.Tensor, gx: torch.Tensor, gy: torch.Tensor) -> torch.Tensor:
    """Keep a pixel only where its gradient magnitude peaks across the edge: compared with its two neighbours
    along the gradient direction, quantised to 0, 45, 90 or 135 degrees (y grows downwards). Strictly above the
    one behind, at least the one ahead, so a two-pixel plateau keeps one pixel."""
    angle = torch.rad2deg(torch.atan2(gy, gx)) % 180
    direction = (((angle + 22.5) // 45) % 4).long()  # 0: left/right, 1: 45, 2: up/down, 3: 135
    padded = F.pad(magnitude, (1, 1, 1, 1))
    height, width = magnitude.shape

    def shifted(dy: int, dx: int) -> torch.Tensor:  # the neighbour at (y + dy, x + dx), zero outside
        return padded[1 + dy:1 + dy + height, 1 + dx:1 + dx + width]

    steps = [(0, 1), (1, 1), (1, 0), (1, -1)]  # the gradient's step (dy, dx) for each direction
    ahead = torch.stack([shifted(dy, dx) for dy, dx in steps]).gather(0, direction[None])[0]
    behind = torch.stack([shifted(-dy, -dx) for dy, dx in steps]).gather(0, direction[None])[0]
    return torch.where((magnitude > behind) & (magnitude >= ahead), magnitude, torch.zeros_like(magnitude))


def hysteresis(strong: torch.Tensor, candidate: torch.Tensor) -> torch.Tensor:
    """The candidate pixels whose 8-connected component holds a strong one: a weak edge survives only when it
    touches a strong edge. Components are found on the candidates alone (a few percent of the image): each takes
    the smallest label among its neighbours, then follows its label's label (pointer jumping), until stable."""
    ys, xs = torch.nonzero(candidate, as_tuple=True)
    count = ys.numel()
    index = torch.full((candidate.shape[0] + 2, candidate.shape[1] + 2), -1, dtype=torch.long)  # -1: not one
    index[ys + 1, xs + 1] = torch.arange(count)
    links = []
    for dy, dx in ((0, 1), (1, -1), (1, 0), (1, 1)):  # every neighbouring pair once
        neighbour = index[ys + 1 + dy, xs + 1 + dx]
        linked = neighbour >= 0
        links.append(torch.stack([torch.arange(count)[linked], neighbour[linked]]))
    a, b = torch.cat(links, dim=1)
    label = torch.arange(count)
    while True:
        smallest = torch.minimum(label[a], label[b])
        new = label.scatter_reduce(0, a, smallest, "amin").scatter_reduce(0, b, smallest, "amin")
        new = new[new]
        if torch.equal(new, label):
            break
        label = new
    has_strong = torch.zeros(count, dtype=torch.bool)
    has_strong[label[strong[ys, xs]]] = True
    edges = torch.zeros_like(candidate)
    keep = has_strong[label]
    edges[ys[keep], xs[keep]] = True
    return edges


def canny_edges(grey: torch.Tensor, low: float = 100.0, high: float = 200.0, sigma: float = 0.0) -> torch.Tensor:
    """Canny (1986) on an (H, W) grey image in 0..255: optional Gaussian blur, 3x3 Sobel gradients (edges
    replicated), L1 magnitude |gx| + |gy|, non-maximum suppression, the double threshold (> high: an edge; > low:
    an edge if connected) and hysteresis. Thresholds in OpenCV's units: cv2.Canny(image, 100, 200), what
    lllyasviel's annotator and A1111 run, has no blur (sigma 0); a sigma of 1 to 2 quietens noisy photos."""
    if low > high:
        raise ValueError(f"Canny's low threshold ({low}) must not exceed its high one ({high}).")
    x = grey.float()[None, None]
    if sigma > 0:
        x = gaussian_blur(x, sigma)
    x = F.pad(x, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(x, SOBEL_X.view(1, 1, 3, 3))[0, 0]
    gy = F.conv2d(x, SOBEL_X.T.contiguous().view(1, 1, 3, 3))[0, 0]
    thin = non_maximum_suppression(gx.abs() + gy.abs(), gx, gy)
    return hysteresis(thin > high, thin > low)


def canny(image: Image.Image, low: float = 100.0, high: float = 200.0, sigma: float = 0.0) -> Image.Image:
    """White one-pixel edges on black, as an RGB image (the canny ControlNets' input), from the image's luma."""
    grey = torch.from_numpy(np.asarray(to_rgb(image).convert("L"), dtype=np.float32))
    edges = canny_edges(grey, low, high, sigma).numpy().astype(np.uint8) * 255
    return Image.fromarray(edges, mode="L").convert("RGB")


def invert(image: Image.Image) -> Image.Image:
    """Negative: line art and scribbles drawn dark on light become the light-on-dark lines ControlNets expect."""
    return ImageOps.invert(to_rgb(image))


def no_preprocessing(image: Image.Image) -> Image.Image:
    """The image is the control (a depth map, pose skeleton, segmentation or edge map made elsewhere)."""
    return to_rgb(image)


PREPROCESSORS = {"none": no_preprocessing, "canny": canny, "invert": invert}


def preprocess_control_image(image, preprocessor: str = "none", **options) -> Image.Image:
    """The control image a preprocessor makes from an image (a path, file or PIL image), to show and to use."""
    if preprocessor not in PREPROCESSORS:
        raise ValueError(f"Unknown preprocessor {preprocessor!r}; choose one of {', '.join(PREPROCESSORS)}.")
    return PREPROCESSORS[preprocessor](open_image(image), **options)


# ---------------------------------------------------------------------------------------- to the ControlNet

def aspect_note(image_size: tuple[int, int], output_size: tuple[int, int]) -> str | None:
    """What happens to a control image whose shape differs from the output's (None when it does not, within 1%)."""
    (width, height), (out_width, out_height) = image_size, output_size
    if abs(math.log((width / height) / (out_width / out_height))) <= 0.01:
        return None
    return (f"The control image is {width}x{height} but the output is {out_width}x{out_height}: it is stretched to "
            f"fit (as diffusers does), so its shapes are distorted. Crop it to the output's aspect ratio to avoid that.")


def resize_like_diffusers(image: Image.Image, width: int, height: int) -> Image.Image:
    """Lanczos to (width, height) in the image's own mode, as diffusers does (so PIL resamples a palette or 1-bit
    image by nearest neighbour: segmentation colours stay pure), then RGB. EXIF orientation, 16-bit grey and
    transparency are converted first as sd_core's image reader does: diffusers would drop the alpha and show
    whatever colour the transparent pixels hide; here they are white."""
    image = upright_8bit(image)
    if image.has_transparency_data:
        image = to_rgb(image)
    return to_rgb(image.resize((width, height), Image.Resampling.LANCZOS))


def control_image_to_tensor(images, width: int, height: int, multiple: int = 8) -> torch.Tensor:
    """One control image or a list (paths, files or PIL images) -> (N, 3, H, W) float32 in [0, 1] at the output
    size rounded down to `multiple` (the VAE's downscale). Warns once per image of another aspect ratio."""
    images = images if isinstance(images, (list, tuple)) else [images]
    width, height = width - width % multiple, height - height % multiple
    if width <= 0 or height <= 0:
        raise ValueError(f"The output size must be at least {multiple}x{multiple} pixels.")
    arrays = []
    for image in images:
        image = open_image(image, convert=upright_8bit)
        note = aspect_note(image.size, (width, height))
        if note:
            warnings.warn(note, stacklevel=2)
        arrays.append(np.asarray(resize_like_diffusers(image, width, height), dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def control_batch(control: torch.Tensor, batch_size: int, images_per_prompt: int = 1, guided: bool = True,
                  guess_mode: bool = False, device=None, dtype=None) -> torch.Tensor:
    """The control tensor for a batch of `batch_size` prompts x `images_per_prompt`, as diffusers builds it: one
    image is repeated for every sample; one image per prompt is repeated per image of that prompt. With
    classifier-free guidance the batch is doubled for [uncond, cond], except in guess mode, where the
    ControlNet sees the conditional half only (the loop gives the unconditional half zero residuals)."""
    if control.shape[0] not in (1, batch_size):
        raise ValueError(f"Got {control.shape[0]} control images for {batch_size} prompts; pass one image, or one "
                         f"per prompt.")
    repeats = batch_size * images_per_prompt if control.shape[0] == 1 else images_per_prompt
    control = control.repeat_interleave(repeats, dim=0).to(device=device, dtype=dtype)
    return torch.cat([control] * 2) if guided and not guess_mode else control
