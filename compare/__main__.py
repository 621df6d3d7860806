"""python -m compare parity --model SRC "a prompt" [--out folder]  |  python -m compare benchmark [...]"""
import argparse
import sys
from pathlib import Path

from . import benchmark
from sd_core.catalog import EMBEDDED_TEXT_TO_IMAGE

from .parity import REFERENCE_SCHEDULERS, run_parity


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compare", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("parity", help="sd_core vs diffusers, stage by stage, on the same weights")
    p.add_argument("prompt")
    p.add_argument("--model", default=str(EMBEDDED_TEXT_TO_IMAGE), help="folder, single file or hub id (default: embedded)")
    p.add_argument("--negative")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--scheduler", choices=sorted(REFERENCE_SCHEDULERS), default="ddim")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--out", type=Path, default=Path("parity-report"))
    b = commands.add_parser("benchmark", help="speed and peak memory, sd_core / diffusers")
    b.add_argument("--configs", default="embedded,sd15,sdxl,dit-xl-2")
    b.add_argument("--dtypes", default="fp32,bf16")
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--latent", type=int, default=32, help="latent size of the real-size configs (32: 256 px)")
    b.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: PyTorch's default)")
    b.add_argument("--json")
    args = parser.parse_args(argv)
    if args.command == "benchmark":
        benchmark.main(args)
        return 0
    report = run_parity(args.model, args.prompt, args.negative, args.seed, args.steps, args.scheduler, args.guidance,
                        args.height, args.width)
    folder = report.write(args.out)
    print(report.markdown())
    print(f"wrote {folder}/report.json, report.md, images.png")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
