"""The X/Y/Z plot, with AUTOMATIC1111's semantics (scripts/xyz_grid.py): up to three axes, each a setting and
a list of values; one picture per combination, laid out in a labelled grid (one grid per Z value).

Values are written as A1111 writes them: a comma list (CSV, so "a, b" and quoted strings holding commas), and
for numbers ranges: `1-5` (1, 2, 3, 4, 5), `1-10 (+2)` (1, 3, 5, 7, 9), `10-20 [5]` (five values from 10 to 20,
evenly spaced, whole for whole-number settings), and for real numbers `1-2 (+0.25)` and `1-2 [5]`. Prompt S/R
searches the prompt for the first value and puts each value in its place (refused when the prompt and the
negative prompt both lack it, as A1111 refuses). Each axis changes the settings record through replace(), so
every value passes the record's own rule (and a server's Limits):

    plot = plan(GenerationSettings(prompt="a big red circle ...", steps=10), ("Seed", "1-3"), ("CFG Scale", "1, 4, 7"))
    result = run_plot(plot, sd_runner(pipe))       # result.grids[0]: the labelled grid; result.cells: each picture
"""
import csv
import dataclasses
import io
import json
import math
import re
from typing import Any, Callable

import numpy as np

from sd_core.pipelines.dit_sampling import generate_dit
from sd_core.pipelines.generate import generate
from sd_core.pipelines.lab.drawing import labelled_grid
from sd_core.pipelines.lab.text_encoders import caching, with_encoders
from sd_core.pipelines.lora import loras_applied
from sd_core.pipelines.metadata import a1111_parameters, quote
from sd_core.pipelines.settings import LIBRARY, DiTSettings, Limits, random_seed
from sd_core.schedulers import DISPLAY_NAMES, SCHEDULER_NAMES

MAX_CELLS = 100  # pictures in one plot (all Z grids together), and so values on one axis
NOTHING = "Nothing"
# A1111's re_range / re_range_count and their float forms (whose unescaped "." A1111 lets match any character;
# here it is a decimal point).
INT_RANGE = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\(([+-]\d+)\s*\))?\s*")
INT_RANGE_COUNT = re.compile(r"\s*([+-]?\s*\d+)\s*-\s*([+-]?\s*\d+)(?:\s*\[(\d+)\s*])?\s*")
REAL = r"[+-]?\s*\d+(?:\.\d*)?"
REAL_RANGE = re.compile(rf"\s*({REAL})\s*-\s*({REAL})(?:\s*\(([+-]\d+(?:\.\d*)?)\s*\))?\s*")
REAL_RANGE_COUNT = re.compile(rf"\s*({REAL})\s*-\s*({REAL})(?:\s*\[(\d+)\s*])?\s*")
RANGE_FORMS = "ranges are written 1-5, 1-10 (+2) or 10-20 [5]"


@dataclasses.dataclass(frozen=True)
class AxisOption:
    """A setting an axis varies: how its values are read (int, float or str) and how one changes a record."""
    label: str
    kind: type
    apply: Callable[[Any, Any, list], Any]  # (record, value, all the axis's values) -> record


@dataclasses.dataclass(frozen=True)
class Axis:
    option: AxisOption
    values: tuple

    def label(self, value) -> str:
        """A1111's legend: "Seed: 3", and the bare value for text (Prompt S/R, Sampler)."""
        if isinstance(value, float):
            value = round(value, 8)
        return str(value) if self.option.kind is str else f"{self.option.label}: {value}"


# ------------------------------------------------------------------------------------------ the axes


def field(name: str, **also):
    return lambda record, value, values: record.replace(**{name: value}, **also)


def sampler_name(value: str) -> str:
    """An sd_core sampler name or the name A1111 shows ("DPM++ 2M Karras", "Euler a"), any case."""
    names = {name.lower(): name for name in SCHEDULER_NAMES} | {shown.lower(): name for name, shown in DISPLAY_NAMES.items()}
    if str(value).strip().lower() not in names:
        raise ValueError(f"Unknown sampler {value!r}; the samplers are {', '.join(SCHEDULER_NAMES)} (or their A1111 "
                         f"names: {', '.join(DISPLAY_NAMES.values())}).")
    return names[str(value).strip().lower()]


def apply_sampler(record, value, values):
    return record.replace(scheduler=sampler_name(value))


def apply_prompt_sr(record, value, values):
    """A1111's Prompt S/R: the first value is searched for in the prompt and the negative prompt, each value put
    in its place."""
    search, negative = values[0], record.negative_prompt or ""
    if not isinstance(record.prompt, str) or (search not in record.prompt and search not in negative):
        raise ValueError(f"Prompt S/R did not find {search!r} in the prompt or the negative prompt; its first value "
                         f"must be text of the prompt (the others replace it).")
    return record.replace(prompt=record.prompt.replace(search, value),
                          negative_prompt=None if record.negative_prompt is None else negative.replace(search, value))


def apply_size(record, value, values):
    """"WxH" as A1111's infotext writes a size (width first), or one number for a square."""
    match = re.fullmatch(r"\s*(\d+)\s*(?:[xX×]\s*(\d+)\s*)?", str(value))
    if not match:
        raise ValueError(f"A size is written WIDTHxHEIGHT (e.g. 64x48) or one number for a square; got {value!r}.")
    width = match.group(1)
    return record.replace(width=width, height=match.group(2) or width)


def apply_lora_scale(record, value, values):
    if not record.loras:
        raise ValueError("The LoRA scale axis scales the settings' LoRAs, and there are none: choose a LoRA first.")
    return record.replace(loras=tuple((name, value) for name, _ in record.loras))


def apply_class_label(record, value, values):
    label = int(value) if str(value).strip().isdigit() else str(value).strip()
    return record.replace(class_labels=(label,) * len(record.class_labels))


SD_AXES = {option.label: option for option in [
    AxisOption(NOTHING, str, lambda record, value, values: record),
    AxisOption("Seed", int, field("seed")),
    AxisOption("Steps", int, field("steps")),
    AxisOption("CFG Scale", float, field("guidance_scale")),
    AxisOption("Sampler", str, apply_sampler),
    AxisOption("Prompt S/R", str, apply_prompt_sr),
    AxisOption("Clip skip", int, field("clip_skip")),
    AxisOption("Size", str, apply_size),
    AxisOption("Model", str, field("model")),
    AxisOption("LoRA scale", float, apply_lora_scale),
    AxisOption("Denoising", float, field("strength")),
    AxisOption("DeepCache", int, field("deepcache", fast=True)),
    AxisOption("ToMe", float, field("tome", fast=True)),
    AxisOption("Guidance until", float, field("guidance_until", fast=True)),
    AxisOption("T-GATE", float, field("tgate", fast=True)),
]}
DIT_AXES = {option.label: option for option in [
    AxisOption(NOTHING, str, lambda record, value, values: record),
    AxisOption("Class label", str, apply_class_label),
    AxisOption("Guidance", float, field("guidance_scale")),
    AxisOption("Steps", int, field("steps")),
    AxisOption("Sampler", str, apply_sampler),
    AxisOption("Seed", int, field("seed")),
    AxisOption("Guided channels", str, field("guided_channels")),
    AxisOption("Model", str, field("model")),
    AxisOption("FORA", int, field("dit_cache", fast=True)),
    AxisOption("Guidance until", float, field("guidance_until", fast=True)),
]}


def axis_options(record) -> dict:
    return DIT_AXES if isinstance(record, DiTSettings) else SD_AXES


# ------------------------------------------------------------------------------------ reading values


def listed(text: str) -> list[str]:
    """A1111's csv_string_to_list_strip: CSV, so a quoted value may hold commas."""
    return [value.strip() for row in csv.reader(io.StringIO(str(text)), skipinitialspace=True) for value in row if value.strip()]


def range_values(text: str, kind: type, room: int) -> list | None:
    """The values of one range in A1111's forms, or None when `text` is no range; refused beyond `room` values
    (counted before any is made)."""
    exact, counted = (INT_RANGE, INT_RANGE_COUNT) if kind is int else (REAL_RANGE, REAL_RANGE_COUNT)
    number = int if kind is int else float
    match = exact.fullmatch(text)
    if match:
        start, end = (number(group.replace(" ", "")) for group in match.group(1, 2))
        step = number(match.group(3)) if match.group(3) else 1
        if step == 0:
            raise ValueError(f"{text!r}: a range's step (+N) must not be 0.")
        count = len(range(start, end + 1, step)) if kind is int else max(0, math.ceil((end + step - start) / step))
    else:
        match = counted.fullmatch(text)
        if not match:
            return None
        start, end = (number(group.replace(" ", "")) for group in match.group(1, 2))
        count = int(match.group(3)) if match.group(3) else 1
    if count > room:
        raise ValueError(f"{text!r} makes {count} values; a plot holds at most {MAX_CELLS} pictures.")
    if match.re in (INT_RANGE, REAL_RANGE):
        return list(range(start, end + 1, step)) if kind is int else np.arange(start, end + step, step).tolist()
    values = np.linspace(start, end, count).tolist()
    return [int(v) for v in values] if kind is int else values


def axis_values(option: AxisOption, text: str, room: int = MAX_CELLS) -> list:
    """The values an axis's text names, ranges expanded (at most `room`); text values stay text."""
    if option.label == NOTHING:
        return [None]
    values = []
    for item in listed(text):
        expanded = range_values(item, option.kind, room - len(values)) if option.kind in (int, float) else None
        values += [item] if expanded is None else expanded
        if len(values) > room:
            raise ValueError(f"The {option.label} axis has more than {room} values; a plot holds at most "
                             f"{MAX_CELLS} pictures.")
    if not values:
        raise ValueError(f"The {option.label} axis has no values: write some (e.g. 1, 2, 3 or 1-5).")
    return values


# --------------------------------------------------------------------------------------------- the plan


@dataclasses.dataclass(frozen=True)
class Plot:
    base: Any  # the record every cell starts from
    axes: tuple  # (x, y, z) Axis
    cells: tuple  # every cell's record, index ix + iy * len(xs) + iz * len(xs) * len(ys), as A1111 orders them

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(len(axis.values) for axis in self.axes)


def plan(base, x=(NOTHING, ""), y=(NOTHING, ""), z=(NOTHING, ""), limits: Limits = LIBRARY,
         max_cells: int = MAX_CELLS) -> Plot:
    """Every cell's record: `base` with each axis's value applied (x, y, z are (axis label, values text)).
    A seed left to chance (None or -1) is drawn here, once, so that every cell and its metadata say which seed
    ran (A1111's fix_seed). Every value is checked before any picture is made."""
    options = axis_options(base)
    base = base.replace(seed=random_seed()) if base.seed is None else base
    axes, room = [], max_cells
    for name, (label, text) in zip("XYZ", (x, y, z)):
        if label not in options:
            raise ValueError(f"{name} axis: unknown setting {label!r}; the axes are {', '.join(options)}.")
        values = axis_values(options[label], text, room)
        if label == "Seed":
            values = [random_seed() if str(v).strip() in ("", "-1") else v for v in values]
        room = max(1, room // len(values))
        axes.append(Axis(options[label], tuple(values)))
    count = math.prod(len(axis.values) for axis in axes)
    if count > max_cells:
        raise ValueError(f"The plot would make {count} pictures; at most {max_cells}: use fewer values.")
    cells = []
    for iz in range(len(axes[2].values)):
        for iy in range(len(axes[1].values)):
            for ix in range(len(axes[0].values)):
                cells.append(cell_record(base, axes, (ix, iy, iz), limits))
    return Plot(base, tuple(typed(axis) for axis in axes), tuple(cells))


def typed(axis: Axis) -> Axis:
    """An axis whose number values (checked by the record's rules) are numbers, for its legend and metadata."""
    if axis.option.kind not in (int, float):
        return axis
    return Axis(axis.option, tuple(axis.option.kind(float(v)) if isinstance(v, str) else v for v in axis.values))


def cell_record(base, axes, index: tuple, limits: Limits):
    record = base
    for name, axis, i in zip("XYZ", axes, index):
        try:
            record = axis.option.apply(record, axis.values[i], list(axis.values)).within(limits)
        except (ValueError, TypeError) as error:
            hint = f" ({RANGE_FORMS})" if axis.option.kind in (int, float) and "-" in str(axis.values[i]) else ""
            raise ValueError(f"{name} axis ({axis.option.label}): {error}{hint}") from None
    return record


# --------------------------------------------------------------------------------------------- running


@dataclasses.dataclass
class PlotResult:
    grids: list  # one labelled grid per Z value, its PNG text carrying every cell's settings
    cells: list  # every cell's picture (A1111's order), each with its own settings in its metadata
    parameters: list  # every cell's parameters as it ran


def sd_runner(pipe, image=None, fast_pipeline: Callable | None = None, load_lora: Callable | None = None,
              models: dict | None = None):
    """run(settings, callback) for Stable Diffusion cells: generate() on `pipe` whose text encoders answer each
    distinct prompt once per plot (a cell equals the same settings run alone, bit for bit). `models`: the
    pipelines the Model axis names (name -> pipeline, loaded by the caller's cache); a cell whose model is not
    among them runs on `pipe`. `image`: the start image for image to image (the Denoising axis). Fast-path cells
    (DeepCache, ToMe, Guidance until, T-GATE) go through `fast_pipeline(pipe, settings)` (an sd_core.fast
    FastPipeline, which this layer cannot build itself); LoRAs are merged per cell from `load_lora(name)`."""
    cache, current = {}, {"loras": ()}
    answer = caching(cache, lambda: current["loras"])
    views = {}  # id(pipeline) -> the pipeline with caching encoders (the pipelines are held by `models`)

    def run(settings, callback=None):
        if settings.strength is not None and image is None:
            raise ValueError("The Denoising axis changes image-to-image strength: give a starting image.")
        if settings.loras and load_lora is None:
            raise ValueError("These settings name LoRAs but no LoRA loader was given (load_lora=).")
        cell_pipe = (models or {}).get(settings.model, pipe)
        current["loras"] = settings.loras
        files = [(load_lora(name), scale) for name, scale in settings.loras]
        with loras_applied(cell_pipe.models, files):
            if not settings.fast:
                if id(cell_pipe) not in views:
                    views[id(cell_pipe)] = with_encoders(cell_pipe, answer)
                return generate(views[id(cell_pipe)], settings, image=image, callback=callback)
            if fast_pipeline is None:
                raise ValueError("Fast-path cells (DeepCache, ToMe, Guidance until, T-GATE) run on the fast path: pass "
                                 "fast_pipeline= (sd_core.fast.pipeline.fast_for).")
            fast = fast_pipeline(cell_pipe, settings)
            return dataclasses.replace(fast, pipe=with_encoders(fast.pipe, answer)).generate(
                settings, image=image, callback=callback)
    run.cache = cache
    return run


def dit_runner(pipe, models: dict | None = None, fast_pipeline: Callable | None = None):
    """run(settings, callback) for DiT cells, on the pipeline the cell's model names in `models`, else `pipe`;
    fast-path cells (FORA, Guidance until) through `fast_pipeline(pipe, settings)`, as in sd_runner."""
    def run(settings, callback=None):
        cell_pipe = (models or {}).get(settings.model, pipe)
        if not settings.fast:
            return generate_dit(cell_pipe, settings, callback)
        if fast_pipeline is None:
            raise ValueError("Fast-path cells (FORA, Guidance until) run on the fast path: pass fast_pipeline= "
                             "(sd_core.fast.pipeline.fast_for).")
        return fast_pipeline(cell_pipe, settings).generate_dit(settings, callback)
    return run


def plot_models(plot: Plot) -> list:
    """The distinct models the cells name (the Model axis's values, or the base's), in order; None: unnamed."""
    return list(dict.fromkeys(cell.model for cell in plot.cells))


def run_plot(plot: Plot, run: Callable, progress: Callable | None = None) -> PlotResult:
    """Every cell in A1111's order through `run(settings, callback)`; progress(done, total, label) after each
    cell. Returns the grids (one per Z value) and the cells."""
    images, parameters = [], []
    for index, settings in enumerate(plot.cells):
        result = run(settings)
        images.append(result.images[0])
        parameters.append(json.loads(result.images[0].info["sd_core"]))
        if progress is not None:
            progress(index + 1, len(plot.cells), cell_label(plot, index))
    per_grid = len(plot.axes[0].values) * len(plot.axes[1].values)
    grids = [tagged_grid(grid, plot, parameters[iz * per_grid:(iz + 1) * per_grid])
             for iz, grid in enumerate(plot_grids(plot, images))]
    return PlotResult(grids, images, parameters)


def plot_grids(plot: Plot, images: list) -> list:
    """One labelled grid per Z value of `images` (one per cell, A1111's order): the axes' values on its edges."""
    xs, ys, zs = plot.axes
    per_grid = len(xs.values) * len(ys.values)
    return [labelled_grid(images[iz * per_grid:(iz + 1) * per_grid], len(xs.values),
                          [xs.label(v) for v in xs.values] if xs.option.label != NOTHING else [],
                          [ys.label(v) for v in ys.values] if ys.option.label != NOTHING else [],
                          zs.label(z_value) if zs.option.label != NOTHING else "")
            for iz, z_value in enumerate(zs.values)]


def cell_label(plot: Plot, index: int) -> str:
    xs, ys, zs = plot.axes
    ix, iy, iz = index % len(xs.values), index // len(xs.values) % len(ys.values), index // (len(xs.values) * len(ys.values))
    return ", ".join(axis.label(axis.values[i]) for axis, i in ((xs, ix), (ys, iy), (zs, iz))
                     if axis.option.label != NOTHING)


def tagged_grid(grid, plot: Plot, cells: list):
    """The grid's PNG text, as A1111 tags a grid: the first cell's settings (so PNG Info reads a grid as its first
    picture), sd_core's JSON holding the axes and every cell's parameters under "xyz_plot", and A1111's infotext
    with "X Type: ..., X Values: ..."."""
    axes = [{"axis": name, "type": axis.option.label, "values": list(axis.values)}
            for name, axis in zip("XYZ", plot.axes) if axis.option.label != NOTHING]
    grid.info["sd_core"] = json.dumps({**cells[0], "xyz_plot": {"axes": axes, "cells": cells}})
    extra = ", ".join(f"{a['axis']} Type: {a['type']}, {a['axis']} Values: {quote(', '.join(map(str, a['values'])))}"
                      for a in axes)
    grid.info["parameters"] = a1111_parameters(cells[0]) + (", " + extra if extra else "")
    return grid


def grid_settings(grid) -> dict:
    """A grid's axes and every cell's parameters ({"axes": [...], "cells": [...]}), from its PNG text."""
    text = getattr(grid, "text", None) or grid.info
    return json.loads(text["sd_core"])["xyz_plot"]
