"""A procedural captioned dataset of simple scenes, and the image analysis that scores generated ones.

A scene is one filled shape (circle, square, triangle) of a named colour and size at a named position
on a plain named background, e.g. "a small red circle on the left on a gray background". Scenes are
drawn from a seed, on the fly, with numpy; DiT's classes are shape x colour ("red circle").
"""
import dataclasses
import itertools
import random
import re

import numpy as np

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (150, 60, 190), "orange": (245, 140, 30)}
BACKGROUNDS = {"gray": (128, 128, 128), "black": (15, 15, 15), "white": (240, 240, 240)}
POSITIONS = {"left": 16, "center": 32, "right": 48}  # x of the shape's centre, in pixels
POSITION_PHRASES = {"left": "on the left", "center": "in the center", "right": "on the right"}
SIZES = {"small": 8, "big": 13}  # half-width in pixels
CLASS_NAMES = [f"{colour} {shape}" for shape in SHAPES for colour in COLOURS]  # DiT classes
EXAMPLE_CAPTION = "a big red circle on the left on a gray background"
# Every word of every caption: what the embedded text-to-image model has seen.
VOCABULARY = frozenset({"a", "on", "the", "in", "background", *SHAPES, *COLOURS, *BACKGROUNDS, *SIZES,
                        *" ".join(POSITION_PHRASES.values()).split()})


def unknown_words(prompt: str) -> list[str]:
    """The words of `prompt` the embedded model never saw in a caption (it draws noise-like shapes for them)."""
    words = re.findall(r"[a-z]+", prompt.lower())
    return sorted({word for word in words if word not in VOCABULARY})


@dataclasses.dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    position: str
    size: str
    background: str

    @property
    def caption(self) -> str:
        return (f"a {self.size} {self.colour} {self.shape} {POSITION_PHRASES[self.position]} "
                f"on a {self.background} background")

    @property
    def class_id(self) -> int:
        return CLASS_NAMES.index(f"{self.colour} {self.shape}")


ALL_SCENES = [Scene(*combo) for combo in itertools.product(SHAPES, COLOURS, POSITIONS, SIZES, BACKGROUNDS)]
# A fixed 10% of attribute combinations never seen in training: the evaluation's prompts.
HELD_OUT = frozenset(random.Random(1234).sample(ALL_SCENES, len(ALL_SCENES) // 10))
TRAIN_SCENES = [s for s in ALL_SCENES if s not in HELD_OUT]


def render(scene: Scene, rng: np.random.Generator | None = None) -> np.ndarray:
    """(64, 64, 3) uint8. With `rng`, the shape's position and size jitter by a few pixels."""
    jitter = (lambda n: int(rng.integers(-n, n + 1))) if rng is not None else (lambda n: 0)
    cx, cy = POSITIONS[scene.position] + jitter(3), IMAGE_SIZE // 2 + jitter(6)
    r = SIZES[scene.size] + jitter(1)
    return paint(shape_mask(scene.shape, cx, cy, r), scene.colour, scene.background)


def shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """(64, 64) bool: the pixels (sampled at their centres) of a shape centred at (cx, cy) of half-width r."""
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= r ** 2
    if shape == "square":
        return (np.abs(x - cx) <= r * 0.9) & (np.abs(y - cy) <= r * 0.9)
    top, bottom = cy - r, cy + r  # upright isosceles triangle in the same box
    half_width = (y - top) / (bottom - top) * r
    return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)


def paint(mask: np.ndarray, colour: str, background: str) -> np.ndarray:
    """(64, 64, 3) uint8: the mask in a named colour on a named background."""
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = BACKGROUNDS[background]
    image[mask] = COLOURS[colour]
    return image


def sample_scenes(seed: int, count: int, scenes=TRAIN_SCENES) -> list[tuple[Scene, np.ndarray]]:
    """`count` random scenes with jitter, fully determined by `seed`."""
    rng = np.random.default_rng(seed)
    chosen = [scenes[i] for i in rng.integers(0, len(scenes), count)]
    return [(scene, render(scene, rng)) for scene in chosen]


# --------------------------------------------------------------- shapes anywhere, and their outlines
# The embedded ControlNet's scenes: the shape at any position and size, so only its drawn outline says where.

SIZE_RANGE = (6.0, 16.0)  # half-widths, in pixels
BIG_FROM = 10.5  # half-width from which a shape is called "big" (the text-to-image model's 8 and 13 either side)


@dataclasses.dataclass(frozen=True)
class Placement:
    """One shape anywhere: a continuous centre (cx, cy) and half-width, in pixels."""
    shape: str
    colour: str
    background: str
    cx: float
    cy: float
    half_width: float

    @property
    def mask(self) -> np.ndarray:
        return shape_mask(self.shape, self.cx, self.cy, self.half_width)

    @property
    def position(self) -> str:
        """The word for where it is, by analyse()'s thresholds."""
        return "left" if self.cx < 24 else "right" if self.cx > 40 else "center"

    def caption(self, size: bool, position: bool, background: bool) -> str:
        """"a blue circle", with any of its size, position and background: a user's prompt need not say where."""
        words = ["a", ("big" if self.half_width >= BIG_FROM else "small") if size else "", self.colour, self.shape,
                 POSITION_PHRASES[self.position] if position else "",
                 f"on a {self.background} background" if background else ""]
        return " ".join(word for word in words if word)


def random_placement(rng: np.random.Generator) -> Placement:
    """Any shape, colour and background; the half-width uniform in SIZE_RANGE, the centre uniform where the
    shape fits inside the image with a pixel to spare."""
    r = float(rng.uniform(*SIZE_RANGE))
    cx, cy = rng.uniform(r + 1, IMAGE_SIZE - r - 1, size=2)
    return Placement(SHAPES[rng.integers(len(SHAPES))], list(COLOURS)[rng.integers(len(COLOURS))],
                     list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))], float(cx), float(cy), r)


def touches(mask: np.ndarray) -> np.ndarray:
    """The pixels with at least one of their four neighbours in `mask`."""
    padded = np.pad(mask, 1)
    return padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]


def outline(mask: np.ndarray, width: int = 1) -> np.ndarray:
    """(64, 64, 3) uint8: the mask's edge as a white line on black, as drawn in a sketch pad. Width 1: the
    mask's own boundary pixels; width 2: those and the ring just outside them."""
    line = mask & touches(~mask)
    if width == 2:
        line |= ~mask & touches(mask)
    image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[line] = 255
    return image


def filled(outline_image: np.ndarray) -> np.ndarray:
    """(64, 64) bool: an outline and everything it encloses (what is not reachable from the border off the line)."""
    line = np.asarray(outline_image).max(axis=-1) > 127
    outside = np.zeros_like(line)
    outside[[0, -1], :], outside[:, [0, -1]] = ~line[[0, -1], :], ~line[:, [0, -1]]
    while True:  # grow the outside through the 4-neighbours that are not line
        grown = outside | (~line & touches(outside))
        if (grown == outside).all():
            return ~outside
        outside = grown


def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks (0 when both are empty)."""
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 0.0


# ------------------------------------------------------------------------------------------- scoring


@dataclasses.dataclass
class Score:
    colour: bool
    position: bool
    shape: bool
    size: bool
    clean_background: bool
    found: dict  # what the analysis saw

    @property
    def all(self) -> bool:
        return self.colour and self.position and self.shape and self.clean_background


def nearest(value, table: dict) -> str:
    return min(table, key=lambda name: float(np.sum((np.asarray(table[name], float) - value) ** 2)))


def analyse(image: np.ndarray) -> dict:
    """Background from the border, the shape as the pixels far from it, then its colour, centroid,
    area and how much of its bounding box it fills (square ~1, circle ~0.79, triangle ~0.5)."""
    image = np.asarray(image, dtype=float)
    border = np.concatenate([image[:3].reshape(-1, 3), image[-3:].reshape(-1, 3),
                             image[:, :3].reshape(-1, 3), image[:, -3:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    distance = np.sqrt(((image - background) ** 2).sum(-1))
    mask = distance > 60
    found = {"background": nearest(background, BACKGROUNDS), "area": int(mask.sum())}
    # A clean background: the non-shape pixels sit close to one flat colour.
    found["background_noise"] = float(np.median(distance[~mask])) if (~mask).any() else 255.0
    if mask.sum() < 12:
        return found
    ys, xs = np.nonzero(mask)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    found.update(colour=nearest(np.median(image[mask], axis=0), COLOURS), x=float(xs.mean()),
                 fill=float(mask.sum() / (height * width)), width=int(width))
    found["position"] = "left" if found["x"] < 24 else "right" if found["x"] > 40 else "center"
    found["shape"] = "square" if found["fill"] > 0.9 else "circle" if found["fill"] > 0.65 else "triangle"
    found["size"] = "big" if width > 21 else "small"
    return found


def score(image: np.ndarray, scene: Scene) -> Score:
    found = analyse(image)
    clean = found["background"] == scene.background and found["background_noise"] < 12 and "colour" in found
    return Score(found.get("colour") == scene.colour, found.get("position") == scene.position,
                 found.get("shape") == scene.shape, found.get("size") == scene.size, clean, found)
