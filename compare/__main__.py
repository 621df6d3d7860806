"""python -m compare <kind> [--model SRC] [options] [--out folder]   (kinds: text_to_image, image_to_image, vae,
controlnet, dit, dit_timestep_semantics, precision, attention, fast_path)  |  python -m compare parity "a prompt"
|  python -m compare benchmark  |  python -m compare startup (app.py to the first pictures on the page)

Each kind writes report.json, report.md, images.png and plot-*.png into --out and prints the verdict. Exit status:
0 when the comparison holds (or is a measurement), 1 when sd_core and its reference differ, 2 on bad input."""
import argparse
import sys
from pathlib import Path

from sd_core.checkpoints.catalog import EMBEDDED_TEXT_TO_IMAGE
from sd_core.schedulers import SCHEDULER_NAMES

from . import benchmark, gpu_parity, startup
from .kinds import KINDS, default_model, run_comparison
from .parity import REFERENCE_SCHEDULERS, run_parity



def positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {value}")
    return number


def fraction(value: str) -> float:
    number = float(value)
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1]; got {value}")
    return number


def class_list(value: str) -> list:
    return [int(v) if v.strip().isdigit() else v.strip() for v in value.split(",") if v.strip()]


def add_kind(commands, kind: str):
    p = commands.add_parser(kind, help=KINDS[kind], description=KINDS[kind])
    p.add_argument("--model", help=f"folder, single file or hub id (default: {default_model(kind)})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(f"compare-{kind}"), help="report folder (created)")
    if kind == "vae":
        p.add_argument("--image", help="picture to round-trip (default: a drawn test picture)")
        p.add_argument("--size", type=positive, help="size of the drawn test picture (default 64)")
        p.add_argument("--sample", action="store_true", help="decode a posterior sample, not its mean")
        return
    p.add_argument("--steps", type=positive, default=10)
    p.add_argument("--scheduler", choices=SCHEDULER_NAMES, help="default: the model's own")
    p.add_argument("--guidance", dest="guidance_scale", type=float)
    if kind in ("precision", "attention"):
        p.add_argument("--dtype", choices=["bf16", "fp16"] if kind == "precision" else ["fp32", "bf16", "fp16"],
                       default="bf16" if kind == "precision" else "fp32")
        p.add_argument("--device", help="cpu or cuda (default: cuda where available)")
    if kind == "fast_path":
        p.add_argument("--deepcache", type=int, default=3, help="the full UNet every N steps (0: off; default 3)")
        p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                       help="a bf16 UNet copy (auto: where measured faster on this machine)")
        p.add_argument("--channels-last", dest="channels_last", choices=["on", "off"], default="on")
        p.add_argument("--tome", type=float, help="ToMe: the share of top-resolution tokens merged, in [0, 1) "
                       "(default: off)")
    if kind not in ("dit", "dit_timestep_semantics"):
        p.add_argument("--prompt")
        p.add_argument("--negative", dest="negative_prompt")
        p.add_argument("--height", type=positive)
        p.add_argument("--width", type=positive)
    if kind in ("image_to_image", "precision", "attention"):
        p.add_argument("--image", help="starting picture (image to image; default: a drawn test picture)")
        p.add_argument("--strength", type=fraction)
    if kind == "controlnet":
        p.add_argument("--controlnet", help="a ControlNet folder or file (default: one copied from the model's UNet, "
                       "its zero convolutions given seeded random weights)")
        p.add_argument("--control-image", dest="control_image", help="default: a drawn test picture")
        p.add_argument("--preprocessor", choices=["none", "canny", "invert"])
        p.add_argument("--conditioning-scale", dest="conditioning_scale", type=float)
        p.add_argument("--control-start", dest="control_start", type=float)
        p.add_argument("--control-end", dest="control_end", type=float)
        p.add_argument("--guess-mode", dest="guess_mode", action="store_true")
    if kind not in ("text_to_image", "image_to_image", "controlnet"):
        p.add_argument("--classes", dest="class_labels", type=class_list, help="DiT class ids or names, a,b,...")
    if kind in ("dit", "precision", "attention"):
        p.add_argument("--guided-channels", dest="guided_channels", choices=["all", "first3"])


def settings_of(args) -> dict:
    skip = {"command", "model", "out"}
    settings = {k: v for k, v in vars(args).items() if k not in skip and v is not None and v is not False}
    if args.command == "image_to_image" and "strength" not in settings:
        settings["strength"] = 0.6
    return settings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for kind in KINDS:
        add_kind(commands, kind)
    p = commands.add_parser("parity", help="text to image, sd_core vs diffusers (the original report format)")
    p.add_argument("prompt")
    p.add_argument("--model", default=str(EMBEDDED_TEXT_TO_IMAGE), help="folder, single file or hub id (default: embedded)")
    p.add_argument("--negative")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=positive, default=10)
    p.add_argument("--scheduler", choices=sorted(REFERENCE_SCHEDULERS), default="ddim")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--height", type=positive)
    p.add_argument("--width", type=positive)
    p.add_argument("--out", type=Path, default=Path("parity-report"))
    b = commands.add_parser("benchmark", help="speed and peak memory, sd_core / diffusers")
    b.add_argument("--configs", default="embedded,embedded-dit,sd15,sdxl,dit-xl-2")
    b.add_argument("--dtypes", default="fp32,bf16")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--latent", type=int, default=32, help="latent size of the real-size configs (32: 256 px)")
    b.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: PyTorch's default)")
    b.add_argument("--fast", choices=("none", "default", "all"), default="default",
                   help="fast-path rows: none; default (channels_last, DeepCache, ...); all (also torch.compile, minutes to "
                        "build, and SDXL's fast rows, which need more than 24 GB)")
    b.add_argument("--json")
    g = commands.add_parser("gpu-parity", help="sd_core and diffusers in fp16/bf16 against fp32, real-size random "
                            "weights (for a GPU; compare/gpu-check.sh)")
    g.add_argument("--configs", default="sd15,sdxl,dit-xl-2")
    g.add_argument("--dtypes", default="fp16,bf16")
    g.add_argument("--latent", type=int, default=64, help="latent size (64: 512 px)")
    s = commands.add_parser("startup", help="python app.py to the first pictures on the page (needs chromium)")
    s.add_argument("--runs", type=positive, default=3)
    args = parser.parse_args(argv)
    if args.command == "benchmark":
        benchmark.main(args)
        return 0
    if args.command == "gpu-parity":
        return gpu_parity.main(args)
    if args.command == "startup":
        startup.main(args.runs)
        return 0
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} is an existing file; give a folder (it is created, or reused).")
    if args.model is not None and not Path(args.model).exists() and "/" not in str(args.model):
        parser.error(f"--model {args.model}: no such folder or file (and not a hub id like 'owner/model').")
    try:
        if args.command == "parity":
            report = run_parity(args.model, args.prompt, args.negative, args.seed, args.steps, args.scheduler,
                                args.guidance, args.height, args.width)
            folder = report.write(args.out)
            print(report.markdown())
            print(f"wrote {folder}/report.json, report.md, images.png")
            return 0 if report.passed else 1
        report = run_comparison(args.command, args.model, **settings_of(args))
        folder = report.write(args.out)
    except (ValueError, TypeError, KeyError, OSError, ImportError) as error:  # it could not run: bad settings,
        # an unreadable or missing model, a library the reference needs missing: never read as "they differ"
        print(f"python -m compare {args.command}: error: {error}", file=sys.stderr)
        return 2
    print(report.verdict)
    print(f"wrote {folder}/report.json, report.md, images.png, " + ", ".join(f"plot-{n}.png" for n in report.plots))
    return 1 if report.passed is False else 0


if __name__ == "__main__":
    sys.exit(main())
