"""The Lab tab: the experiments of sd_core.pipelines.lab in the app (X/Y/Z plot, attention maps, walks,
schedules), each with named API endpoints (/xyz_plot, /attention_maps, /walk, /schedules) whose parameters are
named after the form's labels and default to an example on the embedded models, so a bare call answers. Every
request runs under the app's work bound (cells x pixels x steps) and reports progress per cell."""
import contextlib
import json
import tempfile
from pathlib import Path

import gradio as gr

from sd_core.app.forms import FORM_LIMITS, MODEL_DEFAULT
from sd_core.app.handlers import DIT_DEFAULTS, SD_DEFAULTS
from sd_core.app.parts import (
    MODELS,
    drawn_side,
    handler,
    images_gallery,
    model_choices,
    model_dropdown,
    run_bounded,
    scheduler_dropdown,
    scheduler_of,
)
from sd_core.app.serving import raw_value
from sd_core.checkpoints.pipeline_classes import DiTPipeline, StableDiffusionPipeline
from sd_core.fast.pipeline import fast_for  # run it under MODELS.using(pipe): it keeps state between steps
from sd_core.pipelines.lab import schedules as lab_schedules
from sd_core.pipelines.lab import walks, xyz
from sd_core.pipelines.lab.attention_maps import attention_maps as daam
from sd_core.pipelines.lab.parity_grid import comparisons as parity_comparisons
from sd_core.pipelines.lab.parity_grid import parity_plot
from sd_core.pipelines.settings import DiTSettings, GenerationSettings, flag
from sd_core.schedulers import SCHEDULER_NAMES, TIMESTEP_SPACINGS

SD_MODEL, DIT_MODEL = SD_DEFAULTS.name, DIT_DEFAULTS.name
LAB_STEPS = 10  # the examples' steps: a plot runs a picture per cell
EXAMPLE_PROMPT = "a big red circle on the left on a gray background"
AXIS_LABELS = list(dict.fromkeys([*xyz.SD_AXES, *xyz.DIT_AXES]))


def progress_per_cell(progress):
    return lambda done, total, label: progress((done, total), desc=label)


def base_record(pipe, prompt, negative_prompt, steps, guidance_scale, scheduler, seed, model):
    """The record every cell starts from: a DiT model reads the prompt as a class label."""
    if isinstance(pipe, DiTPipeline):
        return DiTSettings.from_values(dict(class_labels=[prompt], steps=steps, guidance_scale=guidance_scale,
                                            scheduler=scheduler_of(scheduler), seed=seed, model=model), FORM_LIMITS)
    return GenerationSettings.from_values(dict(prompt=prompt, negative_prompt=negative_prompt or None, steps=steps,
                                               guidance_scale=guidance_scale, scheduler=scheduler_of(scheduler),
                                               seed=seed, model=model), FORM_LIMITS)


def cell_pixels(pipe, settings) -> int:
    if isinstance(pipe, DiTPipeline):
        return drawn_side(pipe) ** 2
    return (settings.width or pipe.default_size) * (settings.height or pipe.default_size)


def plot_pipelines(plot, model: str, pipe, progress) -> dict:
    """The pipelines the plot's cells name (the Model axis), loaded through the app's model cache: each one the same
    kind as `model`, and no more of them than the cache holds (a plot holds each one for its whole run)."""
    names = [name for name in xyz.plot_models(plot) if name is not None]
    if len(names) > MODELS.cache.size:
        raise gr.Error(f"The Model axis names {len(names)} models; this server holds at most {MODELS.cache.size} at "
                       f"once: plot fewer models.")
    pipes = {name: MODELS.get(name, progress) for name in names}
    for name, other in pipes.items():
        if type(other) is not type(pipe):
            raise gr.Error(f"The Model axis mixes kinds of model: {name} is not like {model}; plot "
                           f"{'DiT' if isinstance(pipe, DiTPipeline) else 'text-to-image'} models together.")
    return pipes


@contextlib.contextmanager
def using_all(pipes):
    """MODELS.using(pipe) for each pipeline (in one order, so two plots never wait on each other)."""
    with contextlib.ExitStack() as stack:
        for _, pipe in sorted({id(pipe): pipe for pipe in pipes}.items()):
            stack.enter_context(MODELS.using(pipe))
        yield


def parity_outputs(parity, labels: list) -> list:
    """The parity grids, then each cell's diffusers picture captioned with its label and Compare's verdict."""
    passed = sum(cell.passed is True for cell in parity.cells)
    summary = f"{'✅' if parity.passed else '❌'} {passed}/{len(parity.cells)} cells equal to diffusers"
    return [(grid, summary) for grid in parity.grids] + [(cell.reference, f"{label}: {cell.caption()}")
                                                         for cell, label in zip(parity.cells, labels)]


def xyz_handler(comparisons=None):
    """The /xyz_plot endpoint; its parity grid runs `comparisons.run_comparison` (compare.kinds, handed in by
    app.py: sd_core never imports compare)."""
    @handler
    def xyz_plot(model=SD_MODEL, prompt=EXAMPLE_PROMPT, negative_prompt="", steps=LAB_STEPS,
                 guidance_scale=SD_DEFAULTS.guidance_scale, scheduler="dpmpp_2m", seed=1, x_type="Seed",
                 x_values="1-3", y_type="CFG Scale", y_values="1, 4, 7", z_type="Nothing", z_values="",
                 parity_grid=False, progress=gr.Progress()):
        """X/Y/Z plot (AUTOMATIC1111's): one picture per combination of the axes' values (1-5, 1-10 (+2), 10-20 [5],
        comma lists; the Model axis takes the model list's names). With parity_grid, every cell also through
        diffusers by Compare's comparison. Returns (the grids, one per Z value; every cell with its label; the
        cells' parameters; the parity grids and cells, each with its verdict)."""
        if parity_grid and comparisons is None:
            raise gr.Error("This app was started without compare/'s comparisons: the parity grid is unavailable.")
        pipe = MODELS.get(model, progress)
        base = base_record(pipe, prompt, negative_prompt, steps, guidance_scale, scheduler, seed, model)
        plot = xyz.plan(base, (x_type, x_values), (y_type, y_values), (z_type, z_values), FORM_LIMITS)
        pipes = plot_pipelines(plot, model, pipe, progress)
        if parity_grid:
            parity_comparisons(plot)  # a plot Compare cannot check is refused before any picture
        if isinstance(pipe, StableDiffusionPipeline):
            run = xyz.sd_runner(pipe, models=pipes, fast_pipeline=fast_for)
        else:
            run = xyz.dit_runner(pipe, pipes, fast_pipeline=fast_for)
        pixels = max(cell_pixels(pipes.get(cell.model, pipe), cell) for cell in plot.cells)
        steps_per_cell = max(cell.steps for cell in plot.cells)
        parity = None
        with using_all([pipe, *pipes.values()]):
            result = run_bounded(f"lab:{model}", pixels, steps_per_cell, len(plot.cells),
                                 lambda: xyz.run_plot(plot, run, progress_per_cell(progress)))
            if parity_grid:
                parity = run_bounded(f"compare:{model}", pixels, steps_per_cell, len(plot.cells),
                                     lambda: parity_plot(plot, comparisons.run_comparison, pipe, pipes,
                                                         progress=progress_per_cell(progress)))
        labels = [xyz.cell_label(plot, i) for i in range(len(plot.cells))]
        parameters = {"axes": xyz.grid_settings(result.grids[0])["axes"], "cells": result.parameters}
        if parity is not None:
            parameters["parity"] = [dict(passed=c.passed, max_difference=c.max_difference, verdict=c.verdict)
                                    for c in parity.cells]
        return (result.grids, list(zip(result.cells, labels)), json.dumps(parameters, indent=1),
                parity_outputs(parity, labels) if parity is not None else [])
    return xyz_plot


@handler
def attention_maps(model=SD_MODEL, prompt=EXAMPLE_PROMPT, negative_prompt="", steps=LAB_STEPS,
                   guidance_scale=SD_DEFAULTS.guidance_scale, scheduler="dpmpp_2m", seed=1, progress=gr.Progress()):
    """Attention maps (DAAM): each prompt word's cross-attention drawn over the picture. Returns (the picture,
    one overlay per word, parameters)."""
    pipe = MODELS.get(model, progress)
    if not isinstance(pipe, StableDiffusionPipeline):
        raise gr.Error(f"{model} has no text prompt to map: choose a text-to-image model.")
    settings = base_record(pipe, prompt, negative_prompt, steps, guidance_scale, scheduler, seed, model)
    callback = lambda step, *_: progress((step + 1, settings.steps), desc="denoising")
    with MODELS.using(pipe):
        maps = run_bounded(f"lab:{model}", cell_pixels(pipe, settings), settings.steps, 1,
                           lambda: daam(pipe, settings, callback))
    return maps.image, maps.overlays, json.dumps(maps.parameters, indent=1)


@handler
def walk(model=SD_MODEL, walk_between="seeds", prompt=EXAMPLE_PROMPT, second_prompt="a big blue circle on the right "
         "on a gray background", seed=1, second_seed=2, frames=4, steps=LAB_STEPS,
         guidance_scale=SD_DEFAULTS.guidance_scale, scheduler="dpmpp_2m", progress=gr.Progress()):
    """A walk between two seeds (slerp of the starting noise) or two prompts (their text encodings blended).
    Returns (the animation as WebP, the strip of frames)."""
    pipe = MODELS.get(model, progress)
    if not isinstance(pipe, StableDiffusionPipeline):
        raise gr.Error(f"{model} is not a text-to-image model: walks run on those.")
    settings = base_record(pipe, prompt, "", steps, guidance_scale, scheduler, seed, model)
    count = len(walks.fractions(frames))
    if walk_between not in ("seeds", "prompts"):
        raise gr.Error(f"walk_between must be seeds or prompts; got {walk_between!r}.")

    def work():
        if walk_between == "seeds":
            return walks.seed_walk(pipe, settings, settings.seed, second_seed, count)
        return walks.prompt_walk(pipe, settings, second_prompt, count)
    with MODELS.using(pipe):
        result = run_bounded(f"lab:{model}", cell_pixels(pipe, settings), settings.steps, count, work)
    path = Path(tempfile.mkdtemp(prefix="sd_core-walk-")) / "walk.webp"
    result.animation(path)
    return str(path), result.strip


@handler
def schedules(model=SD_MODEL, samplers=("euler", "dpmpp_2m", "ddim"), steps=20, spacing=MODEL_DEFAULT,
              karras=False, show_trajectory=True, prompt=EXAMPLE_PROMPT, seed=1, progress=gr.Progress()):
    """Sigma and log-SNR at each model call of each chosen sampler, on the model's noise schedule; with
    show_trajectory, the first sampler's run on the prompt (the model's own spacing), its x0 estimate after each
    call marked with that call's noise level. Returns (the log-SNR plot, the sigma plot, the trajectory)."""
    pipe = MODELS.get(model, progress)
    names = [samplers] if isinstance(samplers, str) else list(samplers or [])
    wanted = [lab_schedules.Schedule(name, steps, None if spacing == MODEL_DEFAULT else spacing,
                                     flag(karras, "karras") and name in ("euler", "dpmpp_2m", "heun", "lms"))
              for name in names]
    rows = lab_schedules.schedules(pipe.scheduler_config, wanted)
    trajectory = None
    if flag(show_trajectory, "show_trajectory"):
        if not isinstance(pipe, StableDiffusionPipeline):
            raise gr.Error(f"{model} has no text prompt: untick show_trajectory or choose a text-to-image model.")
        settings = base_record(pipe, prompt, "", steps, SD_DEFAULTS.guidance_scale, names[0], seed, model)
        callback = lambda step, *_: progress((step + 1, len(rows[0].sigma)), desc="denoising")
        with MODELS.using(pipe):
            trajectory = run_bounded(f"lab:{model}", cell_pixels(pipe, settings), settings.steps, 1,
                                     lambda: lab_schedules.marked_trajectory(pipe, settings, callback).image)
    return lab_schedules.plot(rows, "log_snr"), lab_schedules.plot(rows, "sigma"), trajectory


def sampling_row():
    with gr.Row():
        steps = raw_value(gr.Slider(1, FORM_LIMITS.max_steps, LAB_STEPS, step=1, label="Steps"))
        guidance = raw_value(gr.Slider(0, 20, SD_DEFAULTS.guidance_scale, step=0.5, label="Guidance scale"))
        return steps, guidance, scheduler_dropdown("dpmpp_2m")


def whole_pictures(label: str) -> gr.Gallery:
    """A gallery that shows each picture whole (contained, not cropped to a thumbnail), one to a row."""
    return gr.Gallery(label=label, columns=1, height="auto", format="png", object_fit="contain",
                      elem_classes="pixelated")


def xyz_section(models: list, comparisons):
    with gr.Row():
        with gr.Column():
            model = model_dropdown(models, "Model (a DiT model reads the prompt as a class label)")
            prompt, negative = gr.Textbox(EXAMPLE_PROMPT, label="Prompt"), gr.Textbox("", label="Negative prompt")
            steps, guidance, scheduler = sampling_row()
            seed = raw_value(gr.Number(1, label="Seed (-1: random)", precision=0))
            axes = []
            for name, label, values in (("X", "Seed", "1-3"), ("Y", "CFG Scale", "1, 4, 7"), ("Z", "Nothing", "")):
                with gr.Row():
                    axes += [gr.Dropdown(AXIS_LABELS, value=label, label=f"{name} type"),
                             gr.Textbox(values, label=f"{name} values (1-5, 1-10 (+2), 10-20 [5], a, b)")]
            parity = gr.Checkbox(False, label="Parity grid: each cell also through diffusers (Compare's verdict)",
                                 visible=comparisons is not None)
            run = gr.Button("Plot", variant="primary")
        with gr.Column():
            grids = whole_pictures("Grids")  # a grid is shown whole, its labels with it
            cells = images_gallery("Cells", columns=6)
            parity_cells = whole_pictures("Parity grid: diffusers' pictures, max |difference| and verdict")
            parameters = gr.Code(label="Parameters", language="json", max_lines=30)
    inputs = [model, prompt, negative, steps, guidance, scheduler, seed] + axes + [parity]
    run.click(xyz_handler(comparisons), inputs, [grids, cells, parameters, parity_cells], api_name="xyz_plot")
    if models:
        gr.Examples([[SD_MODEL, EXAMPLE_PROMPT, "", 10, 5.0, "dpmpp_2m", 1, "Seed", "1-3", "CFG Scale", "1, 4, 7",
                      "Nothing", "", False],
                     [DIT_MODEL, "red circle", "", 10, 3.0, "ddim", 1, "Class label", "red circle, blue square",
                      "Guided channels", "all, first3", "Nothing", "", False]], inputs,
                    example_labels=["seed x CFG (shapes)", "class x guided channels (DiT)"])


def attention_section(models: list):
    with gr.Row():
        with gr.Column():
            model = model_dropdown(models)
            prompt, negative = gr.Textbox(EXAMPLE_PROMPT, label="Prompt"), gr.Textbox("", label="Negative prompt")
            steps, guidance, scheduler = sampling_row()
            seed = raw_value(gr.Number(1, label="Seed (-1: random)", precision=0))
            run = gr.Button("Map attention", variant="primary")
        with gr.Column():
            image = gr.Image(label="Picture", format="png", height=256, elem_classes="pixelated")
            overlays = images_gallery("Each word's attention", columns=5)
            parameters = gr.Code(label="Parameters", language="json")
    inputs = [model, prompt, negative, steps, guidance, scheduler, seed]
    run.click(attention_maps, inputs, [image, overlays, parameters], api_name="attention_maps")


def walk_section(models: list):
    with gr.Row():
        with gr.Column():
            model = model_dropdown(models)
            between = gr.Radio(["seeds", "prompts"], value="seeds", label="Walk between")
            prompt = gr.Textbox(EXAMPLE_PROMPT, label="Prompt")
            second = gr.Textbox("a big blue circle on the right on a gray background", label="Second prompt")
            with gr.Row():
                seed = raw_value(gr.Number(1, label="Seed", precision=0))
                second_seed = raw_value(gr.Number(2, label="Second seed", precision=0))
                frames = raw_value(gr.Slider(2, walks.MAX_FRAMES, 4, step=1, label="Frames"))
            steps, guidance, scheduler = sampling_row()
            run = gr.Button("Walk", variant="primary")
        with gr.Column():
            animation = gr.Image(label="Animation (WebP)", type="filepath", height=256, elem_classes="pixelated")
            frames_strip = gr.Image(label="Frames", format="png")
    inputs = [model, between, prompt, second, seed, second_seed, frames, steps, guidance, scheduler]
    run.click(walk, inputs, [animation, frames_strip], api_name="walk")


def schedules_section(models: list):
    with gr.Row():
        with gr.Column():
            model = model_dropdown(models, "Model (its noise schedule)")
            samplers = gr.Dropdown(SCHEDULER_NAMES, value=["euler", "dpmpp_2m", "ddim"], multiselect=True,
                                   label="Samplers")
            steps = raw_value(gr.Slider(1, lab_schedules.MAX_STEPS, 20, step=1, label="Steps"))
            spacing = gr.Dropdown([MODEL_DEFAULT, *TIMESTEP_SPACINGS], value=MODEL_DEFAULT, label="Spacing")
            karras = gr.Checkbox(False, label="Karras (sigma samplers)")
            show = gr.Checkbox(True, label=f"Trajectory of the first sampler (at most "
                                           f"{lab_schedules.MAX_TRAJECTORY_STEPS} steps)")
            prompt = gr.Textbox(EXAMPLE_PROMPT, label="Prompt (the trajectory)")
            seed = raw_value(gr.Number(1, label="Seed", precision=0))
            run = gr.Button("Plot schedules", variant="primary")
        with gr.Column():
            log_snr, sigma = gr.Image(label="log-SNR", format="png"), gr.Image(label="sigma", format="png")
            trajectory = gr.Image(label="Trajectory: x0 after each model call, marked with its noise level",
                                  format="png")
    run.click(schedules, [model, samplers, steps, spacing, karras, show, prompt, seed], [log_snr, sigma, trajectory],
              api_name="schedules")


def lab_tab(comparisons=None):
    """The Lab: one section per experiment; the X/Y/Z plot's parity grid runs `comparisons` (compare.kinds)."""
    sd_models, any_models = model_choices("text_to_image"), model_choices("text_to_image") + model_choices("dit")
    gr.Markdown("Experiments that ask a model questions: an X/Y/Z plot over its settings, where each prompt word "
                "was attended to, walks between seeds or prompts, and the samplers' noise schedules.")
    with gr.Tab("X/Y/Z plot"):
        xyz_section(any_models, comparisons)
    with gr.Tab("Attention maps"):
        attention_section(sd_models)
    with gr.Tab("Walks"):
        walk_section(sd_models)
    with gr.Tab("Schedules"):
        schedules_section(sd_models)
