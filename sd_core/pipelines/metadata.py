"""Generation settings in PNG text chunks: sd_core's JSON ("sd_core") and AUTOMATIC1111's infotext ("parameters"),
written beside every image made and read back by PNG Info, the CLI and batch files."""
import difflib
import json
import re
import zlib
from pathlib import Path

from PIL import Image

from sd_core.pipelines.settings import DiTSettings, GenerationSettings
from sd_core.schedulers import DISPLAY_NAMES


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

# A1111's re_param, r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)', finds the same pairs as this one, but
# tries a key at every position of a run of key characters, each try scanning to the run's end: quadratic in a long
# last line. A key that fits starts at its run's first word character (a later start in the run ends at the same
# place, and a longer key fits where a shorter one does), so here a key is only tried where a run starts, and the
# possessive quantifiers never rescan: linear.
A1111_PARAM = re.compile(r'(?<![\w \-/])[ \-/]*+(\w[\w \-/]++):\s*+("(?:\\.|[^\\"])++"(?=,|$)|[^,]*+)(?:,|$)')
MAX_PARAMETERS_BYTES = 2 * 2 ** 20  # the longest settings text read (A1111's or sd_core's), stored or inflated


def quote(value) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",\n:") else text


def format_number(value) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# sd-webui-controlnet adds one field per enabled unit, "ControlNet <i>", whose value is the unit's own "Key: value"
# pairs joined by ", " (scripts/infotext.py `serialize_unit`: ControlNetUnit's fields in order, the names
# capitalised). sd_core writes the ones it has; its guess mode is written as the extension's nearest control mode.
CONTROLNET_FIELD = re.compile(r"ControlNet (\d+)$")
A1111_MODULES = {"none": "none", "canny": "canny", "invert": "invert", "invert (from white bg & black line)": "invert"}
GUESS_MODE = "ControlNet is more important"
MODEL_HASH = re.compile(r"\s*\[[0-9a-fA-F]+\]$")  # the extension's " [d14c016b]" after a model's name


def controlnet_model_label(name: str) -> str:
    """A ControlNet's name as the extension writes it: the file's or folder's name without its extension, and
    without the commas and colons its unit format cannot hold."""
    label = re.split(r"[\\/]", name.rstrip("/\\"))[-1]
    label = re.sub(r"\.(safetensors|pth|ckpt|bin|pt)$", "", label)
    return re.sub(r"[,:]", " ", label).strip()


def a1111_controlnet_units(parameters: dict) -> dict:
    """{"ControlNet 0": "Module: canny, Model: ..., Weight: 1.0, ...", ...}: a unit's value as the extension's
    serializer writes it (stretching to the output size is its "Just Resize"; Canny's thresholds are 100, 200)."""
    fields = {}
    for index, (name, preprocessor, scale, start, end) in enumerate(parameters.get("controlnets") or ()):
        unit = {"Module": preprocessor, "Model": controlnet_model_label(name), "Weight": float(scale),
                "Resize Mode": "Just Resize"}
        if preprocessor == "canny":
            unit.update({"Threshold A": 100.0, "Threshold B": 200.0})
        unit.update({"Guidance Start": float(start), "Guidance End": float(end),
                     "Control Mode": GUESS_MODE if parameters.get("guess_mode") else "Balanced"})
        fields[f"ControlNet {index}"] = ", ".join(f"{key}: {value}" for key, value in unit.items())
    return fields


def a1111_parameters(parameters: dict) -> str:
    """The infotext A1111 writes for one image of `parameters` (generate()'s or dit_sample()'s, with the image's
    `batch_index`). Clip skip is A1111's count (1: the last layer), diffusers' clip_skip + 1. Keys A1111 lacks
    are sd_core's own ("Prompt syntax" when the prompt is plain text, "Guidance rescale", "Class")."""
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
    fields.update(a1111_controlnet_units(parameters))
    lines = [prompt]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(", ".join(f"{key}: {quote(value)}" for key, value in fields.items() if value is not None))
    return "\n".join(lines)


def parse_a1111_parameters(text: str) -> dict:
    """A1111's infotext -> {"Prompt": ..., "Negative prompt": ..., key: value, ...} as its parser reads it: the
    last line holds the parameters when it has at least 3 "Key: value" pairs. Linear in the text's length, which
    is bounded by MAX_PARAMETERS_BYTES characters."""
    if len(text) > MAX_PARAMETERS_BYTES:
        raise ValueError(f"These A1111 parameters are {len(text)} characters long; sd_core reads at most "
                         f"{MAX_PARAMETERS_BYTES} (a prompt reaches the model as 75-token chunks anyway).")
    *lines, last = text.strip().split("\n")
    pairs = A1111_PARAM.findall(last)
    if len(pairs) < 3:
        lines, pairs = lines + [last], []
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    fields = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in pairs:
        fields[key] = unquote(value)
    return fields


def unquote(value: str) -> str:
    """A value A1111 quoted as JSON, unquoted; one that only looks quoted stays as written (as A1111's `unquote`)."""
    if len(value) > 1 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except ValueError:
            pass
    return value


def controlnets_from_a1111(fields: dict) -> dict:
    """The record's controlnets and guess_mode from the extension's "ControlNet <i>" fields, in unit order. A
    preprocessor sd_core lacks is refused by name: its map has to be made elsewhere and given with "none"."""
    units, guess_mode = [], False
    for key in sorted((key for key in fields if CONTROLNET_FIELD.match(key)),
                      key=lambda key: int(CONTROLNET_FIELD.match(key).group(1))):
        unit = dict(item.strip().split(": ", 1) for item in fields[key].split(",") if ": " in item)
        if "Module" not in unit or "Model" not in unit:
            raise ValueError(f"{key} is not in the ControlNet extension's \"Module: ..., Model: ...\" format (an "
                             f"older extension wrote it); set that ControlNet by hand.")
        if unit["Module"] not in A1111_MODULES:
            raise ValueError(f"{key} used the preprocessor {unit['Module']!r}, which sd_core lacks (it has none, "
                             f"canny, invert): make the control image with it elsewhere and use preprocessor none.")
        units.append((MODEL_HASH.sub("", unit["Model"]), A1111_MODULES[unit["Module"]], unit.get("Weight", 1.0),
                      unit.get("Guidance Start", 0.0), unit.get("Guidance End", 1.0)))
        guess_mode = guess_mode or unit.get("Control Mode") == GUESS_MODE
    return {"controlnets": units, "guess_mode": guess_mode} if units else {}


def closest_sampler(a1111_name: str) -> str:
    """The sd_core sampler nearest to an A1111 sampler it lacks: an ancestral one ("DPM2 a") is Euler a; one whose
    name without " Karras" sd_core has ("LMS Karras") is that; else the nearest spelling among DISPLAY_NAMES, a
    Karras schedule kept where sd_core has one ("DPM++ SDE Karras": DPM++ 2M SDE Karras)."""
    names = {display: name for name, display in DISPLAY_NAMES.items()}
    words = a1111_name.split()
    if "a" in words[1:]:
        return "euler_ancestral"
    if a1111_name.removesuffix(" Karras") in names:
        return names[a1111_name.removesuffix(" Karras")]
    karras = a1111_name.endswith("Karras")
    pool = [display for display in names if display.endswith("Karras") == karras] or list(names)
    return names[difflib.get_close_matches(a1111_name, pool, n=1, cutoff=0)[0]]


def settings_from_a1111(fields: dict, notes: list | None = None) -> GenerationSettings:
    """The record of A1111's infotext fields. Its prompts are in A1111's syntax unless the text says otherwise
    (sd_core's "Prompt syntax: plain"); its Clip skip counts from 1; its ControlNet units become controlnets (a
    unit in the "ControlNet is more important" control mode: guess_mode). A sampler sd_core lacks becomes the
    closest one it has, said in `notes` (a list the caller reads)."""
    names = {display: name for name, display in DISPLAY_NAMES.items()}
    sampler = fields.get("Sampler", "")
    sampler += {"Karras": " Karras"}.get(fields.get("Schedule type", ""), "")
    if not sampler:
        (notes if notes is not None else []).append("it names no sampler: the model's own is set")
    elif sampler not in names:
        closest = closest_sampler(sampler)
        (notes if notes is not None else []).append(
            f"its sampler {sampler!r} is not one sd_core has: the closest it offers, {DISPLAY_NAMES[closest]!r}, is "
            f"set instead")
        sampler = DISPLAY_NAMES[closest]
    values = {"prompt": fields["Prompt"], "negative_prompt": fields["Negative prompt"] or None,
              "steps": fields["Steps"], "scheduler": names.get(sampler), "guidance_scale": fields["CFG scale"],
              "seed": fields["Seed"], "prompt_syntax": fields.get("Prompt syntax", "a1111"),
              "clip_skip": int(fields.get("Clip skip", 1)) - 1}
    if "Size" in fields:
        values["width"], values["height"] = fields["Size"].split("x")
    for key, field in (("strength", "Denoising strength"), ("guidance_rescale", "Guidance rescale"),
                       ("model", "Model")):
        if field in fields:
            values[key] = fields[field]
    if "Hires upscale" in fields:  # a hires-fix text-to-image run: its denoising strength is the second pass's
        values.pop("strength", None)
    values.update(controlnets_from_a1111(fields))
    return GenerationSettings.from_values(values)


def settings_from_sd_core(p: dict) -> GenerationSettings | DiTSettings:
    """The record of the run that made one image, from sd_core's JSON. An image of a seed-per-image batch is its
    own run (its prompt and seed); one of a diffusers-rule batch needs the whole batch again."""
    index = p.get("batch_index", 0)
    if "class_labels" in p:
        single = p.get("seed_per_image") or len(p["class_labels"]) == 1
        labels = [p["class_labels"][index]] if single else p["class_labels"]
        return DiTSettings.from_values({**p, "class_labels": labels, "seed_per_image": False,
                                        "fast": bool(p.get("fast"))}, ignore_unknown=True)
    per_prompt = p.get("images_per_prompt") or 1
    single = p.get("seed_per_image") or len(p["prompt"]) * per_prompt == 1
    negatives = p.get("negative_prompt")
    if single:
        batch = {"prompt": p["prompt"][index // per_prompt], "images_per_prompt": 1,
                 "negative_prompt": negatives[index // per_prompt] if negatives else None}
    else:
        batch = {"prompt": p["prompt"], "negative_prompt": negatives, "images_per_prompt": per_prompt}
    ran = {**p, **batch, "seed_per_image": False, "fast": bool(p.get("fast"))}  # "fast" holds the path's description
    return GenerationSettings.from_values(ran, ignore_unknown=True)


def read_png_parameters(image, notes: list | None = None) -> dict:
    """The settings that made an image, from its PNG text: sd_core's JSON ("sd_core"), else A1111's infotext
    ("parameters"): a GenerationSettings for generate() (a DiTSettings for generate_dit()); its `model` names
    the model that made it. `image`: a PNG file (path or binary file object), read chunk by chunk without decoding
    its pixels, or a PIL image (its `info`). Damaged settings are a ValueError saying what is wrong; what was read
    in place of something sd_core lacks (an A1111 sampler) is said in `notes`, a list the caller passes."""
    text = image.info if isinstance(image, Image.Image) else read_png_text(image, ("sd_core", "parameters"))
    if "sd_core" in text:
        try:
            parameters = json.loads(text["sd_core"])
        except (ValueError, RecursionError):
            raise ValueError("This image's sd_core settings text is damaged (it is not JSON); use an image sd_core "
                             "wrote, or type the settings in.") from None
        try:
            return settings_from_sd_core(parameters)
        except (KeyError, TypeError, IndexError, AttributeError) as error:
            problem = f"it lacks {error.args[0]!r}" if isinstance(error, KeyError) else "a field has the wrong type"
            raise ValueError(f"This image's sd_core settings text is damaged ({problem}); use an image sd_core "
                             f"wrote, or type the settings in.") from None
    if "parameters" in text:
        fields = parse_a1111_parameters(text["parameters"])
        problem = a1111_field_problem(fields)
        if problem:
            raise ValueError(f"This image's A1111 parameters cannot be used: {problem}.")
        return settings_from_a1111(fields, notes)
    raise ValueError("This image carries no generation parameters (neither sd_core's nor A1111's PNG text).")


def a1111_field_problem(fields: dict) -> str | None:
    """What keeps A1111 fields from being read as settings, in words, or None: a missing field, a Size that is not
    WIDTHxHEIGHT, a Clip skip that is not a whole number (the settings record checks every other value)."""
    missing = [key for key in ("Steps", "CFG scale", "Seed") if key not in fields]
    if missing:
        return f"the text has no {', '.join(missing)} (it is not a complete A1111 infotext)"
    if "Size" in fields and not re.fullmatch(r"\d{1,6}x\d{1,6}", fields["Size"]):
        return f"Size is {fields['Size'][:40]!r}, not WIDTHxHEIGHT"
    if not re.fullmatch(r"\d{1,3}", str(fields.get("Clip skip", 1))):
        return f"Clip skip is {fields['Clip skip'][:40]!r}, not a whole number from 1"
    return None


# -------------------------------------------------------------------------------- PNG text, chunk by chunk

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
MAX_PNG_CHUNKS = 2 ** 16  # walked before the settings are found (a PNG of 8 KB image-data chunks: 512 MB)


def read_png_text(source, keys) -> dict[str, str]:
    """The text chunks (tEXt, zTXt, iTXt) named in `keys` of a PNG file (a path or a binary file object), found by
    walking its chunks: the image data is skipped unread, never decoded. The walk ends at the image data once a
    key was found (where sd_core, A1111 and Pillow write them), else at IEND. Each text is bounded by
    MAX_PARAMETERS_BYTES, stored and inflated; a damaged or oversized chunk is a ValueError naming it."""
    if hasattr(source, "read"):
        return walk_png_text(source, keys, Path(getattr(source, "name", "") or "the image").name)
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"{path.name} is not a file; drop a PNG image.")
    with open(path, "rb") as file:
        return walk_png_text(file, keys, path.name)


def walk_png_text(file, keys, name: str) -> dict[str, str]:
    if file.read(8) != PNG_SIGNATURE:
        raise ValueError(f"{name} is not a PNG image; settings are read from PNG text (drop a .png made by sd_core "
                         f"or A1111).")
    found = {}
    for _ in range(MAX_PNG_CHUNKS):
        head = file.read(8)
        if len(head) < 8:
            return found  # the file ends early: what was read stands
        length, kind = int.from_bytes(head[:4], "big"), head[4:]
        if kind == b"IEND" or (kind == b"IDAT" and found):
            return found
        if kind not in TEXT_CHUNKS:
            if length >= 2 ** 31:
                raise ValueError(f"{name} is a damaged PNG (a chunk claims {length} bytes).")
            file.seek(length + 4, 1)  # its data and CRC, unread
            continue
        if length > MAX_PARAMETERS_BYTES + 1024:  # room for the keyword, flags and language tags
            raise ValueError(f"{name} has a {length}-byte text chunk; sd_core reads PNG text chunks of at most "
                             f"{MAX_PARAMETERS_BYTES} bytes.")
        data, crc = file.read(length), file.read(4)
        if len(data) < length or len(crc) < 4 or zlib.crc32(kind + data) != int.from_bytes(crc, "big"):
            raise ValueError(f"{name} is a damaged PNG: a text chunk is truncated or fails its checksum.")
        key, text = png_text_chunk(kind, data, keys, name)
        if key is not None:
            found.setdefault(key, text)
    raise ValueError(f"{name} has more than {MAX_PNG_CHUNKS} PNG chunks before its settings; sd_core walks at most "
                     f"that many.")


def png_text_chunk(kind: bytes, data: bytes, keys, name: str) -> tuple[str | None, str]:
    """(keyword, text) of one tEXt / zTXt / iTXt chunk's data, or (None, "") when its keyword is not in `keys`
    (then nothing is inflated)."""
    keyword, _, rest = data.partition(b"\0")
    key = keyword.decode("latin-1")
    if key not in keys:
        return None, ""
    if kind == b"tEXt":
        return key, rest.decode("latin-1")
    if kind == b"zTXt":
        return key, inflate(rest[1:], name, key).decode("latin-1")
    compressed = rest[:1] == b"\1"  # then the compression method, the language tag and the translated keyword
    text = rest[2:].partition(b"\0")[2].partition(b"\0")[2]
    try:
        return key, (inflate(text, name, key) if compressed else text).decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError(f"{name}: its {key!r} text is not UTF-8, as PNG's iTXt chunks must be.") from None


def inflate(data: bytes, name: str, key: str) -> bytes:
    """zlib-compressed PNG text, inflated to at most MAX_PARAMETERS_BYTES."""
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(data, MAX_PARAMETERS_BYTES + 1)
    except zlib.error:
        raise ValueError(f"{name}: its {key!r} text chunk is damaged (its compressed text does not inflate).") from None
    if len(text) > MAX_PARAMETERS_BYTES:
        raise ValueError(f"{name}: its {key!r} text inflates beyond {MAX_PARAMETERS_BYTES} bytes; sd_core reads "
                         f"PNG text of at most that size.")
    return text
