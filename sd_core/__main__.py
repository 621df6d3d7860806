"""Command line: python -m sd_core {generate, vae, dit, xyz, attention} ... (the embedded models when --model is omitted).

generate does text to image, image to image (--init-image), inpainting (--init-image and --mask: white is
repainted) and SDXL's base + refiner ensemble (--refiner MODEL --high-noise-frac 0.8), each steered by ControlNets
(--controlnet MODEL:IMAGE[:SCALE], repeatable, with --preprocessor, --control-start, --control-end, --guess-mode).

Images go to outputs/ unless -o names a file; steps and guidance default to the model's recommended settings
(the catalog's for the models it lists, else the family's); a batch gives image k the seed S + k, as A1111 does."""
import argparse
import functools
import itertools
import math
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from sd_core import lab_cli
from sd_core.controlnet_cli import controlnet_argument, controlnets_of
from sd_core.fast_cli import fast_arguments, fast_flags, run_fast
from sd_core.checkpoints import catalog
from sd_core.checkpoints.catalog import EMBEDDED_DIT, EMBEDDED_TEXT_TO_IMAGE
from sd_core.checkpoints.convert import CheckpointError
from sd_core.checkpoints.loading import DTYPES, load_pipeline
from sd_core.checkpoints.pipeline_classes import DiTPipeline, StableDiffusionPipeline
from sd_core.pipelines.dit_sampling import generate_dit
from sd_core.pipelines.control_images import PREPROCESSORS
from sd_core.pipelines.generate import customize, generate, image_seeds, refine_run, vae_roundtrip
from sd_core.pipelines.image_io import save_image
from sd_core.pipelines.offload import enable_model_cpu_offload
from sd_core.pipelines.prompt_syntax import count_chunks
from sd_core.pipelines.settings import PROMPT_SYNTAXES, DiTSettings, GenerationSettings
from sd_core.pipelines.work import WorkLimits, check_request
from sd_core.schedulers import SCHEDULER_NAMES
from sd_core.training import shapes_dataset as shapes

OUTPUTS = Path("outputs")  # the default output folder, created when missing
MAX_SECONDS = 300  # the estimated run time past which a command asks for --force (the app's work model prices it)
TRAINED_SIZE_SPAN = (0.5, 1.5)  # sides outside these multiples of the trained size draw broken pictures: a warning


def output_paths(output: Path, count: int) -> list[Path]:
    return [output] if count == 1 else [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def default_output(command: str) -> Path:
    """outputs/<command>-<n>.png with the first n no earlier run used."""
    OUTPUTS.mkdir(exist_ok=True)
    for n in itertools.count():
        path = OUTPUTS / f"{command}-{n:05d}.png"
        if not any(OUTPUTS.glob(f"{path.stem}*")):
            return path


def lora_argument(text: str) -> tuple[str, float]:
    """FILE:SCALE, split at the last colon; the scale is required and finite."""
    path, colon, scale = text.rpartition(":")
    try:
        value = float(scale)
    except ValueError:
        value = None
    if not colon or not path or value is None or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"--lora takes FILE:SCALE, e.g. style.safetensors:0.8; got {text!r}.")
    return path, value


def finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number; got {text!r}.")
    return value


def progress_callback(total: int):
    """A step counter drawn from the first step on, so an input error found before it prints on its own line."""
    bar = None

    def callback(step, timestep, latents, x0):  # counts calls: a refined image steps through two models
        nonlocal bar
        bar = bar or tqdm(total=total, unit="step")
        bar.update(1)
        if bar.n >= total:
            bar.close()
    return callback


def check_work(args, kind: str, width: int, height: int, steps: int, batch: int = 1, chunks: int = 1):
    """Refuse a run estimated past MAX_SECONDS on this machine (the app's work model, sd_core.pipelines.work),
    unless --force; the message names the bound and --force."""
    if args.force:
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    limits = WorkLimits.for_device(device, max_seconds=MAX_SECONDS)
    check_request(limits, kind, width * height, steps, batch, label=f"{width}x{height}", chunks=chunks,
                  host=f"this machine ({device})", otherwise=", or pass --force to run it anyway")


def warn_trained_size(pipe, width: int, height: int):
    """Say so when a side lies far from the size the model was trained at (the embedded model: 64 px), where
    models draw scattered or repeated shapes."""
    trained = pipe.default_size
    low, high = TRAINED_SIZE_SPAN
    if not all(low * trained <= side <= high * trained for side in (width, height)):
        print(f"warning: this model was trained at {trained}x{trained} px; {width}x{height} is far from it and "
              f"usually draws scattered or repeated shapes (try --width {trained} --height {trained}).",
              file=sys.stderr)


def load(source, args, expected_type):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    offload = getattr(args, "offload", False)
    pipe = load_pipeline(source, dtype=DTYPES[args.dtype], device="cpu" if offload else device,
                         allow_pickle=args.allow_pickle)
    if not isinstance(pipe, expected_type):
        raise ValueError(f"{source} is a {pipe.family} model; this command needs a "
                         f"{'DiT' if expected_type is DiTPipeline else 'Stable Diffusion'} model.")
    if offload:  # each component moves to the GPU only while it runs
        enable_model_cpu_offload(pipe, device)
    return pipe


def steps_to_run(steps: int, strength: float) -> int:
    return max(1, min(int(steps * strength), steps))


def resolve_output(args) -> Path:
    if args.output is None:
        return default_output(args.command)
    output = Path(args.output)
    if output.is_dir():
        raise IsADirectoryError(f"-o {output} is a folder; give a file name such as {output / 'image.png'}.")
    if output.parent == OUTPUTS:
        OUTPUTS.mkdir(exist_ok=True)
    if not output.parent.is_dir():
        raise FileNotFoundError(f"The output folder {output.parent} does not exist.")
    if output.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise ValueError(f"-o {output}: use a .png, .jpg or .webp file name.")
    return output


def write(images, output: Path, seeds: list[int]):
    for image, path in zip(images, output_paths(output, len(images))):
        save_image(image, path)
        print(f"wrote {path}")
    if output.suffix.lower() != ".png":
        print(f"note: only PNG files keep the generation parameters; {output.suffix} files do not.")
    print(f"seed {seeds[0]}" + (f" (image k of the batch: seed {seeds[0]} + k)" if len(seeds) > 1 else ""))


def seeds_of(result) -> list[int]:
    """Each image's seed, by the rule that drew them (image k: seed + k)."""
    return image_seeds(result.parameters["seed"], len(result.images), result.parameters["seed_per_image"])


def warn_unknown_words(source, prompts: list[str]):
    """The embedded model knows only its captions' words: say which words of the prompt it never saw."""
    unknown = sorted({word for prompt in prompts for word in shapes.unknown_words(prompt)})
    if Path(source) == EMBEDDED_TEXT_TO_IMAGE and unknown:
        print(f"note: the embedded model was trained only on captions like \"{shapes.EXAMPLE_CAPTION}\"; it never "
              f"saw {', '.join(repr(w) for w in unknown)} and draws unrelated shapes for them.", file=sys.stderr)


def run_generate(args):
    if args.prompts is not None and args.controlnet:
        raise ValueError("--controlnet does not go with --prompts (a prompt file); run generate once per image.")
    if args.prompts is not None and fast_flags(args):
        raise ValueError(f"A prompt file (--prompts) runs the parity path; drop {', '.join(fast_flags(args))}, or "
                         f"generate one prompt at a time with them.")
    if args.controlnet and (args.refiner or fast_flags(args)):
        raise ValueError(f"--controlnet runs on the parity path without a refiner; drop "
                         f"{', '.join((['--refiner'] if args.refiner else []) + fast_flags(args))}.")
    if args.prompts is not None:  # a prompt file: many images, on any number of processes (sd_core.training.batch)
        from sd_core.training import batch
        return batch.run(args)
    if args.prompt is None:
        raise ValueError("Give a prompt, or --prompts FILE --out FOLDER.")
    output = resolve_output(args)
    source = args.model or EMBEDDED_TEXT_TO_IMAGE
    pipe = load(source, args, StableDiffusionPipeline)
    warn_unknown_words(source, [args.prompt, args.negative or ""])
    defaults = catalog.recommended(source, pipe)
    if args.mask and not args.init_image:
        raise ValueError("--mask needs --init-image: the image to paint into.")
    if args.refiner and args.init_image:
        raise ValueError("--refiner runs after text to image; it does not take --init-image.")
    strength = args.strength if args.strength is not None else 1.0 if args.mask else 0.8
    controlnets, control = controlnets_of(args, pipe)
    settings = GenerationSettings.from_values(dict(
        prompt=args.prompt, negative_prompt=args.negative, steps=defaults["steps"] if args.steps is None else args.steps,
        guidance_scale=defaults["guidance_scale"] if args.guidance is None else args.guidance, scheduler=args.scheduler,
        seed=args.seed, images_per_prompt=args.batch, seed_per_image=True, prompt_syntax=args.prompt_syntax,
        clip_skip=args.clip_skip, height=args.height, width=args.width, loras=args.lora, embeddings=args.embedding,
        strength=strength if args.init_image else None, refiner=args.refiner, high_noise_frac=args.high_noise_frac,
        fast=bool(fast_flags(args)),
        deepcache=args.deepcache or 0, guidance_until=args.guidance_until, tgate=args.tgate,
        controlnets=controlnets, guess_mode=args.guess_mode))
    check_generate_work(args, pipe, settings)
    tokens = customize(pipe, settings.loras, settings.embeddings, allow_pickle=args.allow_pickle)
    if tokens:
        print(f"embedding tokens: {', '.join(tokens)}")
    if settings.refiner:
        refiner = load(settings.refiner, args, StableDiffusionPipeline)
        result = refine_run(pipe, refiner, settings, callback=progress_callback(settings.steps))
    else:
        inputs = dict(image=args.init_image, mask=args.mask, control=control,
                      callback=progress_callback(steps_to_run(settings.steps, strength if args.init_image else 1.0)))
        if settings.fast:  # the opt-in fast path, never the parity one
            result = run_fast(pipe, settings, args).generate(settings, **inputs)
        else:
            result = generate(pipe, settings, **inputs)
    write(result.images, output, seeds_of(result))


def check_generate_work(args, pipe, settings: GenerationSettings):
    """Warn about a size far from the model's trained one; refuse (unless --force) a run past the work bound."""
    width, height = settings.width or pipe.default_size, settings.height or pipe.default_size
    warn_trained_size(pipe, width, height)
    steps = steps_to_run(settings.steps, settings.strength) if args.init_image else settings.steps
    chunks = count_chunks(pipe.tokenizer, [settings.prompt, settings.negative_prompt or ""]) \
        if settings.prompt_syntax == "a1111" else 1
    check_work(args, "text_to_image", width, height, steps, settings.images_per_prompt, chunks)


def run_vae(args):
    output = resolve_output(args)
    pipe = load(args.model or EMBEDDED_TEXT_TO_IMAGE, args, (StableDiffusionPipeline, DiTPipeline))
    result = vae_roundtrip(pipe.vae, args.image, sample=args.sample, seed=args.seed)
    save_image(result.reconstruction, output)
    print(f"wrote {output}  PSNR {result.psnr:.2f} dB")


def run_dit(args):
    labels = list(args.labels) + list(args.classes or [])
    if not labels:
        raise ValueError("Name at least one class: --class \"red circle\" (or positional class ids/names).")
    if args.count < 1:
        raise ValueError(f"--count must be at least 1; got {args.count}.")
    output = resolve_output(args)
    source = args.model or EMBEDDED_DIT
    pipe = load(source, args, DiTPipeline)
    defaults = catalog.recommended(source, pipe)
    settings = DiTSettings.from_values(dict(
        class_labels=[label for label in labels for _ in range(args.count)], seed=args.seed, seed_per_image=True,
        steps=defaults["steps"] if args.steps is None else args.steps, scheduler=args.scheduler,
        guidance_scale=defaults["guidance_scale"] if args.guidance is None else args.guidance,
        guided_channels=args.guided_channels, fast=bool(fast_flags(args)), dit_cache=args.dit_cache,
        guidance_until=args.guidance_until))
    side = pipe.transformer.config.sample_size * pipe.vae.downscale_factor
    check_work(args, "dit", side, side, settings.steps, len(settings.class_labels))
    sample = run_fast(pipe, settings, args).generate_dit if settings.fast else functools.partial(generate_dit, pipe)
    result = sample(settings, callback=progress_callback(settings.steps))
    write(result.images, output, seeds_of(result))


def common_arguments(p, default_steps):
    """What every command takes: the model, the sampler, the seed, the precision, the output."""
    p.add_argument("--model", help="diffusers folder, .safetensors file or hub id (default: embedded model)")
    p.add_argument("--steps", type=int, default=default_steps,
                   help="sampling steps (default: the model's recommended number)")
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES)
    p.add_argument("--seed", type=int, help="random when omitted; the used seed is printed")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--allow-pickle", action="store_true", help="load .ckpt/.pt files (tensors only)")
    p.add_argument("--offload", action="store_true",
                   help="keep the model in CPU memory, each component on the GPU only while it runs")
    p.add_argument("-o", "--output", help="a .png (keeps the parameters), .jpg or .webp file; a batch adds "
                   "-0, -1, ... (default: outputs/<command>-<n>.png)")


def batch_arguments(g):
    """generate's prompt files (many images, resumable)."""
    g.add_argument("--prompts", type=Path, help="a file of prompts (one a line, or JSON lines); needs --out")
    g.add_argument("--out", type=Path, help="the folder --prompts writes 00000-00.png, ... to (resumable)")
    g.add_argument("--stop-after", type=int, help="with --prompts: each process stops after this many images")
    g.add_argument("--threads", type=int, default=0, help="with --prompts: torch threads per process")


def force_argument(p):
    """--force, for the commands whose work is priced before they run (generate, dit)."""
    p.add_argument("--force", action="store_true", help=f"run even when the run is estimated past "
                   f"{MAX_SECONDS // 60} minutes on this machine (refused otherwise, with the estimate)")


def picture_arguments(g):
    """generate's prompt, guidance, size, batch, start image and mask, and the SDXL refiner; --force."""
    g.add_argument("prompt", nargs="?", help=f"what to draw; the embedded model knows captions like "
                   f"\"{shapes.EXAMPLE_CAPTION}\" (shapes: circle/square/triangle; colours: "
                   f"{'/'.join(shapes.COLOURS)}; small/big; left/center/right; gray/black/white background)")
    g.add_argument("--negative", help="negative prompt")
    g.add_argument("--guidance", type=finite_float, help="classifier-free guidance scale (default: the model's "
                   "recommended one, e.g. 7.5; SDXL 5; the embedded model 5)")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--batch", type=int, default=1, help="images per prompt")
    g.add_argument("--init-image", help="start from this image (image to image)")
    g.add_argument("--mask", help="inpaint: repaint the white region of this mask (same size as --init-image)")
    g.add_argument("--strength", type=finite_float, help="how much to change the init image, 0..1 (default 0.8; "
                   "with --mask 1)")
    g.add_argument("--refiner", metavar="MODEL", help="an SDXL refiner to finish the base model's image "
                   "(ensemble of expert denoisers)")
    g.add_argument("--high-noise-frac", type=finite_float, default=0.8,
                   help="with --refiner: the fraction of the noise schedule the base model runs (default 0.8)")
    force_argument(g)


def customization_arguments(g):
    """generate's prompt syntax, clip skip, LoRAs and embeddings."""
    g.add_argument("--prompt-syntax", choices=PROMPT_SYNTAXES, default="plain",
                   help="plain: diffusers' (77 tokens, brackets are text); a1111: (word:1.3), [word], BREAK, long prompts")
    g.add_argument("--clip-skip", type=int, default=0, help="use the text encoder's layer N before its usual one")
    g.add_argument("--lora", type=lora_argument, action="append", default=[], metavar="FILE:SCALE",
                   help="merge a LoRA at this scale (repeatable)")
    g.add_argument("--embedding", action="append", default=[], metavar="FILE",
                   help="a textual-inversion embedding; its token is printed (repeatable)")


def control_arguments(g):
    """generate's ControlNets: model and image, preprocessor, window, guess mode."""
    g.add_argument("--controlnet", type=controlnet_argument, action="append", default=[], metavar="MODEL:IMAGE[:SCALE]",
                   help="steer the image with a ControlNet (folder, .safetensors, hub id, or shapes-controlnet, the "
                        "embedded one) and its control image, at this scale (default 1; repeatable)")
    g.add_argument("--preprocessor", choices=list(PREPROCESSORS), action="append",
                   help="what makes the control image from IMAGE: none (IMAGE is the map), canny (edges), invert "
                        "(dark lines on light); once for all ControlNets or once per --controlnet")
    g.add_argument("--control-start", type=finite_float, action="append", metavar="SHARE",
                   help="the share of the steps after which a ControlNet starts acting (default 0)")
    g.add_argument("--control-end", type=finite_float, action="append", metavar="SHARE",
                   help="the share of the steps after which a ControlNet stops acting (default 1)")
    g.add_argument("--guess-mode", action="store_true",
                   help="ControlNets see only the prompt's half of the guidance batch (diffusers' guess mode)")


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="python -m sd_core", description=__doc__)
    commands = main.add_subparsers(dest="command", required=True)
    g = commands.add_parser("generate", help="text to image (or image to image with --init-image)")
    for add in (picture_arguments, fast_arguments, batch_arguments, customization_arguments, control_arguments):
        add(g)
    common_arguments(g, None)
    g.set_defaults(run=run_generate)

    v = commands.add_parser("vae", help="round-trip an image through the VAE")
    v.add_argument("image")
    v.add_argument("--sample", action="store_true", help="sample the posterior instead of its mean")
    common_arguments(v, 1)
    v.set_defaults(run=run_vae)

    d = commands.add_parser("dit", help="class-conditional DiT sampling")
    d.add_argument("labels", nargs="*", help="class ids or names, one per argument (quote names with spaces)")
    d.add_argument("--class", dest="classes", action="append", metavar="NAME_OR_ID", help="a class (repeatable)")
    d.add_argument("--count", type=int, default=1, help="images of each class")
    d.add_argument("--guidance", type=finite_float, help="guidance scale (default: the model's recommended one)")
    d.add_argument("--guided-channels", choices=["all", "first3"], default="all")
    force_argument(d)
    fast_arguments(d, dit=True)
    common_arguments(d, None)
    d.set_defaults(run=run_dit)
    lab_cli.add_commands(commands, common_arguments, load, resolve_output)  # xyz, attention (sd_core.lab_cli)
    return main


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except KeyboardInterrupt:  # every image is written whole or not at all (sd_core.files.atomic_path)
        print("\ninterrupted, nothing half-written", file=sys.stderr)
        return 130
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, IsADirectoryError, CheckpointError,
            FloatingPointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
