"""The Lab on the command line: `python -m sd_core xyz ...` (the X/Y/Z plot) and `python -m sd_core attention ...`
(each prompt word's attention map), registered by sd_core.__main__'s parser through add_commands().

    python -m sd_core xyz "a big red circle on the left on a gray background" --x-type Seed --x-values 1-3
        --y-type "CFG Scale" --y-values "1, 4, 7" --steps 10 --seed 1 -o outputs/grid.png
    python -m sd_core attention "a big red circle on the left on a gray background" --seed 1 -o outputs/maps.png

xyz writes the grid (one per Z value: grid-z0.png, grid-z1.png, ...) and every cell beside it (grid-cell-000.png,
...), each PNG carrying its settings and the grid's carrying every cell's. The values are written as AUTOMATIC1111
writes them (1-5, 1-10 (+2), 10-20 [5], comma lists, "quoted, values"); the Model axis takes folders, files or hub
ids, each loaded once. attention writes the picture, each word's map over it (maps-word-00-a.png, ...) and all of
them in one captioned strip (maps-words.png)."""
import re
import sys
from pathlib import Path

from sd_core.checkpoints import catalog
from sd_core.checkpoints.catalog import EMBEDDED_DIT, EMBEDDED_TEXT_TO_IMAGE
from sd_core.checkpoints.pipeline_classes import DiTPipeline, StableDiffusionPipeline
from sd_core.pipelines.image_io import save_image
from sd_core.pipelines.lab import xyz
from sd_core.pipelines.lab.attention_maps import attention_maps
from sd_core.pipelines.lab.drawing import strip
from sd_core.pipelines.settings import DiTSettings, GenerationSettings

AXIS_LABELS = list(dict.fromkeys([*xyz.SD_AXES, *xyz.DIT_AXES]))


def add_commands(commands, common_arguments, load, resolve_output):
    """The xyz and attention subcommands, on sd_core.__main__'s shared arguments (model, steps, sampler, seed,
    precision, output), its loader `load(source, args, expected_type)` and `resolve_output(args)`."""
    x = commands.add_parser("xyz", help="X/Y/Z plot: a grid of pictures over up to three settings (A1111's)")
    x.add_argument("prompt", nargs="?", help="what to draw (a Stable Diffusion model)")
    x.add_argument("--class", dest="class_label", help="the class to draw (a DiT model): a name or an id")
    picture_arguments(x)
    x.add_argument("--init-image", help="start from this image (image to image: the Denoising axis varies strength)")
    for name in "xyz":
        x.add_argument(f"--{name}-type", choices=AXIS_LABELS, default=xyz.NOTHING, metavar="SETTING",
                       help=f"the setting the {name.upper()} axis varies: {', '.join(AXIS_LABELS)} (default: Nothing)")
        x.add_argument(f"--{name}-values", default="", metavar="VALUES",
                       help="1-5, 1-10 (+2), 10-20 [5], or a comma list (quote values holding commas)")
    common_arguments(x, None)
    x.set_defaults(run=lambda args: run_xyz(args, load, resolve_output(args)))
    a = commands.add_parser("attention", help="attention maps: where each prompt word was looked at (DAAM)")
    a.add_argument("prompt", help="what to draw; each of its words gets a map")
    picture_arguments(a)
    common_arguments(a, None)
    a.set_defaults(run=lambda args: run_attention(args, load, resolve_output(args)))


def picture_arguments(p):
    p.add_argument("--negative", help="negative prompt")
    p.add_argument("--guidance", type=float, help="guidance scale (default: the model's recommended one)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)


def base_record(args, pipe, source):
    """The record every cell starts from (a DiT model draws --class), the model's recommended steps and guidance
    where not given."""
    defaults = catalog.recommended(source, pipe)
    common = dict(steps=defaults["steps"] if args.steps is None else args.steps, scheduler=args.scheduler,
                  guidance_scale=defaults["guidance_scale"] if args.guidance is None else args.guidance,
                  seed=args.seed, model=str(source))
    class_label = getattr(args, "class_label", None)  # (attention has no --class)
    if isinstance(pipe, DiTPipeline):
        if class_label is None or args.prompt is not None:
            raise ValueError("A DiT model draws a class: give --class NAME_OR_ID instead of a prompt.")
        return DiTSettings.from_values(dict(common, class_labels=[class_label]))
    if args.prompt is None or class_label is not None:
        raise ValueError("A Stable Diffusion model draws a prompt: give one (and no --class).")
    return GenerationSettings.from_values(dict(common, prompt=args.prompt, negative_prompt=args.negative,
                                               height=args.height, width=args.width,
                                               strength=0.8 if getattr(args, "init_image", None) else None))


def plot_pipelines(plot, pipe, source, load, args) -> dict:
    """Every model the cells name (the Model axis), each loaded once; all of the base model's kind."""
    pipes = {str(source): pipe}
    for name in xyz.plot_models(plot):
        if name not in pipes:
            print(f"loading {name}")
            pipes[name] = load(name, args, type(pipe))
    return pipes


def fast_pipeline(pipe, settings):
    """The FastPipeline for a fast-path cell (sd_core.fast.pipeline.fast_for; the fast path loads only when a cell
    takes it)."""
    from sd_core.fast.pipeline import fast_for
    return fast_for(pipe, settings)


def progress(done: int, total: int, label: str):
    print(f"cell {done}/{total}: {label}")


def run_xyz(args, load, output: Path):
    source = args.model or (EMBEDDED_DIT if args.class_label is not None else EMBEDDED_TEXT_TO_IMAGE)
    pipe = load(source, args, (StableDiffusionPipeline, DiTPipeline))
    base = base_record(args, pipe, source)
    if args.init_image and isinstance(pipe, DiTPipeline):
        raise ValueError("--init-image starts a Stable Diffusion picture; a DiT model draws from noise.")
    plot = xyz.plan(base, (args.x_type, args.x_values), (args.y_type, args.y_values), (args.z_type, args.z_values))
    pipes = plot_pipelines(plot, pipe, source, load, args)
    if isinstance(pipe, DiTPipeline):
        run = xyz.dit_runner(pipe, pipes, fast_pipeline=fast_pipeline)
    else:
        run = xyz.sd_runner(pipe, image=args.init_image, fast_pipeline=fast_pipeline, models=pipes)
    result = xyz.run_plot(plot, run, progress)
    grids = [output] if len(result.grids) == 1 else \
        [output.with_name(f"{output.stem}-z{iz}{output.suffix}") for iz in range(len(result.grids))]
    for grid, path in zip(result.grids, grids):
        print(f"wrote {save_image(grid, path)}")
    for index, cell in enumerate(result.cells):
        save_image(cell, output.with_name(f"{output.stem}-cell-{index:03d}{output.suffix}"))
    print(f"wrote {len(result.cells)} cells: {output.stem}-cell-000{output.suffix} ... (A1111's order, X fastest)")
    if output.suffix.lower() != ".png":
        print(f"note: only PNG files keep the settings; {output.suffix} files do not.", file=sys.stderr)


def word_file(output: Path, index: int, word: str) -> Path:
    safe = re.sub(r"[^\w-]+", "_", word).strip("_") or "token"
    return output.with_name(f"{output.stem}-word-{index:02d}-{safe}{output.suffix}")


def run_attention(args, load, output: Path):
    source = args.model or EMBEDDED_TEXT_TO_IMAGE
    pipe = load(source, args, StableDiffusionPipeline)
    maps = attention_maps(pipe, base_record(args, pipe, source))
    print(f"wrote {save_image(maps.image, output)}")
    overlays = maps.overlays
    for index, (overlay, word) in enumerate(overlays):
        save_image(overlay, word_file(output, index, word))
    words = output.with_name(f"{output.stem}-words{output.suffix}")
    save_image(strip([overlay for overlay, _ in overlays], [word for _, word in overlays]), words)
    print(f"wrote {words} and one map per word: {', '.join(word for _, word in overlays)}")
