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
    y, x = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE] + 0.5
    if scene.shape == "circle":
        mask = (x - cx) ** 2 + (y - cy) ** 2 <= r ** 2
    elif scene.shape == "square":
        mask = (np.abs(x - cx) <= r * 0.9) & (np.abs(y - cy) <= r * 0.9)
    else:  # upright isosceles triangle in the same box
        top, bottom = cy - r, cy + r
        half_width = (y - top) / (bottom - top) * r
        mask = (y >= top) & (y <= bottom) & (np.abs(x - cx) <= half_width)
    image = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    image[:] = BACKGROUNDS[scene.background]
    image[mask] = COLOURS[scene.colour]
    return image


def sample_scenes(seed: int, count: int, scenes=TRAIN_SCENES) -> list[tuple[Scene, np.ndarray]]:
    """`count` random scenes with jitter, fully determined by `seed`."""
    rng = np.random.default_rng(seed)
    chosen = [scenes[i] for i in rng.integers(0, len(scenes), count)]
    return [(scene, render(scene, rng)) for scene in chosen]


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
