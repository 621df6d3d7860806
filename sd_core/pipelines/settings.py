"""One record per picture: the settings that decide an image, validated and bounded in one place.

The form, the API, share links, PNG metadata, PNG Info, the CLI, batch prompt files and generate() all read and
write these records, so a setting is added once (a field and its rule below) and every door gets it:

    settings = GenerationSettings(prompt="a red circle", steps=20, seed=7)
    result = generate(pipe, settings)
    settings.within(Limits(max_steps=100))              # a server's bounds; the message names field and bound
    GenerationSettings.from_values({"steps": "20", "prompt": "x"})   # a link's or a file's values, parsed

A rule turns what a person or a program sent (an int, an integral float, a numeral string; never a bool, NaN or
a seed of 1.5) into the field's value, or raises ValueError naming the field, its range and what was sent.
"""
import dataclasses
import math
import random
from typing import Any, Callable

from sd_core.pipelines.control_images import PREPROCESSORS
from sd_core.schedulers import SCHEDULER_NAMES

MAX_SEED = 2 ** 32 - 1
PROMPT_SYNTAXES = ("plain", "a1111")
GUIDED_CHANNELS = ("all", "first3")


def random_seed() -> int:
    """A seed drawn for a run that asked for none (-1 or empty): any of 0 ... MAX_SEED."""
    return random.randint(0, MAX_SEED)


# ------------------------------------------------------------------------------------ reading one value


def shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def number_sent(value, expected: str) -> int | float:
    """An int, a float or a numeral string; never a bool, None or other text. `expected` opens the message."""
    if value is None:
        raise ValueError(f"{expected}; none was given.")
    number = value
    if isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError:
            try:
                number = float(value.strip())
            except ValueError:
                raise ValueError(f"{expected}; got the text {shown(value)}.") from None
    if isinstance(number, bool) or not isinstance(number, (int, float)):
        raise ValueError(f"{expected}; got {type(value).__name__} {shown(value)}.")
    return number


def whole_number(value, name: str, low: int, high: int) -> int:
    """An int, an integral float (3.0) or a numeral string ("3"); never NaN, inf, 1.5 (refused, not rounded)."""
    expected = f"{name} must be a whole number from {low} to {high}"
    number = number_sent(value, expected)
    if isinstance(number, float):
        if not math.isfinite(number):
            raise ValueError(f"{expected}; got {number} (not a finite number).")
        if not number.is_integer():
            raise ValueError(f"{expected}; got {number}, which is not whole.")
        number = int(number)
    if not low <= number <= high:
        raise ValueError(f"{expected}; got {shown(number)}.")
    return number


def real_number(value, name: str, low: float, high: float) -> float:
    """A finite number within [low, high]."""
    expected = f"{name} must be a number from {low:g} to {high:g}"
    try:
        number = float(number_sent(value, expected))
    except OverflowError:  # an int beyond float's range
        raise ValueError(f"{expected}; got {shown(value)}.") from None
    if not math.isfinite(number):
        raise ValueError(f"{expected}; got {number} (not a finite number).")
    if not low <= number <= high:
        raise ValueError(f"{expected}; got {number:g}.")
    return number


def one_of(value, name: str, choices) -> str:
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(str, choices))}; got {shown(value)}.")
    return value


def text(value, name: str, max_chars: int) -> str:
    """A prompt: a string of at most `max_chars` characters (None -> "")."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text; got {type(value).__name__} {shown(value)}.")
    if "\x00" in value:
        raise ValueError(f"{name} contains a null character; remove it.")
    if len(value) > max_chars:
        raise ValueError(f"{name} is {len(value)} characters long; at most {max_chars} are taken.")
    return value


def unset(value, default):
    """`default` for a value not sent (None, or empty text as forms and links send it); anything else as sent, so
    its rule judges it ([] or {} is not "not sent")."""
    return default if value is None or (isinstance(value, str) and not value.strip()) else value


def flag(value, name: str) -> bool:
    if isinstance(value, bool):
        return value
    if value in (None, "", 0, "0", "false", "False"):
        return False
    if value in (1, "1", "true", "True"):
        return True
    raise ValueError(f"{name} must be true or false; got {shown(value)}.")


def seed(value, name: str = "seed") -> int | None:
    """None, empty or -1: draw one when the run starts; else a whole number from 0 to MAX_SEED."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, bool) and isinstance(value, (int, float, str)):
        try:
            if float(value) == -1:
                return None
        except (ValueError, OverflowError):
            pass
    return whole_number(value, name, 0, MAX_SEED)


def open_fraction(value, name: str) -> float:
    """A share of the noise schedule strictly between 0 and 1 (SDXL's denoising_start / denoising_end)."""
    expected = f"{name} must be a fraction strictly between 0 and 1"
    number = float(number_sent(value, expected))
    if not 0 < number < 1:  # NaN too
        raise ValueError(f"{expected}; got {number:g}.")
    return number


def optional(rule: Callable) -> Callable:
    return lambda value, name, *bounds: None if value in (None, "") else rule(value, name, *bounds)


# ------------------------------------------------------------------------------------------ the bounds


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for: the library's limits are wide, a server passes its own (the app's form)."""
    max_steps: int = 1000
    min_side: int = 8
    max_side: int = 4096
    max_batch: int = 64
    max_prompt_chars: int = 20000
    max_guidance: float = 100.0
    max_loras: int = 8
    max_controlnets: int = 8


LIBRARY = Limits()


def prompts(value, name: str, limits: Limits):
    """One prompt, or a list of them (a batch of different prompts)."""
    if isinstance(value, (list, tuple)):
        if not value or len(value) > limits.max_batch:
            raise ValueError(f"{name} must hold 1 to {limits.max_batch} prompts; got {len(value)}.")
        return [text(v, name, limits.max_prompt_chars) for v in value]
    return text(value, name, limits.max_prompt_chars)


def side(value, name: str, limits: Limits) -> int | None:
    return None if value in (None, "") else whole_number(value, name, limits.min_side, limits.max_side)


def loras(value, name: str, limits: Limits) -> tuple:
    """[(LoRA name, scale), ...]: each scale a number from -4 to 4."""
    pairs = list(value or ())
    if len(pairs) > limits.max_loras:
        raise ValueError(f"{name}: at most {limits.max_loras} LoRAs; got {len(pairs)}.")
    checked = []
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"{name} must be [name, scale] pairs; got {shown(pair)}.")
        checked.append((text(pair[0], f"{name} name", 1000), real_number(pair[1], f"the scale of {pair[0]}", -4, 4)))
    return tuple(checked)


def names(value, name: str, limits: Limits) -> tuple:
    items = [value] if isinstance(value, str) else list(value or ())
    if len(items) > limits.max_loras:
        raise ValueError(f"{name}: at most {limits.max_loras}; got {len(items)}.")
    return tuple(text(item, name, 1000) for item in items)


def controlnet_units(value, name: str, limits: Limits) -> tuple:
    """[(ControlNet name, preprocessor, scale, start, end), ...]: A1111's Weight (0 to 2) and its Starting and
    Ending Control Step (diffusers' control_guidance_start/end), the shares of the steps the ControlNet acts in."""
    units = list(value or ())
    if len(units) > limits.max_controlnets:
        raise ValueError(f"{name}: at most {limits.max_controlnets} ControlNets; got {len(units)}.")
    checked = []
    for unit in units:
        if not isinstance(unit, (list, tuple)) or len(unit) != 5:
            raise ValueError(f"{name} must be [name, preprocessor, scale, start, end] lists; got {shown(unit)}.")
        model = text(unit[0], f"{name} name", 1000)
        start, end = (real_number(share, f"the {which} of {model}", 0, 1) for share, which in
                      ((unit[3], "start"), (unit[4], "end")))
        if start >= end:
            raise ValueError(f"The start of {model} ({start:g}) must be below its end ({end:g}): it acts from "
                             f"that share of the steps to this one.")
        checked.append((model, one_of(unit[1], f"the preprocessor of {model}", PREPROCESSORS),
                        real_number(unit[2], f"the scale of {model}", 0, 2), start, end))
    return tuple(checked)


def class_labels(value, name: str, limits: Limits) -> tuple:
    """DiT classes, one per image: ids (whole numbers) or names (text; the model's labels decide at run time)."""
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    if not 1 <= len(items) <= limits.max_batch:
        raise ValueError(f"{name} must hold 1 to {limits.max_batch} classes; got {len(items)}.")
    return tuple(whole_number(item, name, 0, 10 ** 6) if isinstance(item, (int, float)) and not isinstance(item, bool)
                 else text(item, name, 200) for item in items)


def size_pair(value, name: str, limits: Limits) -> tuple | None:
    if value in (None, ""):
        return None
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ValueError(f"{name} must be (height, width); got {shown(value)}.")
    return tuple(whole_number(v, name, 0, 4 * limits.max_side) for v in value)


# field name -> rule(value, name, limits); what the record holds is what the rule returns
RULES: dict[str, Callable[[Any, str, Limits], Any]] = {
    "model": lambda v, n, lim: None if v in (None, "") else text(v, n, 1000),
    "prompt": prompts,
    "negative_prompt": lambda v, n, lim: None if v is None else prompts(v, n, lim),
    "steps": lambda v, n, lim: whole_number(v, n, 1, lim.max_steps),
    "guidance_scale": lambda v, n, lim: real_number(v, n, 0, lim.max_guidance),
    "guidance_rescale": lambda v, n, lim: real_number(v, n, 0, 1),
    "scheduler": lambda v, n, lim: None if v in (None, "") else one_of(v, n, SCHEDULER_NAMES),
    "seed": lambda v, n, lim: seed(v, n),
    "height": side,
    "width": side,
    "images_per_prompt": lambda v, n, lim: whole_number(v, n, 1, lim.max_batch),
    "seed_per_image": lambda v, n, lim: flag(v, n),
    "strength": lambda v, n, lim: optional(real_number)(v, n, 0, 1),
    "eta": lambda v, n, lim: real_number(v, n, 0, 1),
    "prompt_syntax": lambda v, n, lim: one_of(v, n, PROMPT_SYNTAXES),
    "clip_skip": lambda v, n, lim: whole_number(unset(v, 0), n, 0, 48),
    "loras": loras,
    "embeddings": names,
    "refiner": lambda v, n, lim: None if v in (None, "") else text(v, n, 1000),
    "high_noise_frac": lambda v, n, lim: real_number(v, n, 0.05, 0.95),
    "denoising_start": lambda v, n, lim: optional(open_fraction)(v, n),
    "denoising_end": lambda v, n, lim: optional(open_fraction)(v, n),
    "original_size": size_pair,
    "target_size": size_pair,
    "crops_coords_top_left": lambda v, n, lim: size_pair(v, n, lim) or (0, 0),
    "aesthetic_score": lambda v, n, lim: real_number(v, n, 0, 10),
    "negative_aesthetic_score": lambda v, n, lim: real_number(v, n, 0, 10),
    "fast": lambda v, n, lim: flag(v, n),
    "deepcache": lambda v, n, lim: whole_number(unset(v, 0), n, 0, 10),
    "tome": lambda v, n, lim: real_number(unset(v, 0), n, 0, 0.9),
    "guidance_until": lambda v, n, lim: real_number(unset(v, 1.0), n, 0.05, 1),
    "tgate": lambda v, n, lim: real_number(unset(v, 1.0), n, 0.05, 1),
    "dit_cache": lambda v, n, lim: whole_number(unset(v, 0), n, 0, 10),
    "controlnets": controlnet_units,
    "guess_mode": lambda v, n, lim: flag(v, n),
    "class_labels": lambda v, n, lim: class_labels(v, n, lim),
    "guided_channels": lambda v, n, lim: one_of(v, n, GUIDED_CHANNELS),
}


FAST_FIELDS = ("deepcache", "tome", "guidance_until", "tgate", "dit_cache")  # with `fast`: the fast path's options


class Record:
    """What both records share: every field passes its rule at construction (library limits), again under a
    server's limits with `within`, and from untyped values (links, files, forms) with `from_values`."""

    def __post_init__(self):
        for field in dataclasses.fields(self):
            object.__setattr__(self, field.name, RULES[field.name](getattr(self, field.name), field.name, LIBRARY))

    @classmethod
    def from_values(cls, values: dict, limits: Limits = LIBRARY, ignore_unknown: bool = False):
        """A record from a mapping of field -> value as sent (strings from a link, numbers from JSON, a form's
        values); an unknown key is refused, naming the known ones (or dropped, for metadata of other tools)."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown and not ignore_unknown:
            raise ValueError(f"Unknown setting{'s' * (len(unknown) > 1)} {', '.join(unknown)}; the settings are "
                             f"{', '.join(sorted(known))}.")
        typed = {key: RULES[key](value, key, limits) for key, value in values.items() if key in known}
        return cls(**typed).within(limits)

    def within(self, limits: Limits):
        """This record, if each field passes its rule under `limits`; else ValueError naming field and bound."""
        for field in dataclasses.fields(self):
            RULES[field.name](getattr(self, field.name), field.name, limits)
        return self

    def to_dict(self) -> dict:
        """Field -> value, lists for tuples: what JSON metadata and share links carry."""
        return {key: [list(v) if isinstance(v, tuple) else v for v in value] if isinstance(value, tuple) else value
                for key, value in dataclasses.asdict(self).items()}

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def fast_options(self) -> dict:
        """The fast path's settings this record turns on (those away from their "off" default), field -> value;
        empty when `fast` is off. What the images record, and what sd_core.fast.asked_by() hands to make_fast()."""
        if not self.fast:
            return {}
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                if field.name in FAST_FIELDS and getattr(self, field.name) != field.default}


@dataclasses.dataclass(frozen=True)
class GenerationSettings(Record):
    """A Stable Diffusion picture: text to image, image to image (strength), inpainting, SDXL refining. What is
    not a setting (the input image, its mask, given latents, a progress callback) is passed beside it."""
    prompt: str | list = ""
    negative_prompt: str | list | None = None
    steps: int = 30
    guidance_scale: float = 7.5
    guidance_rescale: float = 0.0
    scheduler: str | None = None  # None: the model's own
    seed: int | None = None  # None: drawn when the run starts (and then recorded)
    height: int | None = None  # None: the model's size
    width: int | None = None
    images_per_prompt: int = 1
    seed_per_image: bool = False  # A1111's rule (image k uses seed + k); False: diffusers' one generator
    strength: float | None = None  # image to image / inpainting: how much to change (None with an image: 0.8)
    eta: float = 0.0  # DDIM's
    prompt_syntax: str = "plain"
    clip_skip: int = 0
    loras: tuple = ()  # ((name, scale), ...): applied by the caller for the run
    embeddings: tuple = ()  # textual-inversion names bound by the caller for the run
    refiner: str | None = None
    high_noise_frac: float = 0.8
    denoising_start: float | None = None
    denoising_end: float | None = None
    original_size: tuple | None = None
    crops_coords_top_left: tuple = (0, 0)
    target_size: tuple | None = None
    aesthetic_score: float = 6.0
    negative_aesthetic_score: float = 2.5
    fast: bool = False
    deepcache: int = 0
    tome: float = 0.0
    guidance_until: float = 1.0  # fast path: the guided share of the noise schedule (1: all of it)
    tgate: float = 1.0  # fast path: T-GATE, the share of the schedule before cross-attention is frozen (1: never)
    controlnets: tuple = ()  # ((name, preprocessor, scale, start, end), ...): the models and images come beside
    guess_mode: bool = False  # the ControlNets see only the prompt's half of the guidance batch
    model: str | None = None


@dataclasses.dataclass(frozen=True)
class DiTSettings(Record):
    """A class-conditional DiT picture (one class label per image)."""
    class_labels: tuple = ("0",)
    steps: int = 25
    guidance_scale: float = 4.0
    scheduler: str | None = None
    seed: int | None = None
    seed_per_image: bool = False
    guided_channels: str = "all"
    fast: bool = False
    dit_cache: int = 0  # fast path: FORA, the transformer's blocks recomputed every N steps (0: every step)
    guidance_until: float = 1.0  # fast path: the guided share of the noise schedule (1: all of it)
    model: str | None = None


def split_settings(record_class, options: dict) -> tuple[dict, dict]:
    """Keyword arguments -> (the record's fields, the rest): for functions that take settings as keywords."""
    fields = {field.name for field in dataclasses.fields(record_class)}
    return ({k: v for k, v in options.items() if k in fields}, {k: v for k, v in options.items() if k not in fields})
