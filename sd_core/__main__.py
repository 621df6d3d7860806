"""Command line: python -m sd_core {generate, vae, dit} ... (the embedded models when --model is omitted)."""
import argparse
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from .convert import CheckpointError
from .catalog import EMBEDDED_DIT, EMBEDDED_TEXT_TO_IMAGE
from .components import DiTPipeline, StableDiffusionPipeline
from .images import save_image
from .loading import load_pipeline
from .pipelines import dit_sample, generate, vae_roundtrip
from .schedulers import SCHEDULER_NAMES

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def output_paths(output: Path, count: int) -> list[Path]:
    return [output] if count == 1 else [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def progress_callback(total: int):
    bar = tqdm(total=total, unit="step")

    def callback(step, timestep, latents, x0):
        bar.update(1)
        if step == total - 1:
            bar.close()
    return callback


def load(source, args, expected_type):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = load_pipeline(source, dtype=DTYPES[args.dtype], device=device, allow_pickle=args.allow_pickle)
    if not isinstance(pipe, expected_type):
        raise ValueError(f"{source} is a {pipe.family} model; this command needs a "
                         f"{'DiT' if expected_type is DiTPipeline else 'Stable Diffusion'} model.")
    return pipe


def steps_to_run(steps: int, strength: float) -> int:
    return max(1, min(int(steps * strength), steps))


def check_output(output: Path):
    if not output.parent.is_dir():
        raise FileNotFoundError(f"The output folder {output.parent} does not exist.")


def run_generate(args):
    output = Path(args.output)
    check_output(output)
    pipe = load(args.model or EMBEDDED_TEXT_TO_IMAGE, args, StableDiffusionPipeline)
    result = generate(pipe, args.prompt, args.negative, image=args.init_image, strength=args.strength,
                      height=args.height, width=args.width, steps=args.steps, scheduler=args.scheduler,
                      guidance_scale=args.guidance if args.guidance is not None else pipe.traits.guidance_scale,
                      seed=args.seed, images_per_prompt=args.batch, callback=progress_callback(
                          steps_to_run(args.steps, args.strength if args.init_image else 1.0)))
    for image, path in zip(result.images, output_paths(output, len(result.images))):
        save_image(image, path)
        print(f"wrote {path}")
    print(f"seed {result.parameters['seed']}")


def run_vae(args):
    output = Path(args.output)
    check_output(output)
    pipe = load(args.model or EMBEDDED_TEXT_TO_IMAGE, args, (StableDiffusionPipeline, DiTPipeline))
    result = vae_roundtrip(pipe.vae, args.image, sample=args.sample, seed=args.seed)
    save_image(result.reconstruction, output)
    print(f"wrote {output}  PSNR {result.psnr:.2f} dB")


def run_dit(args):
    output = Path(args.output)
    check_output(output)
    pipe = load(args.model or EMBEDDED_DIT, args, DiTPipeline)
    result = dit_sample(pipe, args.labels, guidance_scale=args.guidance, steps=args.steps, scheduler=args.scheduler,
                        seed=args.seed, guided_channels=args.guided_channels,
                        callback=progress_callback(args.steps))
    for image, path in zip(result.images, output_paths(output, len(result.images))):
        save_image(image, path)
        print(f"wrote {path}")
    print(f"seed {result.parameters['seed']}")


def parser() -> argparse.ArgumentParser:
    main = argparse.ArgumentParser(prog="python -m sd_core", description=__doc__)
    commands = main.add_subparsers(dest="command", required=True)

    def common(p, default_steps):
        p.add_argument("--model", help="diffusers folder, .safetensors file or hub id (default: embedded model)")
        p.add_argument("--steps", type=int, default=default_steps)
        p.add_argument("--scheduler", choices=SCHEDULER_NAMES)
        p.add_argument("--seed", type=int, help="random when omitted; the used seed is printed")
        p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
        p.add_argument("--allow-pickle", action="store_true", help="load .ckpt/.pt files (tensors only)")
        p.add_argument("-o", "--output", default="out.png")

    g = commands.add_parser("generate", help="text to image (or image to image with --init-image)")
    g.add_argument("prompt")
    g.add_argument("--negative", help="negative prompt")
    g.add_argument("--guidance", type=float, help="classifier-free guidance scale (7.5; SDXL 5)")
    g.add_argument("--height", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--batch", type=int, default=1, help="images per prompt")
    g.add_argument("--init-image", help="start from this image (image to image)")
    g.add_argument("--strength", type=float, default=0.8, help="how much to change the init image, 0..1")
    common(g, 20)
    g.set_defaults(run=run_generate)

    v = commands.add_parser("vae", help="round-trip an image through the VAE")
    v.add_argument("image")
    v.add_argument("--sample", action="store_true", help="sample the posterior instead of its mean")
    common(v, 1)
    v.set_defaults(run=run_vae)

    d = commands.add_parser("dit", help="class-conditional DiT sampling")
    d.add_argument("labels", nargs="+", help="class ids or names")
    d.add_argument("--guidance", type=float, default=4.0)
    d.add_argument("--guided-channels", choices=["all", "first3"], default="all")
    common(d, 25)
    d.set_defaults(run=run_dit)
    return main


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, TypeError, FileNotFoundError, FileExistsError, CheckpointError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
